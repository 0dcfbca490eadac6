// Attention of one new token per cache row over that row's cached keys and values (decode).
//
// q: (B, H, D) queries; k, v: one layer's whole cache, (rows, KVH, S, D), of which rows 0..B-1
// are read; lengths[b]: how many positions row b attends to (its position + 1); out: (B, H, D).
// Query head h reads kv head h / (H / KVH) (grouped-query attention). softmax(q k^T * scale) v
// with float32 scores, softmax and sums (bfloat16 products are exact in vdpbf16ps and in the
// widened float32 FMAs); the exponentials are vectorized (simd.h). See simd.h for how the files
// are compiled (once per instruction set) and llama/native.py for how it is built and called.
//
// Why: torch's CPU scaled_dot_product_attention runs a flash-attention kernel made for blocks
// of queries; for the single query of a decode step it was 5x slower in bfloat16 than in
// float32 (133 us against 25 us per layer for 12 heads over 256 positions, on a Zen 5 EPYC).
// This reads each cached key and value once, with the keys in tiles of kLanes dot products
// (summed across lanes with one transpose tree on AVX-512).
//
// D must be a multiple of the Op's kStep and kLanes (64 and 128 are, for every Op): the Python
// side checks and uses torch where it is not.

#pragma once

#include <vector>

#include "simd.h"

namespace {

// out[0..D) = sum over l < L of p[l] * v[l * D ..], divided by `sum`: NC accumulators per pass over v
template <class Op, int NC>
void weighted_values(const float *p, const typename Op::T *v, typename Op::T *out, int64_t L, int64_t D, float inv_sum) {
  for (int64_t d0 = 0; d0 < D; d0 += NC * Op::kLanes) {
    typename Op::Acc acc[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) acc[c] = Op::zero();
    for (int64_t l = 0; l < L; l++) {
      typename Op::Acc pl = Op::set1(p[l]);
      const typename Op::T *row = v + l * D + d0;
#pragma GCC unroll 8
      for (int c = 0; c < NC; c++) acc[c] = Op::fmadd(pl, Op::widen(row + c * Op::kLanes), acc[c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) Op::store(out + d0 + c * Op::kLanes, Op::mul(acc[c], Op::set1(inv_sum)));
  }
}

// scores[l] = q . k[l * D ..] for l < L, kLanes keys at a time
template <class Op>
void dot_keys(const typename Op::T *q, const typename Op::T *k, float *scores, int64_t L, int64_t D) {
  constexpr int KT = Op::kLanes;
  int64_t l = 0;
  for (; l + KT <= L; l += KT) {
    typename Op::Acc acc[KT];
#pragma GCC unroll 16
    for (int j = 0; j < KT; j++) acc[j] = Op::zero();
    for (int64_t d = 0; d < D; d += Op::kStep) {
      typename Op::X x = Op::load_x(q + d);
#pragma GCC unroll 16
      for (int j = 0; j < KT; j++) acc[j] = Op::madd(acc[j], x, k + (l + j) * D + d);
    }
    Op::template reduce<KT>(acc, scores + l);
  }
  for (; l < L; l++) {
    typename Op::Acc acc = Op::zero();
    for (int64_t d = 0; d < D; d += Op::kStep) acc = Op::madd(acc, Op::load_x(q + d), k + l * D + d);
    Op::template reduce<1>(&acc, scores + l);
  }
}

// scores -> exp(scale * scores - max) in place; returns their sum
template <class Op>
float softmax_numerators(float *s, int64_t L, float scale) {
  constexpr int W = Op::kLanes;
  const typename Op::Acc vscale = Op::set1(scale);
  float m = -INFINITY;
  int64_t l = 0;
  if (L >= W) {
    typename Op::Acc vm = Op::set1(-INFINITY);
    for (; l + W <= L; l += W) {
      typename Op::Acc x = Op::mul(Op::loadf(s + l), vscale);
      Op::storef(s + l, x);
      vm = Op::max(vm, x);
    }
    m = Op::hmax(vm);
  }
  for (; l < L; l++) {
    s[l] *= scale;
    m = s[l] > m ? s[l] : m;
  }
  const typename Op::Acc vmax = Op::set1(m);
  typename Op::Acc vsum = Op::zero();
  l = 0;
  for (; l + W <= L; l += W) {
    typename Op::Acc e = Op::exp(Op::add(Op::loadf(s + l), Op::mul(vmax, Op::set1(-1.0f))));
    Op::storef(s + l, e);
    vsum = Op::add(vsum, e);
  }
  float sum = Op::hsum(vsum);
  for (; l < L; l++) {
    s[l] = expf(s[l] - m);
    sum += s[l];
  }
  return sum;
}

// Query heads g * rep .. g * rep + rep - 1 of cache row b (q: that row's (H, D) queries, out the
// same) over kv head g's first L positions (kr, vr: (S, D) each); scores: room for L floats
template <class Op>
void attend_group(const typename Op::T *q, const typename Op::T *kr, const typename Op::T *vr, typename Op::T *out,
                  int64_t g, int64_t rep, int64_t L, int64_t D, float scale, float *scores) {
  for (int64_t r = 0; r < rep; r++) {
    const int64_t h = g * rep + r;
    typename Op::T *o = out + h * D;
    if (L == 0) {
      for (int64_t d = 0; d < D; d++) put(o + d, 0.0f);
      continue;
    }
    dot_keys<Op>(q + h * D, kr, scores, L, D);
    const float inv = 1.0f / softmax_numerators<Op>(scores, L, scale);
    if (D % (4 * Op::kLanes) == 0)
      weighted_values<Op, 4>(scores, vr, o, L, D, inv);
    else if (D % (2 * Op::kLanes) == 0)
      weighted_values<Op, 2>(scores, vr, o, L, D, inv);
    else
      weighted_values<Op, 1>(scores, vr, o, L, D, inv);
  }
}

template <class Op>
void decode_attention(const typename Op::T *q, const typename Op::T *k, const typename Op::T *v, typename Op::T *out,
                      const int64_t *lengths, int64_t B, int64_t H, int64_t KVH, int64_t S, int64_t D, float scale,
                      int threads) {
  const int64_t rep = H / KVH;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * KVH; task++) {
      const int64_t b = task / KVH, g = task % KVH;
      int64_t L = lengths[b];
      L = L < 0 ? 0 : L > S ? S : L;
      if ((int64_t)scores.size() < L) scores.resize(L);
      attend_group<Op>(q + b * H * D, k + (b * KVH + g) * S * D, v + (b * KVH + g) * S * D, out + b * H * D, g, rep, L, D,
                       scale, scores.data());
    }
  }
}

}  // namespace

