// slim's CPU int4 GEMV for few tokens (AVX2 + FMA), built on first use by torch.utils.cpp_extension.
//
// Weights: uint8 (N, K/2), per row blocks of 32 weights in 16 bytes, byte j = q[j] | q[j + 16] << 4, q in 0..15
// meaning w = (q - 8) * scale[n, g] + zero[n, g] with g = k / G (G a multiple of 32; the last group may be short).
// Activations are quantized to int8 with one scale per 16 inputs (scale = max|x| / 127) inside the call, so a block's
// dot product is one _mm256_maddubs_epi16 (u8 weights x s8 activations) instead of 32 float conversions and FMAs;
// a block's 8 int32 partial sums then meet a vector of its two half-block scales (same cost as one broadcast scale,
// half the activation rounding error of a scale per 32 on outlier-heavy rows).
#include "linears.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
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

// sums of 4 adjacent u8 x s8 products in each int32 lane: one VNNI instruction where the build has it (see
// kernels/native.py), else maddubs + madd; both exact here (|products| are far from int16 saturation)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dot4(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
inline __m128i dot4(__m128i u, __m128i s) { return _mm_dpbusd_epi32(_mm_setzero_si128(), u, s); }
#else
inline __m256i dot4(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
inline __m128i dot4(__m128i u, __m128i s) { return _mm_madd_epi16(_mm_maddubs_epi16(u, s), _mm_set1_epi16(1)); }
#endif

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define SLIM_QUAD24 1  // four blocks of 32 (one per 128-bit lane) per 512-bit step, activations as `QuantRows::xp`
#endif

// one row of activations -> int8 with a float scale per 16 inputs (dx: 2 per block of 32), and each block's
// dequantized sum
void quantize_row(const float* x, int64_t K, int8_t* xq, float* dx, float* xs) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < K / 32; ++b) {
    float sum = 0.f;
    for (int h = 0; h < 2; ++h) {  // AVX2, the same arithmetic as a scalar loop: round half to even, as nearbyint
      const float* p = x + b * 32 + h * 16;
      const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
      const __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m256 iv = _mm256_set1_ps(inv);
      const __m256i q0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, iv), _MM_FROUND_TO_NEAREST_INT |
                                                                                      _MM_FROUND_NO_EXC));
      const __m256i q1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, iv), _MM_FROUND_TO_NEAREST_INT |
                                                                                      _MM_FROUND_NO_EXC));
      const __m128i w0 = _mm_packs_epi32(_mm256_castsi256_si128(q0), _mm256_extracti128_si256(q0, 1));
      const __m128i w1 = _mm_packs_epi32(_mm256_castsi256_si128(q1), _mm256_extracti128_si256(q1, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * 32 + h * 16), _mm_packs_epi16(w0, w1));
      __m128i s4 = _mm_add_epi32(_mm_add_epi32(_mm256_castsi256_si128(q0), _mm256_extracti128_si256(q0, 1)),
                                 _mm_add_epi32(_mm256_castsi256_si128(q1), _mm256_extracti128_si256(q1, 1)));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      dx[2 * b + h] = d;
      sum += d * (float)_mm_cvtsi128_si32(s4);
    }
    xs[b] = sum;
  }
}

constexpr int MB = 4;  // activation rows per weight pass

template <int R, bool ACC>
void rows_kernel(const uint8_t* w, const int8_t* xq, const float* dv, const float* xg, const float* scale,
                 const float* zero, int64_t K, int64_t G, int64_t ng, int64_t n0, int64_t n1, float* out, int64_t N,
                 const uint8_t* xp, const float* dq) {
  // dv[(r * nb + b) * 8 ..]: block b's scales as its partial sums need them (int32 lanes 0-3 cover inputs 0-15);
  // xg[r * ng + g]: the group's sum of (dequantized) activations, for the -8 offset and the zero points.
  // With SLIM_QUAD24, blocks 4i..4i+3 inside one group take one 512-bit step: their bytes split into low nibbles
  // (inputs 0-15 of each block, one per lane) and high (16-31), dotted with the quad's activation halves in `xp`
  // (offset by 128: less the weights' 128 sum q, once per step) and scaled by `dq` (per quad, 16 + 16 floats)
  const int64_t nb = K / 32, bpg = G / 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
#ifdef SLIM_QUAD24
  const int64_t nq = nb / 4;
  const __m512i low4 = _mm512_set1_epi8(0x0F), u4 = _mm512_set1_epi8(-128);
  (void)nq;
#endif
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
#ifdef SLIM_QUAD24
      if (xp != nullptr && !(b & 3)) {
        __m512 gq[R];
        for (int r = 0; r < R; ++r) gq[r] = _mm512_setzero_ps();
        for (; b + 3 < b1 && b / 4 < nq; b += 4) {
          const __m512i raw = _mm512_loadu_si512(wr + b * 16);
          const __m512i ql = _mm512_and_si512(raw, low4), qh = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          const __m512i cl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u4, ql);
          const __m512i ch = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u4, qh);
          for (int r = 0; r < R; ++r) {
            const uint8_t* xr = xp + r * K + b * 32;  // quad b / 4: [16 low inputs of each block, 16 high]
            const float* d = dq + (r * nq + b / 4) * 32;
            const __m512i pl = _mm512_sub_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xr), ql), cl);
            const __m512i ph = _mm512_sub_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xr + 64), qh), ch);
            gq[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl), _mm512_loadu_ps(d), gq[r]);
            gq[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ph), _mm512_loadu_ps(d + 16), gq[r]);
          }
        }
        for (int r = 0; r < R; ++r)
          gacc[r] = _mm256_add_ps(gacc[r], _mm256_add_ps(_mm512_castps512_ps256(gq[r]), _mm256_castpd_ps(
              _mm512_extractf64x4_pd(_mm512_castps_pd(gq[r]), 1))));
      }
