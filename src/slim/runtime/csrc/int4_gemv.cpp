// slim's CPU int4 GEMV for few tokens (AVX2 + FMA), built on first use by torch.utils.cpp_extension.
//
// Weights: uint8 (N, K/2), per row blocks of 32 weights in 16 bytes, byte j = q[j] | q[j + 16] << 4, q in 0..15
// meaning w = (q - 8) * scale[n, g] + zero[n, g] with g = k / G (G a multiple of 32; the last group may be short).
// Activations are quantized to int8 per block of 32 (scale = max|x| / 127) inside the call, so a block's dot product
// is one _mm256_maddubs_epi16 (u8 weights x s8 activations) instead of 32 float conversions and FMAs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// one row of activations -> int8 blocks of 32 with a float scale each, and each block's sum (scaled)
void quantize_row(const float* x, int64_t K, int8_t* xq, float* dx, float* xs) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* p = x + b * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(p[i]));
    float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int s = 0;
    for (int i = 0; i < 32; ++i) {
      int v = (int)std::nearbyint(p[i] * inv);
      xq[b * 32 + i] = (int8_t)v;
      s += v;
    }
    dx[b] = d;
    xs[b] = d * (float)s;
  }
}

constexpr int MB = 4;  // activation rows per weight pass

template <int R, bool ACC>
void rows_kernel(const uint8_t* w, const int8_t* xq, const float* dx, const float* xg, const float* scale,
                 const float* zero, int64_t K, int64_t G, int64_t ng, int64_t n0, int64_t n1, float* out, int64_t N) {
  // xg[r * ng + g]: the group's sum of (dequantized) activations, for the -8 offset and the zero points
  const int64_t nb = K / 32, bpg = G / 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const float* sr = scale + n * ng;
    __m256 acc[R];
    float off[R];
    for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); off[r] = 0.f; }
    for (int64_t g = 0; g < ng; ++g) {
      const float s = sr[g];
      const float c = (zero ? zero[n * ng + g] : 0.f) - 8.f * s;
      const int64_t b0 = g * bpg, b1 = std::min(nb, b0 + bpg);
      __m256 gacc[R];
      for (int r = 0; r < R; ++r) gacc[r] = _mm256_setzero_ps();
      int64_t b = b0;
      for (; b + 1 < b1; b += 2) {  // two blocks (64 weights, 32 bytes) per step
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 16));
        __m256i lo = _mm256_and_si256(raw, low);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        __m256i q0 = _mm256_permute2x128_si256(lo, hi, 0x20);
        __m256i q1 = _mm256_permute2x128_si256(lo, hi, 0x31);
        for (int r = 0; r < R; ++r) {
          const int8_t* xr = xq + r * K + b * 32;
          __m256i p0 = _mm256_madd_epi16(
              _mm256_maddubs_epi16(q0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))), ones);
          __m256i p1 = _mm256_madd_epi16(
              _mm256_maddubs_epi16(q1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))), ones);
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(dx + r * nb + b), gacc[r]);
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(dx + r * nb + b + 1), gacc[r]);
        }
      }
      for (; b < b1; ++b) {
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + b * 16));
        __m128i l4 = _mm_set1_epi8(0x0F);
        __m256i qv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), l4), _mm_and_si128(raw, l4));
        for (int r = 0; r < R; ++r) {
          __m256i p = _mm256_madd_epi16(
              _mm256_maddubs_epi16(qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * 32))),
              ones);
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(dx + r * nb + b), gacc[r]);
        }
      }
      const __m256 sv = _mm256_set1_ps(s);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(gacc[r], sv, acc[r]);
        off[r] += c * xg[r * ng + g];
      }
    }
    for (int r = 0; r < R; ++r) {
      const float v = hsum(acc[r]) + off[r];
      out[r * N + n] = ACC ? out[r * N + n] + v : v;
    }
  }
}


