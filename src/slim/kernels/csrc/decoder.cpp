// The lean decode path: a whole Llama-family forward (embedding, blocks, norm, head) for a few tokens in one C++
// call, over a KV cache this object owns. At one token a transformers forward spends most of its time in Python
// between small kernels (about 23 ms a token on a 7B-shaped model, against llama.cpp's 7); here a block is eight
// kernel calls and a few loops. The projections are slim's fused int4 / 2:4 linears (`Linears`, adapters included)
// or dense 16-bit / fp32 weights (for dense models and layers left uncompressed).
#include "linears.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <memory>
#include <vector>

namespace {

// one group of projections that read the same input (q/k/v, o, gate/up, down, the head): quantized ones through
// one `Linears` call, dense ones each through their own GEMV / GEMM, biases added after
struct Proj {
  struct Entry {
    bool dense = false;
    int64_t index = 0;  // into lin (quantized) or dense
    int64_t N = 0;
    torch::Tensor bias;
  };
  int64_t K = 0;
  std::shared_ptr<Linears> lin;
  std::vector<torch::Tensor> dense;
  std::vector<Entry> entries;

  void add_quant(const std::shared_ptr<Linears>& l, torch::Tensor bias) {
    TORCH_CHECK(!lin || lin == l, "one Linears object per projection group");
    TORCH_CHECK(l->K() == K, "projection input width ", l->K(), " != ", K);
    lin = l;
    const int64_t i = (int64_t)entries.size() - (int64_t)dense.size();
    TORCH_CHECK(i < (int64_t)l->size(), "more quantized projections than the Linears object holds");
    entries.push_back({false, i, l->width(i), bias});
  }
  void add_dense(torch::Tensor w, torch::Tensor bias) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.is_contiguous(), "dense weight: contiguous (N, ", K, ")");
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16 ||
                w.scalar_type() == torch::kHalf, "dense weight: fp32, bf16 or fp16");
    entries.push_back({true, (int64_t)dense.size(), w.size(0), bias});
    dense.push_back(w);
  }
  int64_t width(size_t e) const { return entries[e].N; }

  void run(const float* x, int64_t M, const std::vector<float*>& outs) const {
    if (lin) {
      std::vector<float*> q;
      for (size_t e = 0; e < entries.size(); ++e)
        if (!entries[e].dense) q.push_back(outs[e]);
      TORCH_CHECK(q.size() == lin->size(), "a projection group's Linears holds other layers than it runs");
      lin->run(x, M, q.data());
    }
    for (size_t e = 0; e < entries.size(); ++e) {
      const Entry& E = entries[e];
      if (E.dense) {
        const torch::Tensor& w = dense[E.index];
        if (w.scalar_type() != torch::kFloat32 && M <= 16 && K % 16 == 0) {
          half_linear_into(x, M, w, outs[e]);
        } else {
          auto xt = torch::from_blob(const_cast<float*>(x), {M, K}, torch::kFloat32);
          auto ot = torch::from_blob(outs[e], {M, E.N}, torch::kFloat32);
          if (w.scalar_type() == torch::kFloat32) at::mm_out(ot, xt, w.t());
          else ot.copy_(at::mm(xt.to(w.scalar_type()), w.t()));
        }
      }
      if (E.bias.defined() && E.bias.numel() > 0) {
        const float* b = E.bias.data_ptr<float>();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < E.N; ++n) outs[e][m * E.N + n] += b[n];
      }
    }
  }
};