#endif
      for (; b + 1 < b1; b += 2) {  // two blocks (64 weights, 32 bytes) per step
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 16));
        __m256i lo = _mm256_and_si256(raw, low);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        __m256i q0 = _mm256_permute2x128_si256(lo, hi, 0x20);
        __m256i q1 = _mm256_permute2x128_si256(lo, hi, 0x31);
        for (int r = 0; r < R; ++r) {
          const int8_t* xr = xq + r * K + b * 32;
          __m256i p0 = dot4(q0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr)));
          __m256i p1 = dot4(q1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32)));
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_loadu_ps(dv + (r * nb + b) * 8), gacc[r]);
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_loadu_ps(dv + (r * nb + b + 1) * 8), gacc[r]);
        }
      }
      for (; b < b1; ++b) {
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + b * 16));
        __m128i l4 = _mm_set1_epi8(0x0F);
        __m256i qv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), l4), _mm_and_si128(raw, l4));
        for (int r = 0; r < R; ++r) {
          __m256i p = dot4(qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * 32)));
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(dv + (r * nb + b) * 8), gacc[r]);
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


// 2:4 rows, in the run-time's paired layout: per row, pair p of blocks (2p, 2p+1) of 32 inputs is 16 bytes, byte j
// = q_j(2p) | q_j(2p+1) << 4 with q = c + 8 the j-th kept code of the block (an odd last block leaves the high nibbles
// 0), and per block one 32-bit word of the kept codes' positions inside their group of 4 (byte k: kept k, k+4, k+8,
// k+12 in bits 0-1, 2-3, 4-5, 6-7). 3 bits a weight are read. One 256-bit step per pair, a block per 128-bit lane:
// the 16 bytes broadcast to both lanes and masked (lane 0 keeps q, lane 1 16 q), minus (8, 128): signed codes c and
// 16 c, exact in int8. The kept activations are gathered with a byte shuffle from `xp` (QuantRows::pairs: per pair,
// bytes [b 0-15, b+1 0-15, b 16-31, b+1 16-31] offset by 128 to unsigned), so one u8 x s8 dot per lane gives
// sum (x + 128) c, and 128 sum c (the weights' own, once per pair for every row) comes off: sum x c exactly. Lane 1's
// factor 16 is in its scales (`dp`, a power of two: exact). A lane's 4 int32 partial sums cover inputs 0-7, 8-15,
// 16-23, 24-31 of its block (kept j lies in group of 4 j / 2). A pair whose blocks lie in two scale groups takes
// both groups' scales in one vector.
inline __m256i ctrl24(const uint32_t* words) {  // the two blocks' shuffle controls, one per lane
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i base = _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12,
                                        0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  __m256i w = _mm256_permutevar8x32_epi32(
      _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(words))), spread);
  return _mm256_add_epi8(base, _mm256_and_si256(_mm256_srlv_epi32(w, shifts), three));
}

// where pair p's activations sit in `xp` (QuantRows::pairs): pairs go in quads of two, [b 0-15, b+1 0-15, b+2 0-15,
// b+3 0-15, b 16-31, b+1 16-31, b+2 16-31, b+3 16-31] (a 512-bit step reads each half with one load), an odd last
// pair alone as [b 0-15, b+1 0-15, b 16-31, b+1 16-31]. Offsets of its inputs 0-15 and 16-31 halves.
inline int64_t pair_lo(int64_t p, int64_t np) { return (p | 1) < np ? (p & ~int64_t(1)) * 64 + (p & 1) * 32 : p * 64; }
inline int64_t pair_hi(int64_t p, int64_t np) { return pair_lo(p, np) + ((p | 1) < np ? 64 : 32); }


