// What int4_gemv.cpp (the kernels) shares with decoder.cpp (the whole-model decode step): one quantized matrix
// (`Mat`), the linears that read one input (`Linears`), and the 16-bit dense GEMV.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// one quantized matrix (N, K), fp32 scales per group of G inputs (G a multiple of 32; the last group may be short):
// - DENSE4: nibbles uint8 (N, K/2), per row blocks of 32 weights in 16 bytes (zero points optional)
// - SPARSE24: 2:4, kept codes uint8 (N, 16 bytes per pair of blocks: int4_gemv.cpp) + positions int32 (N, K/32)
// - INT8: int8 (N, K) codes, w = q * scale (one group per row or G inputs), no zero points
struct Mat {
  enum Kind { DENSE4, SPARSE24, INT8 };
  torch::Tensor w, idx, scale, zero;
  int64_t N = 0, K = 0, G = 0, ng = 0;
  Kind kind = DENSE4;
  Mat() = default;
  Mat(torch::Tensor w_, torch::Tensor idx_, torch::Tensor scale_, torch::Tensor zero_, int64_t K_, int64_t G_)
      : w(w_), idx(idx_), scale(scale_), zero(zero_), N(w_.size(0)), K(K_), G(G_), ng((K_ + G_ - 1) / G_) {
    kind = idx.numel() > 0 ? SPARSE24 : w.scalar_type() == torch::kInt8 ? INT8 : DENSE4;
    TORCH_CHECK(K % 32 == 0 && G % 32 == 0 && G > 0, "K and the group size must be multiples of 32");
    const int64_t row_bytes = kind == SPARSE24 ? (K / 32 + 1) / 2 * 16 : kind == DENSE4 ? K / 2 : K;
    TORCH_CHECK((w.scalar_type() == torch::kUInt8 || kind == INT8) && w.is_contiguous() && w.dim() == 2 &&
                w.size(1) == row_bytes, kind == SPARSE24 ? "2:4 values: uint8 (N, 16 per pair of blocks of 32)"
                : kind == INT8 ? "int8 weight: int8 (N, K)" : "weight: uint8 (N, K/2)");
    if (kind == SPARSE24)
      TORCH_CHECK(idx.scalar_type() == torch::kInt32 && idx.is_contiguous() && idx.size(0) == N &&
                  idx.size(1) == K / 32, "2:4 positions: int32 (N, K/32)");
    if (kind != DENSE4) TORCH_CHECK(zero.numel() == 0, "2:4 and int8 matrices take no zero points");
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 2 &&
                scale.size(0) == N && scale.size(1) == ng, "scale: (N, groups) fp32 contiguous");
    if (zero.numel() > 0) TORCH_CHECK(zero.sizes() == scale.sizes() && zero.is_contiguous() &&
                                      zero.scalar_type() == torch::kFloat32, "zero: like scale");
  }
};

// Compressed linears that read the same input (one layer, or e.g. q/k/v or gate/up): y_l = x W_l^T (+ (x A_l^T)
// B_l^T), x quantized once, every base and A row in one parallel region and every B row in a second.
class Linears {
 public:
  explicit Linears(int64_t K) : K_(K) { TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32"); }

  // idx empty: dense int4 (uint8 w) or int8 (int8 w) W; a empty: no adapters
  void add(torch::Tensor w, torch::Tensor idx, torch::Tensor scale, torch::Tensor zero, int64_t G, torch::Tensor a,
           torch::Tensor a_scale, int64_t Ga, torch::Tensor b, torch::Tensor b_scale, int64_t Gb);
  // fp32 x (M, K) -> outs[l] (M, N_l) fp32, rows N_l apart
  void run(const float* x, int64_t M, float* const* outs) const;
  std::vector<torch::Tensor> forward(torch::Tensor x) const;
  torch::Tensor forward1(torch::Tensor x) const { return forward(x)[0]; }
  int64_t K() const { return K_; }
  size_t size() const { return layers_.size(); }
  int64_t width(size_t l) const { return layers_[l].W.N; }

 private:
  struct Layer {
    Mat W, A, B;
    bool adapters = false;
  };
  int64_t K_;
  std::vector<Layer> layers_;
};

// fp32 x (M, K) @ W^T -> out (M, N) for a bf16 or fp16 W (N, K), K a multiple of 16
void half_linear_into(const float* x, int64_t M, const torch::Tensor& w, float* out);
