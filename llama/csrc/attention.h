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
// queries, blocks of kKeyBlock keys; a block's scores Q K^T and its weighted values P V are
// small matrix products (pair_product: RQ queries x NV vectors of accumulators, each element of
// the left operand broadcast, the dtype's dot instruction: vdpbf16ps on pairs in bfloat16), with a
// float32 online softmax (running max and sum per query) between them; the output rounded once.
// In bfloat16 the probabilities P are rounded to bfloat16 for P V, as torch's flash attention does.
//
// The right operands are packed first, once per call, for all query blocks to share (32-bit
// units: a float32, or a pair of bfloat16): K^T per key block (kKeyBlock keys of each unit of D
// contiguous, by gathers) and, in bfloat16, V with each two keys' elements interleaved (the pairs
// vdpbf16ps multiplies); float32 V is read in place. Keys past the chunk's end are zeros.
//
// Why: torch's CPU flash attention ran a causal prefill at 50-140 GFLOP/s on a Zen 5 EPYC
// (bfloat16 no faster than float32): 35% of a 512-token bfloat16 prefill of the 110m shape; the
// previous kernel of ours (dot products summed across lanes, float32 P V) ran the 110m heads (64) at 120-230.
constexpr int64_t kQueryBlock = 32, kKeyBlock = 64;  // 32 queries: 1.2x-1.3x 16 on the 7B heads (128) at 2000 tokens

// C[i * ldc + v * kLanes ..] (+)= sum over t < steps of A[i * lda + t * kPair ..] (one step's elements, in
// every lane) times B[t * ldb + v * kLanes * kPair ..], for i < RQ and v < NV: C holds float32
template <class Op, int RQ, int NV>
__attribute__((always_inline)) inline void pair_tile(const typename Op::T *__restrict A, int64_t lda, const typename Op::T *__restrict B,
                                                     int64_t ldb, int64_t steps, float *C, int64_t ldc, bool accumulate) {
  typename Op::Acc c[RQ * NV];
#pragma GCC unroll 32
  for (int i = 0; i < RQ * NV; i++) c[i] = accumulate ? Op::loadf(C + (i / NV) * ldc + (i % NV) * Op::kLanes) : Op::zero();
  for (int64_t t = 0; t < steps; t++) {
    typename Op::PA a[RQ];
#pragma GCC unroll 8
    for (int i = 0; i < RQ; i++) a[i] = Op::bcast_pair(A + i * lda + t * Op::kPair);
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++) {
      const typename Op::PB b = Op::load_pairs(B + t * ldb + v * Op::kLanes * Op::kPair);
#pragma GCC unroll 8
      for (int i = 0; i < RQ; i++) c[i * NV + v] = Op::madd_pairs(c[i * NV + v], a[i], b);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < RQ * NV; i++) Op::storef(C + (i / NV) * ldc + (i % NV) * Op::kLanes, c[i]);
}

// rows r of RQ at a time (1 <= r <= RQ) over vectors vectors, NV at a time (then one at a time)
template <class Op, int RQ, int NV, int r = RQ>
void pair_rows(const typename Op::T *A, int64_t lda, const typename Op::T *B, int64_t ldb, int64_t steps, float *C,
               int64_t ldc, int64_t vectors, bool accumulate) {
  int64_t v = 0;
  for (; v + NV <= vectors; v += NV)
    pair_tile<Op, r, NV>(A, lda, B + v * Op::kLanes * Op::kPair, ldb, steps, C + v * Op::kLanes, ldc, accumulate);
  for (; v < vectors; v++)
    pair_tile<Op, r, 1>(A, lda, B + v * Op::kLanes * Op::kPair, ldb, steps, C + v * Op::kLanes, ldc, accumulate);
}

// One query's scores s[0..kKeyBlock) against a block of keys, of which the first n (1..kKeyBlock) count,
// in base 2 (scaled by the softmax's scale / ln 2, m in the same units): as online_softmax, in
// vectors (lanes past n masked), and the probabilities written to probs (zeros past n), in T
template <class Op>
float block_softmax(const float *s, int64_t n, float scale2, float &m, float *correction, typename Op::T *probs) {
  constexpr int lanes = Op::kLanes;
  typename Op::Acc vm = Op::set1(-INFINITY);
  for (int64_t j = 0; j < n; j += lanes) vm = Op::max(vm, Op::keep(Op::loadf(s + j), n - j, -INFINITY));
  const float bm = Op::hmax(vm) * scale2, m_new = m > bm ? m : bm;  // scale2 > 0: the max of the scaled scores
  *correction = m == -INFINITY ? 0.0f : exp2f(m - m_new);
  m = m_new;
  const typename Op::Acc vscale = Op::set1(scale2), vneg = Op::set1(-m_new);
  typename Op::Acc vsum = Op::zero();
  for (int64_t j = 0; j < kKeyBlock; j += lanes) {
    typename Op::Acc e = Op::zero();
    if (j < n) {
      e = Op::keep(Op::exp2(Op::fmadd(Op::loadf(s + j), vscale, vneg)), n - j, 0.0f);
      vsum = Op::add(vsum, e);
    }
    Op::store(probs + j, e);
  }
  return Op::hsum(vsum);
}