// sum x c per int32 lane from the gathered offset activations sel = x + 128 and the signed codes c: with VNNI one
// u8 x s8 dot less the weights' 128 sum c (`corr`); without it maddubs would saturate its int16 pairs on x + 128, so
// the sign trick on x itself: |c| (unsigned, <= 128) times x carrying c's sign, within int16
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dot24(__m256i sel, __m256i c, __m256i corr) { return _mm256_sub_epi32(dot4(sel, c), corr); }
inline __m128i dot24(__m128i sel, __m128i c, __m128i corr) { return _mm_sub_epi32(dot4(sel, c), corr); }
inline __m256i corr24(__m256i c) { return dot4(_mm256_set1_epi8(-128), c); }
inline __m128i corr24(__m128i c) { return dot4(_mm_set1_epi8(-128), c); }
#else
inline __m256i dot24(__m256i sel, __m256i c, __m256i) {
  return dot4(_mm256_abs_epi8(c), _mm256_sign_epi8(_mm256_xor_si256(sel, _mm256_set1_epi8(-128)), c));
}
inline __m128i dot24(__m128i sel, __m128i c, __m128i) {
  return dot4(_mm_abs_epi8(c), _mm_sign_epi8(_mm_xor_si128(sel, _mm_set1_epi8(-128)), c));
}
inline __m256i corr24(__m256i) { return _mm256_setzero_si256(); }
inline __m128i corr24(__m128i) { return _mm_setzero_si128(); }
#endif

template <int R>
void rows_kernel_24(const uint8_t* vals, const uint32_t* idx, const int8_t* xq, const float* dx, const uint8_t* xp,
                    const float* dp, const float* scale, int64_t K, int64_t G, int64_t ng, int64_t n0, int64_t n1,
                    float* out, int64_t N, bool acc_out) {
  const int64_t nb = K / 32, bpg = G / 32, np = nb / 2, row_bytes = (nb + 1) / 2 * 16;
  const __m256i mask = _mm256_setr_epi8(15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
                                        -16, -16, -16, -16, -16, -16, -16, -16, -16, -16, -16, -16, -16, -16, -16, -16);
  const __m256i off = _mm256_setr_epi8(8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, -128, -128, -128, -128,
                                       -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128);
#ifdef SLIM_QUAD24
  const __m512i mask4 = _mm512_broadcast_i64x4(mask), off4 = _mm512_broadcast_i64x4(off);
  const __m512i u4 = _mm512_set1_epi8(-128), three4 = _mm512_set1_epi8(3);
  const __m512i spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i shifts4 = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
  const __m512i base4 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12));
  const __m512i dup = _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3);
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* vr = vals + n * row_bytes;
    const uint32_t* ir = idx + n * nb;
    const float* sr = scale + n * ng;
    __m256 acc[R], gacc[R];
    for (int r = 0; r < R; ++r) acc[r] = gacc[r] = _mm256_setzero_ps();
#ifdef SLIM_QUAD24
    __m512 gq[R];
    for (int r = 0; r < R; ++r) gq[r] = _mm512_setzero_ps();
#endif
    int64_t g = 0, gend = bpg;  // the group gacc holds, and its first block past the end
    for (int64_t p = 0; p < np; ++p) {
      const int64_t b = 2 * p;
      if (b >= gend) {  // the pair starts a later group: fold the finished one in
        const __m256 sv = _mm256_set1_ps(sr[g]);
        for (int r = 0; r < R; ++r) {
#ifdef SLIM_QUAD24
          gacc[r] = _mm256_add_ps(gacc[r], _mm256_add_ps(_mm512_castps512_ps256(gq[r]), _mm256_castpd_ps(
              _mm512_extractf64x4_pd(_mm512_castps_pd(gq[r]), 1))));
          gq[r] = _mm512_setzero_ps();
#endif
          acc[r] = _mm256_fmadd_ps(gacc[r], sv, acc[r]);
          gacc[r] = _mm256_setzero_ps();
        }
        g = b / bpg, gend = (g + 1) * bpg;
      }
#ifdef SLIM_QUAD24
      if (!(p & 1) && p + 1 < np && b + 3 < gend) {  // pairs p, p + 1 in one group: one 512-bit step
        const __m512i v = _mm512_permutexvar_epi64(dup, _mm512_castsi256_si512(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + p * 16))));
        const __m512i c = _mm512_sub_epi8(_mm512_and_si512(v, mask4), off4);
        const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u4, c);
        const __m512i w = _mm512_permutexvar_epi32(spread4, _mm512_castsi128_si512(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(ir + b))));
        const __m512i ctrl = _mm512_add_epi8(base4, _mm512_and_si512(_mm512_srlv_epi32(w, shifts4), three4));
        for (int r = 0; r < R; ++r) {
          const uint8_t* xr = xp + r * K + p * 64;
          const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
          const __m512i sel = _mm512_mask_blend_epi32(0xCCCC, _mm512_shuffle_epi8(x0, ctrl),
                                                      _mm512_shuffle_epi8(x1, ctrl));
          const __m512i pi = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), sel, c), corr);
          gq[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pi), _mm512_loadu_ps(dp + (r * np + p) * 8), gq[r]);
        }
        ++p;
        continue;
      }