inline __m256 load_h(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// e^x, 8 at a time, x clamped to [-87, 88]: 2^n e^r with |r| <= ln2 / 2, degree-6 polynomial (relative error
// ~1e-7, below fp32 rounding of a softmax sum)
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// the 8 sums of 8 vectors, as one vector
inline __m256 hsum8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// one query head over T cached positions (keys/values fp16, `stride` halves apart): out = softmax(q K^T * scale) V
void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, int64_t stride, int64_t hd,
            float scale, float* s, float* out) {
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {  // 8 positions at a time: one horizontal reduction for 8 scores
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load_h(k + (t + j) * stride + d), acc[j]);
    }
    _mm256_storeu_ps(s + t, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
  }
  for (; t < T; ++t) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_h(k + t * stride + d), a);
    s[t] = hsum(a) * scale;
  }
  float mx = -INFINITY;
  for (t = 0; t < T; ++t) mx = std::max(mx, s[t]);
  __m256 sum8 = _mm256_setzero_ps();
  const __m256 mxv = _mm256_set1_ps(mx);
  for (t = 0; t + 8 <= T; t += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), mxv));
    _mm256_storeu_ps(s + t, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  for (; t < T; ++t) sum += (s[t] = std::exp(s[t] - mx));
  const float inv = 1.f / sum;
  int64_t d0 = 0;
  for (; d0 + 32 <= hd; d0 += 32) {  // 32 output dims in registers over every position
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (t = 0; t < T; ++t) {
      const __m256 p = _mm256_set1_ps(s[t]);
      const uint16_t* vr = v + t * stride + d0;
      o0 = _mm256_fmadd_ps(p, load_h(vr), o0);
      o1 = _mm256_fmadd_ps(p, load_h(vr + 8), o1);
      o2 = _mm256_fmadd_ps(p, load_h(vr + 16), o2);
      o3 = _mm256_fmadd_ps(p, load_h(vr + 24), o3);
    }
    const __m256 iv = _mm256_set1_ps(inv);
    _mm256_storeu_ps(out + d0, _mm256_mul_ps(o0, iv));
    _mm256_storeu_ps(out + d0 + 8, _mm256_mul_ps(o1, iv));
    _mm256_storeu_ps(out + d0 + 16, _mm256_mul_ps(o2, iv));
    _mm256_storeu_ps(out + d0 + 24, _mm256_mul_ps(o3, iv));
  }
  for (; d0 < hd; d0 += 8) {
    __m256 o0 = _mm256_setzero_ps();
    for (t = 0; t < T; ++t) o0 = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), load_h(v + t * stride + d0), o0);
    _mm256_storeu_ps(out + d0, _mm256_mul_ps(o0, _mm256_set1_ps(inv)));
  }
}

