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

#include "gemv.h"
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

// s[0..n) -> exp(s * scale - m_new) where m_new = max(m, max(s * scale)); returns their sum, sets m = m_new and
// *correction = exp(m_old - m_new), the factor for what was summed before
template <class Op>
float online_softmax(float *s, int64_t n, float scale, float &m, float *correction) {
  constexpr int W = Op::kLanes;
  const typename Op::Acc vscale = Op::set1(scale);
  float bm = -INFINITY;
  int64_t j = 0;
  if (n >= W) {
    typename Op::Acc vm = Op::set1(-INFINITY);
    for (; j + W <= n; j += W) {
      const typename Op::Acc x = Op::mul(Op::loadf(s + j), vscale);
      Op::storef(s + j, x);
      vm = Op::max(vm, x);
    }
    bm = Op::hmax(vm);
  }
  for (; j < n; j++) {
    s[j] *= scale;
    bm = s[j] > bm ? s[j] : bm;
  }
  const float m_new = m > bm ? m : bm;
  *correction = m == -INFINITY ? 0.0f : expf(m - m_new);
  m = m_new;
  const typename Op::Acc vneg = Op::set1(-m_new);
  typename Op::Acc vsum = Op::zero();
  j = 0;
  for (; j + W <= n; j += W) {
    const typename Op::Acc e = Op::exp(Op::add(Op::loadf(s + j), vneg));
    Op::storef(s + j, e);
    vsum = Op::add(vsum, e);
  }
  float sum = Op::hsum(vsum);
  for (; j < n; j++) {
    s[j] = expf(s[j] - m_new);
    sum += s[j];
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
    float m = -INFINITY, unused;  // scores -> exp(scale * scores - their max), in place
    const float inv = 1.0f / online_softmax<Op>(scores, L, scale, m, &unused);
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

// Causal attention of a prefill chunk in one cache row: S queries at positions start..start+S-1
// over the row's keys and values at positions 0..start+S-1 (the chunk's own already written).
// q, out: (S, H, D), token-major as the projections give them and the output projection takes
// them; k, v: the row's (KVH, Smax, D). Flash attention: per head and block of kQueryBlock
// queries, blocks of kKeyBlock keys whose scores come from gemv.h's tiles (8 keys x 2 queries, 4 x 2 with AVX2,
// the dtype's dot instructions), then a float32 online softmax (running max and sum per query)
// and the weighted values in float32, the output rounded once.
//
// Why: torch's CPU flash attention ran a causal prefill at 50-140 GFLOP/s on a Zen 5 EPYC
// (bfloat16 no faster than float32): 35% of a 512-token bfloat16 prefill of the 110m shape.
constexpr int64_t kQueryBlock = 16, kKeyBlock = 64;

// o[0..D) = o * correction + sum over j < n of p[j] * v[j * D ..]
template <class Op>
void add_weighted_values(float *o, const float *p, const typename Op::T *v, int64_t n, int64_t D, float correction) {
  constexpr int NC = 4;  // accumulators per pass: D = 64 (float32) or 128 (bfloat16) in one pass on AVX-512
  for (int64_t d0 = 0; d0 < D; d0 += NC * Op::kLanes) {
    const int nc = (D - d0) / Op::kLanes < NC ? (int)((D - d0) / Op::kLanes) : NC;
    typename Op::Acc acc[NC];
    for (int c = 0; c < NC; c++) acc[c] = c < nc ? Op::mul(Op::loadf(o + d0 + c * Op::kLanes), Op::set1(correction)) : Op::zero();
    for (int64_t j = 0; j < n; j++) {
      const typename Op::Acc pj = Op::set1(p[j]);
      const typename Op::T *row = v + j * D + d0;
#pragma GCC unroll 4
      for (int c = 0; c < NC; c++)
        if (c < nc) acc[c] = Op::fmadd(pj, Op::widen(row + c * Op::kLanes), acc[c]);
    }
    for (int c = 0; c < nc; c++) Op::storef(o + d0 + c * Op::kLanes, acc[c]);
  }
}

template <class Op>
void prefill_attention(const typename Op::T *q, const typename Op::T *k, const typename Op::T *v, typename Op::T *out,
                       int64_t S, int64_t start, int64_t H, int64_t KVH, int64_t Smax, int64_t D, float scale, int threads) {
  using T = typename Op::T;
  const int64_t rep = H / KVH, blocks = (S + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> qb(kQueryBlock * D);  // the block's queries for one head, contiguous (as tile_sums reads rows)
    std::vector<float> o(kQueryBlock * D), s(kQueryBlock * kKeyBlock), m(kQueryBlock), l(kQueryBlock);
    float t[16];
    constexpr int R = Op::kLanes == 16 ? 8 : 4;  // keys per tile: the accumulators the registers hold (32 or 16)
    // the last query blocks see the most keys: handed out first, the threads then even out
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < H * blocks; task++) {
      const int64_t h = task % H, i0 = (blocks - 1 - task / H) * kQueryBlock;
      const int64_t nq = S - i0 < kQueryBlock ? S - i0 : kQueryBlock, keys = start + i0 + nq;
      const T *kr = k + (h / rep) * Smax * D, *vr = v + (h / rep) * Smax * D;
      for (int64_t i = 0; i < nq; i++) memcpy(qb.data() + i * D, q + ((i0 + i) * H + h) * D, D * sizeof(T));
      for (int64_t i = 0; i < nq; i++) m[i] = -INFINITY, l[i] = 0.0f;
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t j0 = 0; j0 < keys; j0 += kKeyBlock) {
        const int64_t nk = keys - j0 < kKeyBlock ? keys - j0 : kKeyBlock;
        int64_t j = 0;  // s[i * kKeyBlock + j]: query i0 + i with key j0 + j
        for (; j + R <= nk; j += R) {
          int64_t i = 0;
          for (; i + 2 <= nq; i += 2) {
            tile_sums<Op, R, 2>(qb.data(), kr, D, j0 + j, i, t);
            for (int a = 0; a < 2; a++)
              for (int r = 0; r < R; r++) s[(i + a) * kKeyBlock + j + r] = t[a * R + r];
          }
          if (i < nq) {
            tile_sums<Op, R, 1>(qb.data(), kr, D, j0 + j, i, t);
            for (int r = 0; r < R; r++) s[i * kKeyBlock + j + r] = t[r];
          }
        }
        for (; j < nk; j++)
          for (int64_t i = 0; i < nq; i++) {
            tile_sums<Op, 1, 1>(qb.data(), kr, D, j0 + j, i, t);
            s[i * kKeyBlock + j] = t[0];
          }
        for (int64_t i = 0; i < nq; i++) {
          const int64_t seen = start + i0 + i + 1 - j0;  // keys of this block that query i0 + i sees
          const int64_t n = seen < nk ? seen : nk;
          if (n <= 0) continue;
          float correction;
          float *si = s.data() + i * kKeyBlock;
          const float sum = online_softmax<Op>(si, n, scale, m[i], &correction);
          l[i] = l[i] * correction + sum;
          add_weighted_values<Op>(o.data() + i * D, si, vr + j0 * D, n, D, correction);
        }
      }
      for (int64_t i = 0; i < nq; i++) {
        const typename Op::Acc inv = Op::set1(1.0f / l[i]);
        T *dst = out + ((i0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; d += Op::kLanes) Op::store(dst + d, Op::mul(Op::loadf(o.data() + i * D + d), inv));
      }
    }
  }
}

}  // namespace