#endif
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + p * 16)));
      const __m256i c = _mm256_sub_epi8(_mm256_and_si256(v, mask), off);
      const __m256i corr = corr24(c);
      const __m256i ctrl = ctrl24(ir + b);
      const bool split = b + 1 >= gend;  // block b + 1 opens the next group
      __m256 s2 = _mm256_setzero_ps();
      if (split) s2 = _mm256_setr_m128(_mm_set1_ps(sr[g]), _mm_set1_ps(sr[(b + 1) / bpg]));
      const int64_t lo = pair_lo(p, np), hi = pair_hi(p, np);
      for (int r = 0; r < R; ++r) {
        const uint8_t* xr = xp + r * K;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + lo));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + hi));
        const __m256i sel = _mm256_blend_epi32(_mm256_shuffle_epi8(x0, ctrl), _mm256_shuffle_epi8(x1, ctrl), 0xCC);
        const __m256 f = _mm256_cvtepi32_ps(dot24(sel, c, corr));
        const __m256 d = _mm256_loadu_ps(dp + (r * np + p) * 8);
        if (split) acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(f, d), s2, acc[r]);
        else gacc[r] = _mm256_fmadd_ps(f, d, gacc[r]);
      }
    }
    {
      const __m256 sv = _mm256_set1_ps(sr[g]);
      for (int r = 0; r < R; ++r) {
#ifdef SLIM_QUAD24
        gacc[r] = _mm256_add_ps(gacc[r], _mm256_add_ps(_mm512_castps512_ps256(gq[r]), _mm256_castpd_ps(
            _mm512_extractf64x4_pd(_mm512_castps_pd(gq[r]), 1))));
#endif
        acc[r] = _mm256_fmadd_ps(gacc[r], sv, acc[r]);
      }
    }
    float tail[R] = {};
    if (nb & 1) {  // the odd last block, alone (128-bit, from the plain activations)
      const int64_t b = nb - 1;
      const __m128i three = _mm_set1_epi8(3), base = _mm_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + np * 16));
      const __m128i c = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(15)), _mm_set1_epi8(8));
      const __m128i u = _mm_set1_epi8(-128), corr = corr24(c);
      const __m128i ctrl = _mm_add_epi8(base, _mm_and_si128(
          _mm_srlv_epi32(_mm_set1_epi32((int)ir[b]), _mm_setr_epi32(0, 2, 4, 6)), three));
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = xq + r * K + b * 32;
        const __m128i xlo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr));
        const __m128i xhi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + 16));
        const __m128i sel = _mm_xor_si128(
            _mm_blend_epi32(_mm_shuffle_epi8(xlo, ctrl), _mm_shuffle_epi8(xhi, ctrl), 0xC), u);
        const float* d = dx + (r * nb + b) * 2;  // int32 lanes 0-1 sum inputs 0-15, lanes 2-3 inputs 16-31
        __m128 f = _mm_mul_ps(_mm_cvtepi32_ps(dot24(sel, c, corr)), _mm_setr_ps(d[0], d[0], d[1], d[1]));
        f = _mm_add_ps(f, _mm_movehl_ps(f, f));
        f = _mm_add_ss(f, _mm_movehdup_ps(f));
        tail[r] = _mm_cvtss_f32(f) * sr[b / bpg];
      }
    }
    for (int r = 0; r < R; ++r) {
      const float f = hsum(acc[r]) + tail[r];
      out[r * N + n] = acc_out ? out[r * N + n] + f : f;
    }
  }
}