// fp32 -> fp16 (round to nearest even), n a multiple of 8
inline void to_half(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace

class Decoder {
 public:
  Decoder(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t vocab,
          double eps, double scaling)
      : L_(layers), H_(hidden), nh_(heads), nkv_(kv_heads), hd_(head_dim), V_(vocab), eps_((float)eps),
        scaling_((float)scaling), blocks_(layers) {
    TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of the key/value heads");
    TORCH_CHECK(head_dim % 8 == 0, "head_dim must be a multiple of 8");
    for (auto& b : blocks_) {
      b.qkv.K = hidden;
      b.o.K = heads * head_dim;
      b.gate_up.K = hidden;
    }
  }

  // slot: 0 q/k/v, 1 o, 2 gate/up, 3 down; layer -1: the head
  void add_quant(int64_t layer, int64_t slot, std::shared_ptr<Linears> lin, torch::Tensor bias) {
    proj(layer, slot, lin->K()).add_quant(lin, as_bias(bias));
  }
  void add_dense(int64_t layer, int64_t slot, torch::Tensor w, torch::Tensor bias) {
    proj(layer, slot, w.size(1)).add_dense(w, as_bias(bias));
  }
  void set_norms(int64_t layer, torch::Tensor input_norm, torch::Tensor post_norm) {
    blocks_.at(layer).in_norm = vec(input_norm, H_);
    blocks_.at(layer).post_norm = vec(post_norm, H_);
  }
  void set_final(torch::Tensor embedding, torch::Tensor norm) {
    TORCH_CHECK(embedding.dim() == 2 && embedding.size(0) == V_ && embedding.size(1) == H_,
                "embedding: (vocab, hidden)");
    emb_ = embedding;
    final_norm_ = vec(norm, H_);
  }
  // rope tables (positions, head_dim) as the model computes them (cos, sin over both halves)
  void set_rope(torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == hd_ && cos.sizes() == sin.sizes(), "rope: (positions, head_dim)");
    cos_ = cos.to(torch::kFloat32).contiguous();
    sin_ = sin.to(torch::kFloat32).contiguous();
  }
  // a KV cache of `length` positions (kept contents up to the shorter of the two lengths)
  void reserve(int64_t length) {
    TORCH_CHECK(length > 0, "cache length must be positive");
    if (length == cap_) return;
    auto k = torch::zeros({L_, length, nkv_, hd_}, torch::kHalf), v = torch::zeros_like(k);
    if (cap_ > 0) {
      const int64_t keep = std::min(cap_, length);
      k.narrow(1, 0, keep).copy_(k_.narrow(1, 0, keep));
      v.narrow(1, 0, keep).copy_(v_.narrow(1, 0, keep));
    }
    k_ = k, v_ = v, cap_ = length;
  }
  // the tokens `ids` (M,) at positions pos..pos+M-1, their K/V written into the cache; logits (M, vocab) fp32,
  // or of the last token only (1, vocab) unless all_logits
  torch::Tensor forward(torch::Tensor ids, int64_t pos, bool all_logits) {
    TORCH_CHECK(ids.dim() == 1 && ids.numel() > 0, "ids: (tokens,)");
    const int64_t M = ids.size(0), T = pos + M;
    TORCH_CHECK(pos >= 0 && T <= cap_, "positions ", pos, "..", T - 1, " exceed the cache (", cap_,
                "); reserve a longer one");
    TORCH_CHECK(cos_.defined() && cos_.size(0) >= T, "rope tables shorter than ", T, " positions");
    TORCH_CHECK(emb_.defined() && head_.entries.size() == 1, "embedding and head not set");
    const int64_t qd = nh_ * hd_, kd = nkv_ * hd_, I = blocks_[0].gate_up.entries.empty() ? 0
                                                                                      : blocks_[0].gate_up.width(0);
    auto h = emb_.index_select(0, ids.to(torch::kLong)).to(torch::kFloat32).contiguous();
    float* hp = h.data_ptr<float>();
    buf(xn_, M * H_), buf(q_, M * qd), buf(k_new_, M * kd), buf(v_new_, M * kd), buf(att_, M * qd);
    buf(t_, M * H_), buf(g_, M * I), buf(u_, M * I);
    for (int64_t l = 0; l < L_; ++l) {
      const Block& B = blocks_[l];
      TORCH_CHECK(B.qkv.entries.size() == 3 && B.o.entries.size() == 1 && B.gate_up.entries.size() == 2 &&
                  B.down.entries.size() == 1, "block ", l, " is not complete");
      rms_norm(hp, B.in_norm.data_ptr<float>(), M, xn_.data());
      B.qkv.run(xn_.data(), M, {q_.data(), k_new_.data(), v_new_.data()});
      rope(q_.data(), M, nh_, pos);
      rope(k_new_.data(), M, nkv_, pos);
      uint16_t* kc = reinterpret_cast<uint16_t*>(k_.data_ptr()) + l * cap_ * kd;
      uint16_t* vc = reinterpret_cast<uint16_t*>(v_.data_ptr()) + l * cap_ * kd;
      to_half(k_new_.data(), kc + pos * kd, M * kd);
      to_half(v_new_.data(), vc + pos * kd, M * kd);
      attention(kc, vc, M, pos);
      B.o.run(att_.data(), M, {t_.data()});
      for (int64_t i = 0; i < M * H_; ++i) hp[i] += t_[i];
      rms_norm(hp, B.post_norm.data_ptr<float>(), M, xn_.data());
      B.gate_up.run(xn_.data(), M, {g_.data(), u_.data()});
      silu_mul(g_.data(), u_.data(), M * I);
      B.down.run(g_.data(), M, {t_.data()});
      for (int64_t i = 0; i < M * H_; ++i) hp[i] += t_[i];
    }
    const int64_t R = all_logits ? M : 1;
    const float* last = hp + (M - R) * H_;
    rms_norm(last, final_norm_.data_ptr<float>(), R, xn_.data());
    auto logits = torch::empty({R, V_}, torch::kFloat32);
    head_.run(xn_.data(), R, {logits.data_ptr<float>()});
    return logits;
  }

 private:
  struct Block {
    Proj qkv, o, gate_up, down;
    torch::Tensor in_norm, post_norm;
  };

  Proj& proj(int64_t layer, int64_t slot, int64_t K) {
    if (layer < 0) {
      head_.K = H_;
      return head_;
    }
    Block& b = blocks_.at(layer);
    TORCH_CHECK(slot >= 0 && slot <= 3, "slot: 0 q/k/v, 1 o, 2 gate/up, 3 down");
    Proj& p = slot == 0 ? b.qkv : slot == 1 ? b.o : slot == 2 ? b.gate_up : b.down;
    if (slot == 3 && p.K == 0) p.K = K;  // the MLP width comes with down's weight
    return p;
  }
  static torch::Tensor vec(const torch::Tensor& t, int64_t n) {
    TORCH_CHECK(t.numel() == n, "expected ", n, " values, got ", t.numel());
    return t.to(torch::kFloat32).contiguous().view({n});
  }
  static torch::Tensor as_bias(const torch::Tensor& b) {
    return b.defined() && b.numel() > 0 ? b.to(torch::kFloat32).contiguous() : torch::Tensor();
  }
  static void buf(std::vector<float>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize(n);
  }

  void rms_norm(const float* x, const float* w, int64_t M, float* out) const {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * H_;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      int64_t i = 0;
      for (; i + 16 <= H_; i += 16) {
        const __m256 v0 = _mm256_loadu_ps(xr + i), v1 = _mm256_loadu_ps(xr + i + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
      }
      float ss = hsum(_mm256_add_ps(a0, a1));
      for (; i < H_; ++i) ss += xr[i] * xr[i];
      const float r = 1.f / std::sqrt(ss / H_ + eps_);
      for (i = 0; i < H_; ++i) out[m * H_ + i] = xr[i] * r * w[i];
    }
  }

  // g = silu(g) * u, with the vector exp
  static void silu_mul(float* g, const float* u, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(g + i);
      const __m256 e = exp_ps(_mm256_sub_ps(zero, v));
      _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }

  // rotate_half convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves of head_dim
  void rope(float* x, int64_t M, int64_t heads, int64_t pos) const {
    const int64_t half = hd_ / 2;
    for (int64_t m = 0; m < M; ++m) {
      const float* c = cos_.data_ptr<float>() + (pos + m) * hd_;
      const float* s = sin_.data_ptr<float>() + (pos + m) * hd_;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (m * heads + h) * hd_;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  }

  // causal attention of the M new queries (positions pos..pos+M-1) over the cache; few tokens: one task per
  // (token, head) pair, many: torch's scaled_dot_product_attention
  void attention(const uint16_t* kc, const uint16_t* vc, int64_t M, int64_t pos) {
    const int64_t kd = nkv_ * hd_, group = nh_ / nkv_;
    if (M > 8) {
      const int64_t T = pos + M;
      auto q = torch::from_blob(q_.data(), {1, M, nh_, hd_}, torch::kFloat32).transpose(1, 2);
      auto k = torch::from_blob(const_cast<uint16_t*>(kc), {1, T, nkv_, hd_}, torch::kHalf).to(torch::kFloat32)
                   .transpose(1, 2);
      auto v = torch::from_blob(const_cast<uint16_t*>(vc), {1, T, nkv_, hd_}, torch::kHalf).to(torch::kFloat32)
                   .transpose(1, 2);
      if (group > 1) {
        k = k.repeat_interleave(group, 1);
        v = v.repeat_interleave(group, 1);
      }
      auto mask = torch::ones({M, T}, torch::kBool).tril(pos);
      auto o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, (double)scaling_);
      torch::from_blob(att_.data(), {1, M, nh_, hd_}, torch::kFloat32).copy_(o.transpose(1, 2));
      return;
    }
    at::parallel_for(0, M * nh_, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> s(pos + M + 8);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / nh_, h = i % nh_, kh = h / group;
        attend(q_.data() + (m * nh_ + h) * hd_, kc + kh * hd_, vc + kh * hd_, pos + m + 1, kd, hd_, scaling_,
               s.data(), att_.data() + (m * nh_ + h) * hd_);
      }
    });
  }

  int64_t L_, H_, nh_, nkv_, hd_, V_;
  float eps_, scaling_;
  std::vector<Block> blocks_;
  Proj head_;
  torch::Tensor emb_, final_norm_, cos_, sin_, k_, v_;
  int64_t cap_ = 0;
  std::vector<float> xn_, q_, k_new_, v_new_, att_, t_, g_, u_;
};

void register_decoder(pybind11::module& m) {
  pybind11::class_<Decoder>(m, "Decoder", "a Llama-family forward over its own KV cache in one call")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add_quant", &Decoder::add_quant)
      .def("add_dense", &Decoder::add_dense)
      .def("set_norms", &Decoder::set_norms)
      .def("set_final", &Decoder::set_final)
      .def("set_rope", &Decoder::set_rope)
      .def("reserve", &Decoder::reserve)
      .def("forward", &Decoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