// 2:4 rows: per block of 32 inputs, 16 kept 4-bit codes (8 bytes, kept j at nibble j, stored as c + 8) and their
// 16 positions inside their group of 4 (one 32-bit word: byte k holds the positions of kept k, k+4, k+8, k+12 in
// bits 0-1, 2-3, 4-5, 6-7). The kept activations are gathered with a byte shuffle; 3 bits a weight are read.
template <int R>
void rows_kernel_24(const uint8_t* vals, const uint32_t* idx, const int8_t* xq, const float* dx, const float* scale,
                    int64_t K, int64_t G, int64_t ng, int64_t n0, int64_t n1, float* out, int64_t N, bool acc_out) {
  const int64_t nb = K / 32, bpg = G / 32;
  const __m128i low = _mm_set1_epi8(0x0F), three = _mm_set1_epi8(3), eight = _mm_set1_epi8(8);
  const __m128i shifts = _mm_setr_epi32(0, 2, 4, 6);
  const __m128i base = _mm_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  const __m128i ones = _mm_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* vr = vals + n * (K / 4);
    const uint32_t* ir = idx + n * nb;
    const float* sr = scale + n * ng;
    __m128 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t b0 = g * bpg, b1 = std::min(nb, b0 + bpg);
      __m128 gacc[R];
      for (int r = 0; r < R; ++r) gacc[r] = _mm_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        __m128i v8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vr + b * 8));
        __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(v8, low), _mm_and_si128(_mm_srli_epi16(v8, 4), low));
        codes = _mm_sub_epi8(codes, eight);  // signed codes c in [-8, 7]
        __m128i ac = _mm_abs_epi8(codes);
        __m128i pos = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)ir[b]), shifts), three);
        __m128i ctrl = _mm_add_epi8(base, pos);
        for (int r = 0; r < R; ++r) {
          const int8_t* xr = xq + r * K + b * 32;
          __m128i xlo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr));
          __m128i xhi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + 16));
          __m128i sel = _mm_blend_epi32(_mm_shuffle_epi8(xlo, ctrl), _mm_shuffle_epi8(xhi, ctrl), 0xC);
          __m128i p = _mm_madd_epi16(_mm_maddubs_epi16(ac, _mm_sign_epi8(sel, codes)), ones);
          gacc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(p), _mm_set1_ps(dx[r * nb + b]), gacc[r]);
        }
      }
      const __m128 sv = _mm_set1_ps(sr[g]);
      for (int r = 0; r < R; ++r) acc[r] = _mm_fmadd_ps(gacc[r], sv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      __m128 v = acc[r];
      v = _mm_hadd_ps(v, v);
      v = _mm_hadd_ps(v, v);
      const float f = _mm_cvtss_f32(v);
      out[r * N + n] = acc_out ? out[r * N + n] + f : f;
    }
  }
}

}  // namespace

struct QuantRows {  // activations quantized to int8 blocks of 32
  int64_t M, K, nb;
  std::vector<int8_t> xq;
  std::vector<float> dx, xs;
  QuantRows(const float* x, int64_t M_, int64_t K_) : M(M_), K(K_), nb(K_ / 32), xq(M_ * K_), dx(M_ * nb), xs(M_ * nb) {
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, xq.data() + m * K, dx.data() + m * nb, xs.data() + m * nb);
  }
};

void check_matrix(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zero, int64_t K, int64_t G) {
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.dim() == 2 && w.size(1) * 2 == K,
              "weight: uint8 (N, K/2) contiguous");
  TORCH_CHECK(K % 32 == 0 && G % 32 == 0 && G > 0, "K and the group size must be multiples of 32");
  const int64_t ng = (K + G - 1) / G;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.size(0) == w.size(0) &&
              scale.size(1) == ng, "scale: (N, groups) fp32 contiguous");
  if (zero.numel() > 0) TORCH_CHECK(zero.sizes() == scale.sizes() && zero.is_contiguous() &&
                                    zero.scalar_type() == torch::kFloat32, "zero: like scale");
}

// out (M, N) = or += X @ W.T for the quantized rows X
void matmul_rows(const QuantRows& X, const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zero,
                 int64_t G, float* out, bool accumulate) {
  const int64_t K = X.K, N = w.size(0), nb = X.nb, ng = (K + G - 1) / G, bpg = G / 32, M = X.M;
  std::vector<float> xg(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) xg[m * ng + b / bpg] += X.xs[m * nb + b];
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.numel() > 0 ? zero.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(16, (int64_t)262144 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t r = std::min<int64_t>(MB, M - m);
      const int8_t* xqm = X.xq.data() + m * K;
      const float* dxm = X.dx.data() + m * nb;
      const float* xgm = xg.data() + m * ng;
      float* o = out + m * N;
#define SLIM_ROWS(R) \
      if (accumulate) rows_kernel<R, true>(wp, xqm, dxm, xgm, sp, zp, K, G, ng, n0, n1, o, N); \
      else rows_kernel<R, false>(wp, xqm, dxm, xgm, sp, zp, K, G, ng, n0, n1, o, N);
      switch (r) {
        case 4: { SLIM_ROWS(4) break; }
        case 3: { SLIM_ROWS(3) break; }
        case 2: { SLIM_ROWS(2) break; }
        default: { SLIM_ROWS(1) break; }
      }
#undef SLIM_ROWS
    }
  });
}