// int8 rows (the quantized lm_head): per block of 32 inputs one maddubs of |w| (unsigned) with x carrying w's sign;
// fp32 scales per group of G inputs (one per row for per-channel)
template <int R>
void rows_kernel_i8(const int8_t* w, const int8_t* xq, const float* dv, const float* scale, int64_t K, int64_t G,
                    int64_t ng, int64_t n0, int64_t n1, float* out, int64_t N, bool acc_out) {
  const int64_t nb = K / 32, bpg = G / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    const float* sr = scale + n * ng;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t b0 = g * bpg, b1 = std::min(nb, b0 + bpg);
      __m256 gacc[R];
      for (int r = 0; r < R; ++r) gacc[r] = _mm256_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32));
        const __m256i aw = _mm256_abs_epi8(wv);
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * 32));
          const __m256i p = dot4(aw, _mm256_sign_epi8(xv, wv));
          gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(dv + (r * nb + b) * 8), gacc[r]);
        }
      }
      const __m256 sv = _mm256_set1_ps(sr[g]);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(gacc[r], sv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      const float f = hsum(acc[r]);
      out[r * N + n] = acc_out ? out[r * N + n] + f : f;
    }
  }
}

}  // namespace

// activations quantized to int8 with a scale per 16 inputs; the buffers are reused from call to call (see
// Workspace), so a forward pass does not churn the heap with per-layer transients
struct QuantRows {
  int64_t M = 0, K = 0, nb = 0;
  std::vector<int8_t> xq;
  std::vector<float> dx, xs;  // dx: (M, nb, 2) half-block scales; xs: (M, nb) block sums
  // the dense kernel's scale vectors, built on first use: per block, its half-block scales 4 times each
  mutable std::vector<float> dv;
  mutable bool expanded = false;
  // the layout of the 2:4 kernel's two-block steps, built on first use: per pair of blocks (b, b+1), bytes
  // [b 0-15, b+1 0-15, b 16-31, b+1 16-31] and the four half-block scales twice each
  mutable std::vector<uint8_t> xp;
  mutable std::vector<float> dp;
  mutable bool paired = false;
  // the dense kernel's 512-bit steps (SLIM_QUAD24), built on first use: per quad of blocks, the 4 blocks' first
  // half-block scales 4 times each, then their second
  mutable std::vector<float> dq;
  mutable bool quadded = false;

  void load(const float* x, int64_t M_, int64_t K_) {
    M = M_, K = K_, nb = K_ / 32, paired = false, expanded = false, quadded = false;
    xq.resize(M * K), dx.resize(M * nb * 2), xs.resize(M * nb);
    for (int64_t m = 0; m < M; ++m)
      quantize_row(x + m * K, K, xq.data() + m * K, dx.data() + m * nb * 2, xs.data() + m * nb);
  }
  void quads() const {
    if (quadded) return;
    quadded = true;
    pairs();
    const int64_t nq = nb / 4;
    dq.resize(std::max<int64_t>(1, M * nq * 32));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t q = 0; q < nq; ++q)
        for (int i = 0; i < 32; ++i)
          dq[(m * nq + q) * 32 + i] = dx[(m * nb + 4 * q + (i % 16) / 4) * 2 + i / 16];
  }
  void expand() const {
    if (expanded) return;
    expanded = true;
    dv.resize(std::max<int64_t>(1, M * nb * 8));
    for (int64_t i = 0; i < M * nb; ++i)
      for (int j = 0; j < 8; ++j) dv[i * 8 + j] = dx[i * 2 + j / 4];
  }
  void pairs() const {
    if (paired) return;
    paired = true;
    const int64_t np = nb / 2;
    xp.resize(M * K);
    dp.resize(std::max<int64_t>(1, M * np * 8));
    const __m128i u = _mm_set1_epi8(-128);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < np; ++p) {
        const int8_t* src = xq.data() + m * K + p * 64;
        uint8_t* dst = xp.data() + m * K;
        auto put = [&](int64_t at, int from) {  // 16 activations, offset by 128 (x ^ 0x80 = x + 128 as unsigned)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + at), _mm_xor_si128(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + from)), u));
        };
        const int64_t lo = pair_lo(p, np), hi = pair_hi(p, np);  // see rows_kernel_24
        put(lo, 0), put(lo + 16, 32), put(hi, 16), put(hi + 16, 48);
        for (int i = 0; i < 8; ++i)  // lane 1's codes come times 16: its scales divided by 16 (exact)
          dp[(m * np + p) * 8 + i] = dx[(m * nb + 2 * p) * 2 + i / 2] * (i < 4 ? 1.f : 0.0625f);
      }
  }
  // per row, the sums of the (dequantized) activations of each group of G inputs: the -8 offset and zero points
  const float* group_sums(int64_t G, std::vector<float>& xg) const {
    const int64_t ng = (K + G - 1) / G, bpg = G / 32;
    xg.assign(M * ng, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) xg[m * ng + b / bpg] += xs[m * nb + b];
    return xg.data();
  }
};