// C (rows x vectors * kLanes) (+)= A (rows x steps * kPair) B: see pair_tile
template <class Op, int RQ, int NV>
void pair_product(const typename Op::T *A, int64_t lda, int64_t rows, const typename Op::T *B, int64_t ldb, int64_t steps,
                  float *C, int64_t ldc, int64_t vectors, bool accumulate) {
  int64_t i = 0;
  for (; i + RQ <= rows; i += RQ) pair_rows<Op, RQ, NV>(A + i * lda, lda, B, ldb, steps, C + i * ldc, ldc, vectors, accumulate);
  if (i == rows) return;
  const typename Op::T *a = A + i * lda;
  float *c = C + i * ldc;
  static_assert(RQ <= 4, "the tail rows below are 1, 2 or 3");  // (RQ = 2 leaves only 1)
  switch (rows - i) {
    case 1: pair_rows<Op, RQ, NV, 1>(a, lda, B, ldb, steps, c, ldc, vectors, accumulate); break;
    case 2: if constexpr (RQ > 2) pair_rows<Op, RQ, NV, 2>(a, lda, B, ldb, steps, c, ldc, vectors, accumulate); break;
    case 3: if constexpr (RQ > 3) pair_rows<Op, RQ, NV, 3>(a, lda, B, ldb, steps, c, ldc, vectors, accumulate); break;
  }
}

