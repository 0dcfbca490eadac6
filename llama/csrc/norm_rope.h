// The elementwise work around the products, fused: RMSNorm and rotary embeddings (the decode step's,
// and a prefill's where the model runs the native attention).
//
// In eager torch each is a chain of operators (RMSNorm 8: float, pow, mean, add, rsqrt, mul,
// type_as, mul; RoPE 12 per tensor), about 500 calls per decode step of a 12-layer model, each
// a few microseconds of dispatch for a few kilobytes of work. One call each here. The math is
// llama/model.py's, rounding where it rounds: RMSNorm computes x * rsqrt(mean(x^2) + eps) in
// float32, rounds it to x's dtype and multiplies by the weight (rounding again); RoPE rotates
// each adjacent pair in float32 and rounds once. The entry points (norm_rope.cpp) are
// compiled with the AVX2 objects (simd.h); decode_step.cpp uses these with every instruction set's.

#pragma once

#include "simd.h"

namespace {

// y[r] = round(round(x[r] * rsqrt(mean(x[r]^2) + eps)) * w) for each of the R rows of D elements
template <class Op>
void rms_norm(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t R, int64_t D, float eps) {
  using T = typename Op::T;
  for (int64_t r = 0; r < R; r++) {
    const T *xr = x + r * D;
    T *yr = y + r * D;
    typename Op::Acc ss = Op::zero();
    for (int64_t d = 0; d < D; d += Op::kLanes) {
      typename Op::Acc v = Op::widen(xr + d);
      ss = Op::fmadd(v, v, ss);
    }
    const typename Op::Acc scale = Op::set1(1.0f / sqrtf(Op::hsum(ss) / (float)D + eps));
    for (int64_t d = 0; d < D; d += Op::kLanes) {
      T normed[Op::kLanes];  // rounded to x's dtype, as type_as(x) does
      Op::store(normed, Op::mul(Op::widen(xr + d), scale));
      Op::store(yr + d, Op::mul(Op::widen(normed), Op::widen(w + d)));
    }
  }
}

// one token's H heads of D: each adjacent pair (x[2i], x[2i+1]) rotated by the angles c, sn (D/2)
template <class T>
inline void rope_token(const T *x, const float *c, const float *sn, T *y, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; h++)
    for (int64_t i = 0; i < half; i++) {
      const float x0 = get(x + h * D + 2 * i), x1 = get(x + h * D + 2 * i + 1);
      put(y + h * D + 2 * i, x0 * c[i] - x1 * sn[i]);
      put(y + h * D + 2 * i + 1, x0 * sn[i] + x1 * c[i]);
    }
}

// y = x with each adjacent pair (x[2i], x[2i+1]) of every head rotated by its token's angle:
// x, y (B, S, H, D); cos, sin (B or 1, S, D/2) float32, cos_rows = B or 1
template <class T>
void rope(const T *x, const float *cos, const float *sin, T *y, int64_t B, int64_t S, int64_t H, int64_t D, int64_t cos_rows) {
  for (int64_t b = 0; b < B; b++)
    for (int64_t s = 0; s < S; s++) {
      const int64_t t = (cos_rows == 1 ? 0 : b) * S + s;
      rope_token(x + (b * S + s) * H * D, cos + t * D / 2, sin + t * D / 2, y + (b * S + s) * H * D, H, D);
    }
}
}  // namespace