// rows [n0, n1) of out (M, ldo) = or += X @ W.T
struct Task {
  const Mat* mat;
  int64_t n0, n1;
  const QuantRows* X;
  const float* xg;
  float* out;
  int64_t ldo;
  bool acc;
};

// per-thread buffers that only grow: the input's quantized rows, the adapters' intermediate rows and group sums
struct Workspace {
  QuantRows x;
  std::vector<QuantRows> t;
  std::vector<std::vector<float>> t_out, sums;
  std::vector<Task> tasks;
  template <class T>
  static T& slot(std::vector<T>& pool, size_t i) {
    if (pool.size() <= i) pool.resize(i + 1);
    return pool[i];
  }
};
thread_local Workspace workspace;

void run_task(const Task& t) {
  const Mat& W = *t.mat;
  const QuantRows& X = *t.X;
  const int64_t K = W.K, nb = X.nb;
  const float* sp = W.scale.data_ptr<float>();
  for (int64_t m = 0; m < X.M; m += MB) {
    const int64_t r = std::min<int64_t>(MB, X.M - m);
    const int8_t* xqm = X.xq.data() + m * K;
    const float* dxm = X.dx.data() + m * nb * 2;
    float* o = t.out + m * t.ldo;
    if (W.kind == Mat::SPARSE24) {
      const uint8_t* vp = W.w.data_ptr<uint8_t>();
      const uint32_t* ip = reinterpret_cast<const uint32_t*>(W.idx.data_ptr<int32_t>());
      const uint8_t* xpm = X.xp.data() + m * K;
      const float* dpm = X.dp.data() + m * (nb / 2) * 8;
#define SLIM_ROWS24(R) rows_kernel_24<R>(vp, ip, xqm, dxm, xpm, dpm, sp, K, W.G, W.ng, t.n0, t.n1, o, t.ldo, t.acc);
      switch (r) {
        case 4: SLIM_ROWS24(4) break;
        case 3: SLIM_ROWS24(3) break;
        case 2: SLIM_ROWS24(2) break;
        default: SLIM_ROWS24(1) break;
      }
#undef SLIM_ROWS24
    } else if (W.kind == Mat::INT8) {
      const int8_t* wp = W.w.data_ptr<int8_t>();
      const float* dvm = X.dv.data() + m * nb * 8;
#define SLIM_ROWS8(R) rows_kernel_i8<R>(wp, xqm, dvm, sp, K, W.G, W.ng, t.n0, t.n1, o, t.ldo, t.acc);
      switch (r) {
        case 4: SLIM_ROWS8(4) break;
        case 3: SLIM_ROWS8(3) break;
        case 2: SLIM_ROWS8(2) break;
        default: SLIM_ROWS8(1) break;
      }
#undef SLIM_ROWS8
    } else {
      const uint8_t* wp = W.w.data_ptr<uint8_t>();
      const float* zp = W.zero.numel() > 0 ? W.zero.data_ptr<float>() : nullptr;
      const float* xgm = t.xg + m * W.ng;
      const float* dvm = X.dv.data() + m * nb * 8;
#ifdef SLIM_QUAD24
      const uint8_t* xpq = X.quadded ? X.xp.data() + m * K : nullptr;
      const float* dqm = X.quadded ? X.dq.data() + m * (nb / 4) * 32 : nullptr;
#else
      const uint8_t* xpq = nullptr;
      const float* dqm = nullptr;
#endif
#define SLIM_ROWS(R) \
      if (t.acc) rows_kernel<R, true>(wp, xqm, dvm, xgm, sp, zp, K, W.G, W.ng, t.n0, t.n1, o, t.ldo, xpq, dqm); \
      else rows_kernel<R, false>(wp, xqm, dvm, xgm, sp, zp, K, W.G, W.ng, t.n0, t.n1, o, t.ldo, xpq, dqm);
      switch (r) {
        case 4: { SLIM_ROWS(4) break; }
        case 3: { SLIM_ROWS(3) break; }
        case 2: { SLIM_ROWS(2) break; }
        default: { SLIM_ROWS(1) break; }
      }
#undef SLIM_ROWS
    }
  }
}

