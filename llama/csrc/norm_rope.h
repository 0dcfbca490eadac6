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

// y = round(round(x * rsqrt(mean(x^2) + eps)) * w) for one row of D elements
template <class Op>
void rms_norm(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t D, float eps) {
  using T = typename Op::T;
  typename Op::Acc ss = Op::zero();
  for (int64_t d = 0; d < D; d += Op::kLanes) {
    typename Op::Acc v = Op::widen(x + d);
    ss = Op::fmadd(v, v, ss);
  }
  const typename Op::Acc scale = Op::set1(1.0f / sqrtf(Op::hsum(ss) / (float)D + eps));
  for (int64_t d = 0; d < D; d += Op::kLanes) {
    T normed[Op::kLanes];  // rounded to x's dtype, as type_as(x) does
    Op::store(normed, Op::mul(Op::widen(x + d), scale));
    Op::store(y + d, Op::mul(Op::widen(normed), Op::widen(w + d)));
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

}  // namespace