// x: (M, K) fp32 contiguous -> (M, N) fp32
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (M, K) contiguous fp32");
  check_matrix(w, scale, zero, x.size(1), G);
  QuantRows X(x.data_ptr<float>(), x.size(0), x.size(1));
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  matmul_rows(X, w, scale, zero, G, out.data_ptr<float>(), false);
  return out;
}

// one call for a whole compressed layer: y = x W^T + (x A^T) B^T, x quantized once for W and A
torch::Tensor lowrank_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero, int64_t G,
                             torch::Tensor a, torch::Tensor a_scale, int64_t Ga, torch::Tensor b,
                             torch::Tensor b_scale, int64_t Gb) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  const auto in_dtype = x.scalar_type();  // fp32, bf16 or fp16 in and out; fp32 inside
  x = in_dtype == torch::kFloat32 ? x.contiguous() : x.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  check_matrix(w, scale, zero, K, G);
  torch::Tensor none = torch::empty({0}, x.options());
  check_matrix(a, a_scale, none, K, Ga);
  check_matrix(b, b_scale, none, R, Gb);
  TORCH_CHECK(b.size(0) == w.size(0), "B must have as many rows as W");
  QuantRows X(x.data_ptr<float>(), M, K);
  auto out = torch::empty({M, w.size(0)}, x.options());
  auto t = torch::empty({M, R}, x.options());
  matmul_rows(X, a, a_scale, none, Ga, t.data_ptr<float>(), false);
  matmul_rows(X, w, scale, zero, G, out.data_ptr<float>(), false);
  QuantRows T(t.data_ptr<float>(), M, R);
  matmul_rows(T, b, b_scale, none, Gb, out.data_ptr<float>(), true);
  return in_dtype == torch::kFloat32 ? out : out.to(in_dtype);
}


void matmul_rows_24(const QuantRows& X, const torch::Tensor& vals, const torch::Tensor& idx, const torch::Tensor& scale,
                    int64_t G, float* out) {
  const int64_t K = X.K, N = vals.size(0), nb = X.nb, ng = (K + G - 1) / G, M = X.M;
  TORCH_CHECK(vals.scalar_type() == torch::kUInt8 && vals.is_contiguous() && vals.size(1) * 4 == K,
              "2:4 values: uint8 (N, K/4)");
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 && idx.is_contiguous() && idx.size(0) == N && idx.size(1) == nb,
              "2:4 positions: int32 (N, K/32)");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.size(0) == N &&
              scale.size(1) == ng, "scale: (N, groups) fp32");
  const uint8_t* vp = vals.data_ptr<uint8_t>();
  const uint32_t* ip = reinterpret_cast<const uint32_t*>(idx.data_ptr<int32_t>());
  const float* sp = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, (int64_t)262144 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t r = std::min<int64_t>(MB, M - m);
      const int8_t* xqm = X.xq.data() + m * K;
      const float* dxm = X.dx.data() + m * nb;
      float* o = out + m * N;
      switch (r) {
        case 4: rows_kernel_24<4>(vp, ip, xqm, dxm, sp, K, G, ng, n0, n1, o, N, false); break;
        case 3: rows_kernel_24<3>(vp, ip, xqm, dxm, sp, K, G, ng, n0, n1, o, N, false); break;
        case 2: rows_kernel_24<2>(vp, ip, xqm, dxm, sp, K, G, ng, n0, n1, o, N, false); break;
        default: rows_kernel_24<1>(vp, ip, xqm, dxm, sp, K, G, ng, n0, n1, o, N, false); break;
      }
    }
  });
}