// split W's rows into tasks of about the same work
void add_tasks(std::vector<Task>& tasks, const Mat& W, const QuantRows& X, const float* xg, float* out, int64_t ldo,
               bool acc) {
  if (W.kind == Mat::SPARSE24) X.pairs();
  else X.expand();
#ifdef SLIM_QUAD24
  if (W.kind == Mat::DENSE4 && W.G % 128 == 0 && X.nb >= 4) X.quads();
#endif
  // a few large tasks per thread: long contiguous row ranges keep the hardware prefetcher streaming
  const int64_t per = 2 * at::get_num_threads();
  const int64_t rows = std::max<int64_t>(16, (W.N + per - 1) / per);
  for (int64_t n0 = 0; n0 < W.N; n0 += rows) tasks.push_back({&W, n0, std::min(W.N, n0 + rows), &X, xg, out, ldo, acc});
}

// all tasks in one parallel region, handed out one at a time (layers of different widths and layouts balance)
void run_tasks(const std::vector<Task>& tasks) {
  int64_t work = 0;
  for (const Task& t : tasks) work += (t.n1 - t.n0) * t.mat->K * t.X->M;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (int64_t)tasks.size());
  if (nt <= 1 || work < 65536) {
    for (const Task& t : tasks) run_task(t);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t n = (int64_t)tasks.size();
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) run_task(tasks[i]);
  });
}

torch::Tensor as_fp32(const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat32 ? x.contiguous() : x.to(torch::kFloat32).contiguous();
}

void Linears::add(torch::Tensor w, torch::Tensor idx, torch::Tensor scale, torch::Tensor zero, int64_t G,
                  torch::Tensor a, torch::Tensor a_scale, int64_t Ga, torch::Tensor b, torch::Tensor b_scale,
                  int64_t Gb) {
  Layer L;
  L.W = Mat(w, idx, scale, zero, K_, G);
  if (a.numel() > 0) {
    torch::Tensor none = torch::empty({0}), no_idx = torch::empty({0}, torch::kInt32);
    L.A = Mat(a, no_idx, a_scale, none, K_, Ga);
    L.B = Mat(b, no_idx, b_scale, none, L.A.N, Gb);
    TORCH_CHECK(L.B.N == L.W.N, "B must have as many rows as W");
    L.adapters = true;
  }
  layers_.push_back(std::move(L));
}

void Linears::run(const float* x, int64_t M, float* const* outs) const {
  Workspace& ws = workspace;
  ws.x.load(x, M, K_);
  const QuantRows& X = ws.x;
  const size_t n = layers_.size();
  std::vector<Task>& tasks = ws.tasks;
  tasks.clear();
  // sized before any slot is referenced: tasks keep pointers into them
  Workspace::slot(ws.sums, 3 * n), Workspace::slot(ws.t, n), Workspace::slot(ws.t_out, n);
  size_t k = 0;  // group-sum slots
  bool adapters = false;
  for (size_t l = 0; l < n; ++l) {
    const Layer& L = layers_[l];
    const float* xg = L.W.kind == Mat::DENSE4 ? X.group_sums(L.W.G, Workspace::slot(ws.sums, k++)) : nullptr;
    add_tasks(tasks, L.W, X, xg, outs[l], L.W.N, false);
    if (L.adapters) {
      adapters = true;
      std::vector<float>& t = Workspace::slot(ws.t_out, l);
      t.resize(M * L.A.N);
      add_tasks(tasks, L.A, X, X.group_sums(L.A.G, Workspace::slot(ws.sums, k++)), t.data(), L.A.N, false);
    }
  }
  run_tasks(tasks);
  if (!adapters) return;
  tasks.clear();
  for (size_t l = 0; l < n; ++l) {
    const Layer& L = layers_[l];
    if (!L.adapters) continue;
    QuantRows& T = Workspace::slot(ws.t, l);
    T.load(ws.t_out[l].data(), M, L.A.N);
    add_tasks(tasks, L.B, T, T.group_sums(L.B.G, Workspace::slot(ws.sums, k++)), outs[l], L.B.N, true);
  }
  run_tasks(tasks);
}

std::vector<torch::Tensor> Linears::forward(torch::Tensor x) const {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K_, "x: (M, K) with K = ", K_);
  const auto in_dtype = x.scalar_type();  // fp32, bf16 or fp16 in and out; fp32 inside
  x = as_fp32(x);
  const int64_t M = x.size(0);
  std::vector<torch::Tensor> outs(layers_.size());
  std::vector<float*> ptrs(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    outs[l] = torch::empty({M, layers_[l].W.N}, x.options());
    ptrs[l] = outs[l].data_ptr<float>();
  }
  run(x.data_ptr<float>(), M, ptrs.data());
  if (in_dtype != torch::kFloat32)
    for (auto& o : outs) o = o.to(in_dtype);
  return outs;
}