template <class Op>
void prefill_attention(const typename Op::T *q, const typename Op::T *k, const typename Op::T *v, typename Op::T *out,
                       int64_t S, int64_t start, int64_t H, int64_t KVH, int64_t Smax, int64_t D, float scale, int threads) {
  using T = typename Op::T;
  constexpr int P = Op::kPair, lanes = Op::kLanes;
  // RQ x NV accumulators: 16 of the 32 registers with AVX-512; with AVX2's 16, 12 in float32 and 8 in bfloat16 (whose
  // broadcasts and operands take two registers each): the fastest of the shapes tried on a Zen 5 running the AVX2 code
  constexpr int RQ = lanes == 16 ? 4 : (P == 1 ? 3 : 2), NV = 4;
  static_assert(kKeyBlock % (lanes * P) == 0 && sizeof(T) * P == 4, "a lane holds one 32-bit unit");
  const float scale2 = scale * 1.4426950408889634f;  // softmax in base 2: e^(x scale) = 2^(x scale / ln 2)
  const int64_t rep = H / KVH, blocks = (S + kQueryBlock - 1) / kQueryBlock, keys_all = start + S;
  const int64_t key_blocks = (keys_all + kKeyBlock - 1) / kKeyBlock, units = D / P;  // units: 32-bit units of a row
  // packed operands, this calling thread's, reused from call to call (at most the row's keys and values again,
  // kept at the largest size a call needed). Packed anew at each call, as a chunk's keys join the row: O(keys x D)
  // per kv head against the attention's O(chunk x keys x D) per head
  static thread_local std::vector<uint32_t> packed_k, packed_v;
  packed_k.resize(KVH * key_blocks * kKeyBlock * units);
  if constexpr (P == 2) packed_v.resize(KVH * ((keys_all + 1) / 2) * D);
  uint32_t *kt = packed_k.data(), *vp = packed_v.data();
#pragma omp parallel num_threads(threads)
  {
    // K^T: kt[((g * key_blocks + b) * units + u) * kKeyBlock + j] = unit u of key b * kKeyBlock + j of kv head g
#pragma omp for schedule(static)
    for (int64_t task = 0; task < KVH * key_blocks; task++) {
      const int64_t g = task / key_blocks, j0 = (task % key_blocks) * kKeyBlock;
      const uint32_t *rows = (const uint32_t *)(k + (g * Smax + j0) * D);
      for (int64_t u = 0; u < units; u++)
        for (int64_t j = 0; j < kKeyBlock; j += lanes)
          Op::gather_units(rows + j * units + u, units, keys_all - j0 - j, kt + (task * units + u) * kKeyBlock + j);
      if constexpr (P == 2) {  // V: vp[(g * pairs + t) * D + d] = element d of keys 2t and 2t + 1 of kv head g
        const int64_t pairs = (keys_all + 1) / 2;
        for (int64_t t = j0 / 2; t < (j0 + kKeyBlock) / 2 && t < pairs; t++) {
          const uint16_t *first = (const uint16_t *)(v + (g * Smax + 2 * t) * D);
          const uint16_t *second = 2 * t + 1 < keys_all ? first + D : nullptr;
          for (int64_t d = 0; d < D; d += lanes) Op::interleave16(first + d, second ? second + d : nullptr, vp + (g * pairs + t) * D + d);
        }
      }
    }  // (the implied barrier: every block packed before any is read)
    // per query of the block: s its scores against a block of keys (then its probabilities, in float32), o its
    // weighted values so far (float32), m the running max of its scores (base-2 units), l the running sum
    std::vector<float> s(kQueryBlock * kKeyBlock), o(kQueryBlock * D), m(kQueryBlock), l(kQueryBlock);
    std::vector<T> probs_bf16(P == 1 ? 0 : kQueryBlock * kKeyBlock);  // (float32 probabilities stay in s)
    // the last query blocks see the most keys: handed out first, the threads then even out
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < H * blocks; task++) {
      const int64_t h = task % H, g = h / rep, i0 = (blocks - 1 - task / H) * kQueryBlock;
      const int64_t nq = S - i0 < kQueryBlock ? S - i0 : kQueryBlock, keys = start + i0 + nq;
      const T *qh = q + (i0 * H + h) * D;  // query i0 + i of head h: qh + i * H * D
      const T *kth = (const T *)(kt + g * key_blocks * units * kKeyBlock);
      const T *vh = P == 1 ? v + g * Smax * D : (const T *)(vp + g * ((keys_all + 1) / 2) * D);  // row t: keys t * P..
      const T *probs = P == 1 ? (const T *)s.data() : probs_bf16.data();
      for (int64_t i = 0; i < nq; i++) m[i] = -INFINITY, l[i] = 0.0f;
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t j0 = 0; j0 < keys; j0 += kKeyBlock) {
        const int64_t nk = keys - j0 < kKeyBlock ? keys - j0 : kKeyBlock;
        // s[i * kKeyBlock + j] = query i0 + i . key j0 + j
        pair_product<Op, RQ, NV>(qh, H * D, nq, kth + (j0 / kKeyBlock) * units * kKeyBlock * P, kKeyBlock * P, units,
                                 s.data(), kKeyBlock, kKeyBlock / lanes, false);
        for (int64_t i = 0; i < nq; i++) {
          const int64_t seen = start + i0 + i + 1 - j0;  // keys of this block that query i0 + i sees
          const int64_t n = seen < nk ? seen : nk;
          float *si = s.data() + i * kKeyBlock;
          T *pi = P == 1 ? (T *)si : probs_bf16.data() + i * kKeyBlock;  // float32 probabilities over the scores
          if (n <= 0) {  // masked, or past the keys: no weight
            for (int64_t j = 0; j < kKeyBlock; j += lanes) Op::store(pi + j, Op::zero());
            continue;
          }
          float correction;
          const float sum = block_softmax<Op>(si, n, scale2, m[i], &correction, pi);
          l[i] = l[i] * correction + sum;
          if (correction != 1.0f)
            for (int64_t d = 0; d < D; d += lanes) Op::storef(o.data() + i * D + d, Op::mul(Op::loadf(o.data() + i * D + d), Op::set1(correction)));
        }
        // o[i * D ..] += sum over keys of probs[i * kKeyBlock + j] * value j0 + j
        pair_product<Op, RQ, NV>(probs, kKeyBlock, nq, vh + (j0 / P) * D * P, D * P, (nk + P - 1) / P, o.data(), D, D / lanes, true);
      }
      for (int64_t i = 0; i < nq; i++) {
        const typename Op::Acc inv = Op::set1(1.0f / l[i]);
        T *dst = out + ((i0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; d += lanes) Op::store(dst + d, Op::mul(Op::loadf(o.data() + i * D + d), inv));
      }
    }
  }
}

}  // namespace