// y = x W^T (+ (x A^T) B^T when A has rows) for a 2:4 W stored as kept codes + positions
torch::Tensor sparse24_linear(torch::Tensor x, torch::Tensor vals, torch::Tensor idx, torch::Tensor scale, int64_t G,
                              torch::Tensor a, torch::Tensor a_scale, int64_t Ga, torch::Tensor b,
                              torch::Tensor b_scale, int64_t Gb) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  TORCH_CHECK(G % 32 == 0 && G > 0, "group size must be a multiple of 32");
  const auto in_dtype = x.scalar_type();
  x = in_dtype == torch::kFloat32 ? x.contiguous() : x.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  QuantRows X(x.data_ptr<float>(), M, K);
  auto out = torch::empty({M, vals.size(0)}, x.options());
  matmul_rows_24(X, vals, idx, scale, G, out.data_ptr<float>());
  if (a.numel() > 0) {
    const int64_t R = a.size(0);
    torch::Tensor none = torch::empty({0}, x.options());
    check_matrix(a, a_scale, none, K, Ga);
    check_matrix(b, b_scale, none, R, Gb);
    auto t = torch::empty({M, R}, x.options());
    matmul_rows(X, a, a_scale, none, Ga, t.data_ptr<float>(), false);
    QuantRows T(t.data_ptr<float>(), M, R);
    matmul_rows(T, b, b_scale, none, Gb, out.data_ptr<float>(), true);
  }
  return in_dtype == torch::kFloat32 ? out : out.to(in_dtype);
}


// the dense (N, K) fp32 weight of a 2:4 matrix (for the GEMM path at many tokens)
torch::Tensor sparse24_dequant(torch::Tensor vals, torch::Tensor idx, torch::Tensor scale, int64_t G) {
  const int64_t N = vals.size(0), K = vals.size(1) * 4, nb = K / 32, ng = (K + G - 1) / G;
  TORCH_CHECK(vals.is_contiguous() && idx.is_contiguous() && scale.is_contiguous() && scale.size(1) == ng,
              "contiguous 2:4 values, positions and (N, groups) scales");
  auto w = torch::zeros({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* vp = vals.data_ptr<uint8_t>();
  const uint32_t* ip = reinterpret_cast<const uint32_t*>(idx.data_ptr<int32_t>());
  const float* sp = scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const uint32_t word = ip[n * nb + b];
        for (int j = 0; j < 16; ++j) {  // kept j of the block: group j / 2, position in byte j % 4, field j / 4
          const int pos = (word >> (8 * (j % 4) + 2 * (j / 4))) & 3;
          const uint8_t byte = vp[n * (K / 4) + b * 8 + j / 2];
          const int code = ((j & 1) ? (byte >> 4) : (byte & 15)) - 8;
          const int64_t k = b * 32 + (j / 2) * 4 + pos;
          wp[n * K + k] = (float)code * sp[n * ng + k / G];
        }
      }
  });
  return w;
}

// the dense (N, K) fp32 weight of a dense int4 matrix
torch::Tensor int4_dequant(torch::Tensor w, torch::Tensor scale, torch::Tensor zero, int64_t G) {
  const int64_t N = w.size(0), K = w.size(1) * 2, ng = (K + G - 1) / G;
  check_matrix(w, scale, zero, K, G);
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* p = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.numel() > 0 ? zero.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < K / 32; ++b)
        for (int j = 0; j < 32; ++j) {
          const uint8_t byte = p[n * (K / 2) + b * 16 + (j % 16)];
          const int q = j < 16 ? (byte & 15) : (byte >> 4);
          const int64_t k = b * 32 + j, g = k / G;
          o[n * K + k] = (float)(q - 8) * sp[n * ng + g] + (zp ? zp[n * ng + g] : 0.f);
        }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemv", &int4_gemv, "int4 weight x int8-quantized activation GEMV (AVX2)");
  m.def("lowrank_linear", &lowrank_linear, "x W^T + (x A^T) B^T with int4 W, A, B in one call");
  m.def("sparse24_dequant", &sparse24_dequant, "dense fp32 weight of a 2:4 matrix");
  m.def("int4_dequant", &int4_dequant, "dense fp32 weight of an int4 matrix");
  m.def("sparse24_linear", &sparse24_linear, "2:4 int4 W (3 bits a weight) + optional int4 adapters");
}