// x: (M, K) fp32 -> (M, N) fp32 for one dense int4 matrix
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero, int64_t G) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  Linears one(x.size(1));
  torch::Tensor e8 = torch::empty({0}, torch::kUInt8);
  one.add(w, torch::empty({0}, torch::kInt32), scale, zero, G, e8, torch::empty({0}), 32, e8, torch::empty({0}), 32);
  return one.forward1(as_fp32(x));
}

// the dense (N, K) fp32 weight of a 2:4 matrix (for the GEMM path at many tokens)
torch::Tensor sparse24_dequant(torch::Tensor vals, torch::Tensor idx, torch::Tensor scale, int64_t G) {
  const int64_t N = vals.size(0), K = idx.size(1) * 32, nb = K / 32, ng = (K + G - 1) / G, rb = (nb + 1) / 2 * 16;
  TORCH_CHECK(vals.is_contiguous() && idx.is_contiguous() && scale.is_contiguous() && scale.size(1) == ng &&
              vals.size(1) == rb, "contiguous 2:4 values in the paired layout, positions and (N, groups) scales");
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
          const uint8_t byte = vp[n * rb + (b / 2) * 16 + j];
          const int code = ((b & 1) ? (byte >> 4) : (byte & 15)) - 8;
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
  Mat(w, torch::empty({0}, torch::kInt32), scale, zero, K, G);  // checks the layout
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

// y (M, N) fp32 = x (M, K) fp32 @ W^T for a bf16 or fp16 W (N, K): the dense parts of a compressed model (lm_head)
// stay 16-bit in memory while activations run in fp32 on CPUs without 16-bit arithmetic; K a multiple of 16
template <bool BF16>
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF16, int R>
void half_rows(const uint16_t* w, const float* x, int64_t K, int64_t n0, int64_t n1, float* out, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 w0 = load8<BF16>(wr + k), w1 = load8<BF16>(wr + k + 8);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a0[r]);
        a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * N + n] = hsum(_mm256_add_ps(a0[r], a1[r]));
  }
}

void half_linear_into(const float* xp, int64_t M, const torch::Tensor& w, float* op) {
  const int64_t K = w.size(1), N = w.size(0);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  at::parallel_for(0, N, std::max<int64_t>(16, (int64_t)262144 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t r = std::min<int64_t>(MB, M - m);
#define SLIM_HALF(R) \
      if (bf16) half_rows<true, R>(wp, xp + m * K, K, n0, n1, op + m * N, N); \
      else half_rows<false, R>(wp, xp + m * K, K, n0, n1, op + m * N, N);
      switch (r) {
        case 4: { SLIM_HALF(4) break; }
        case 3: { SLIM_HALF(3) break; }
        case 2: { SLIM_HALF(2) break; }
        default: { SLIM_HALF(1) break; }
      }
#undef SLIM_HALF
    }
  });
}

torch::Tensor half_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: (M, K) fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) && w.size(1) % 16 == 0 &&
              (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf),
              "w: (N, K) contiguous bf16 or fp16 with K a multiple of 16");
  x = x.contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  half_linear_into(x.data_ptr<float>(), x.size(0), w, out.data_ptr<float>());
  return out;
}

void register_decoder(pybind11::module& m);  // decoder.cpp

std::vector<torch::Tensor> optq_block(torch::Tensor wb, torch::Tensor ub, torch::Tensor keep, torch::Tensor scale,
                                      torch::Tensor zero, int64_t bits);  // optq.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("optq_block", &optq_block, "OPTQ's column loop over one block of columns, rows in parallel");
  m.def("int4_gemv", &int4_gemv, "int4 weight x int8-quantized activation GEMV (AVX2)");
  m.def("sparse24_dequant", &sparse24_dequant, "dense fp32 weight of a 2:4 matrix");
  m.def("int4_dequant", &int4_dequant, "dense fp32 weight of an int4 matrix");
  m.def("half_linear", &half_linear, "fp32 activations x a bf16/fp16 weight, fp32 accumulation");
  py::class_<Linears, std::shared_ptr<Linears>>(m, "Linears", "compressed linears sharing one input, run in one call")
      .def(py::init<int64_t>())
      .def("add", &Linears::add)
      .def("forward", &Linears::forward)
      .def("forward1", &Linears::forward1);
  register_decoder(m);
}
