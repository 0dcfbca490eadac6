// y = x @ w.T for the few rows of a decode step, reading the weight once at memory speed: the
// loops of gemv.cpp (whose entry points run each product in a parallel region of its own) and of
// decode_step.cpp (which runs a whole decode step in one).
//
// x: (M, K) activations, w: (N, K) dense row-major weight (the checkpoint's layout), y: (M, N),
// all float32 or all bfloat16; float32 accumulation. See simd.h for how the files are compiled
// (once per instruction set) and llama/native.py for how they are built, loaded and called.
//
// Why a kernel of our own: at batch 1 a decode step is a chain of matrix-vector products whose
// speed is the rate at which the weights stream from memory. oneDNN and MKL reach about 60-90%
// of it on small matrices; this loop keeps eight rows' streams in flight (eight accumulators
// against one activation vector) and reaches the read bandwidth (llama.kernel_choice measures
// it against them on each machine and keeps the faster).
//
// Tiles: rows R of w against MT rows of x, R * MT accumulators; for M == 1, R = 8; for more rows
// R x 2 (AVX-512: 8 x 2 = 16 accumulators, summed across lanes with one transpose tree). Where the
// rows of x pass twice or more over the same weight rows, the passes prefetch the next tile (NextTile),
// and weight rows too long for L1 are passed over in chunks of K (tile_rows_chunked).
// K must be a multiple of the vector step (16 float32, 32 bfloat16 for AVX-512; 8 and 16 for
// AVX2): the Python side checks and falls back to torch where it is not.
//
// int8 weights (llama/quantize.py: per-row scales, values in [-127, 127]): the activations are
// first quantized to int8 in blocks of 32 with a float32 scale per block (as llama.cpp's Q8
// activations: robust to a few large channels; the same values on every instruction set).
// - AVX512-VNNI: one vpdpbusd makes 64 int8 products: it multiplies unsigned by signed bytes, so
//   the weights are read as w + 128 (an XOR of the sign bit) and 128 * sum(x) is taken off once
//   per row of x. Each pair of blocks' int32 sums is scaled by its block scales into float32
//   accumulators.
// - AVX2 (no VNNI: e.g. Zen 2/3): as llama.cpp's AVX2 path, |x| (unsigned) times w with x's sign
//   (vpsignb), vpmaddubsw into 16 sums of pairs (at most 2 * 127 * 127: no int16 overflow),
//   vpmaddwd with ones into 8 int32 sums of the block, scaled by the block's scale.
// K must be a multiple of 64 (llama.native.INT8_STEP).
//
// The loops hand each tile's float32 sums to an epilogue, out(m, n, value): store them, add them
// to a residual, or combine two weights' (SwiGLU), as the caller needs.

#pragma once

#include <vector>

#include "simd.h"

namespace {

constexpr int kTileRows = 8;  // rows of w per tile (and per parallel work item)

// The rows of the next tile (n + kTileRows..) that pass p of `passes` over tile n prefetches, spread evenly over the
// passes, where the rows of x take `repeats` >= 2 passes over the same weight rows. Why: a tile's later passes read
// it from L1, and the hardware prefetchers, which follow demand misses, leave memory idle meanwhile; prefetched in
// step with the passes, the next tile streams in while this one is multiplied (1.1x-1.5x on the 110m products at 8
// and 16 rows, Zen 5). Rows of x that take one pass over each weight row stream the weights by themselves.
struct NextTile {
  int64_t start = 0;
  int per_pass = 0;
  NextTile(int64_t n, int64_t N, int64_t passes, int64_t repeats) {
    if (repeats >= 2 && n + 2 * kTileRows <= N) {
      start = n + kTileRows;
      per_pass = (int)((kTileRows + passes - 1) / passes);
    }
  }
  int rows(int64_t pass) const {
    const int64_t left = kTileRows - pass * per_pass;
    return per_pass == 0 || left <= 0 ? 0 : (int)(left < per_pass ? left : per_pass);
  }
  // where pass `pass` prefetches, in w (N, K); null where it prefetches nothing
  template <class T>
  const T *at(const T *w, int64_t K, int64_t pass) const { return rows(pass) ? w + (start + pass * per_pass) * K : nullptr; }
};

// With several passes of x over the same R2 rows of w, those rows should stay in L1 from pass to pass: where they
// would take more than kChunkBytes, the passes run over chunks of K (kStep multiples) of about that size
// (tile_rows_chunked). On a Zen 5 EPYC (48 KiB L1 per core) the 7B shapes ran 1.05x-1.15x as fast at 8 rows and
// 1.2x-1.4x at 16 (bfloat16 rows of 4096 and more, float32 of 2048 and more, 8 rows of w a pass); chunks of 24 KiB
// slowed the 110m bfloat16 rows of 2048 (32 KiB for 8 rows), which stay whole. (AVX2's passes, over 4 rows of w,
// chunk rows twice as long; not measured on an AVX2-only CPU.)
constexpr int64_t kChunkBytes = 32 << 10, kMaxChunkedRows = 16;
template <class T, int kStep, int R2>
inline int64_t chunk_of(int64_t K) {
  const int64_t elements = kChunkBytes / (R2 * (int64_t)sizeof(T));
  return elements < kStep ? kStep : elements / kStep * kStep;
}

// the sums of rows n..n+R-1 of w with rows m..m+MT-1 of x over k0..k1 (default: all K, the rows' length):
// out[j * R + r] = x[m + j] . w[n + r]; meanwhile prefetch_rows rows at `prefetch` (stride K), a line a step
template <class Op, int R, int MT>
__attribute__((always_inline)) inline void tile_sums(const typename Op::T *__restrict x, const typename Op::T *__restrict w,
                                                     int64_t K, int64_t n, int64_t m, float *out,
                                                     const typename Op::T *prefetch = nullptr, int prefetch_rows = 0,
                                                     int64_t k0 = 0, int64_t k1 = -1) {
  typename Op::Acc a[R * MT];
#pragma GCC unroll 16
  for (int i = 0; i < R * MT; i++) a[i] = Op::zero();
  const typename Op::T *wr = w + n * K, *xr = x + m * K;
  for (int64_t k = k0, end = k1 < 0 ? K : k1; k < end; k += Op::kStep) {
    typename Op::X xv[MT];
#pragma GCC unroll 16
    for (int j = 0; j < MT; j++) xv[j] = Op::load_x(xr + j * K + k);
    if (Op::kStep * sizeof(typename Op::T) >= 64 || (k * sizeof(typename Op::T)) % 64 == 0)  // once per cache line
      for (int p = 0; p < prefetch_rows; p++) _mm_prefetch((const char *)(prefetch + p * K + k), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      if constexpr (MT == 1) {
        a[r] = Op::madd(a[r], xv[0], wr + r * K + k);  // one use: the load folds into the multiply
      } else {  // loaded once for MT rows of x (see in_register)
        const typename Op::W wv = Op::load_w(wr + r * K + k);
#pragma GCC unroll 16
        for (int j = 0; j < MT; j++) a[j * R + r] = Op::madd(a[j * R + r], xv[j], wv);
      }
    }
  }
  Op::template reduce<R * MT>(a, out);
}

// The passes of the M rows of x over tile n (rows n..n+kTileRows-1 of w, R2 at a time; MT rows of x a pass,
// then one at a time) over k0..k1 (default: all K): emit(m, row of w, sum) for each; each pass prefetches its
// share of the next tile (NextTile)
template <class Op, int R2, int MT, class Emit>
__attribute__((always_inline)) inline void tile_passes(const typename Op::T *x, const typename Op::T *w, int64_t M, int64_t N,
                                                       int64_t K, int64_t n, int64_t passes, int64_t repeats, Emit &&emit,
                                                       int64_t k0 = 0, int64_t k1 = -1) {
  float s[kTileRows * MT];
  NextTile next(n, N, passes, repeats);
  int64_t pass = 0;
  for (int64_t r0 = n; r0 < n + kTileRows; r0 += R2) {
    int64_t m = 0;
    for (; m + MT <= M; m += MT, pass++) {
      tile_sums<Op, R2, MT>(x, w, K, r0, m, s, next.at(w, K, pass), next.rows(pass), k0, k1);
      for (int j = 0; j < MT; j++)
        for (int r = 0; r < R2; r++) emit(m + j, r0 + r, s[j * R2 + r]);
    }
    for (; m < M; m++, pass++) {
      tile_sums<Op, R2, 1>(x, w, K, r0, m, s, next.at(w, K, pass), next.rows(pass), k0, k1);
      for (int r = 0; r < R2; r++) emit(m, r0 + r, s[r]);
    }
  }
}

// tile_rows for rows of w too long for L1 (M <= kMaxChunkedRows): the passes run chunk by chunk of K, their
// partial sums added up. Not inlined: in tile_rows its sums and loops cost the short rows' loops their registers.
template <class Op, int R2, int MT, class Out>
__attribute__((noinline)) void tile_rows_chunked(const typename Op::T *x, const typename Op::T *w, int64_t M, int64_t N,
                                                 int64_t K, int64_t n, int64_t chunk, int64_t passes, int64_t repeats,
                                                 Out &out) {
  float sums[kMaxChunkedRows * kTileRows] = {};  // sums[m * kTileRows + r]: row m of x, row n + r of w
  for (int64_t k0 = 0; k0 < K; k0 += chunk)  // each chunk's passes prefetch that chunk of the next tile
    tile_passes<Op, R2, MT>(x, w, M, N, K, n, passes, repeats,
                            [&](int64_t m, int64_t row, float v) { sums[m * kTileRows + row - n] += v; },
                            k0, K - k0 < chunk ? K : k0 + chunk);
  for (int64_t m = 0; m < M; m++)
    for (int r = 0; r < kTileRows; r++) out(m, n + r, sums[m * kTileRows + r]);
}

// Tile t (rows t * kTileRows.. of w, fewer at the end) against all M rows of x: out(m, n, sum)
// for each. MT rows of x share each weight load where M > 1.
template <class Op, int R2, int MT, class Out>
__attribute__((always_inline)) inline void tile_rows(const typename Op::T *x, const typename Op::T *w, int64_t M, int64_t N,
                                                     int64_t K, int64_t t, Out &&out) {
  const int64_t n = t * kTileRows;
  float s[kTileRows];
  if (n + kTileRows > N) {  // the last rows, one at a time
    for (int64_t r = n; r < N; r++)
      for (int64_t m = 0; m < M; m++) {
        tile_sums<Op, 1, 1>(x, w, K, r, m, s);
        out(m, r, s[0]);
      }
    return;
  }
  if (M == 1) {
    tile_sums<Op, kTileRows, 1>(x, w, K, n, 0, s);
    for (int r = 0; r < kTileRows; r++) out(0, n + r, s[r]);
    return;
  }
  // R2 rows of w at a time (8 with AVX-512, 4 with AVX2: the accumulators the registers hold)
  const int64_t repeats = M / MT + M % MT, passes = (kTileRows / R2) * repeats;  // passes over each R2 rows; in all
  const int64_t chunk = chunk_of<typename Op::T, Op::kStep, R2>(K);
  if (repeats < 2 || chunk >= K || M > kMaxChunkedRows)
    tile_passes<Op, R2, MT>(x, w, M, N, K, n, passes, repeats, out);
  else
    tile_rows_chunked<Op, R2, MT>(x, w, M, N, K, n, chunk, passes, repeats, out);
}

inline int64_t tiles_of(int64_t N) { return (N + kTileRows - 1) / kTileRows; }

// y_i = x @ w_i.T for `count` weights (N_i, K) that read the same x: one parallel region over all
// their row tiles (a layer's q, k and v projections, or w1 and w3), so the weights stream back to
// back and the threads meet once.
template <class Op, int R2, int MT>
void linear_many(const typename Op::T *x, const typename Op::T *const *ws, typename Op::T *const *ys, const int64_t *Ns,
                 int count, int64_t M, int64_t K, int threads) {
  std::vector<int64_t> first(count + 1, 0);  // first[i]: index of weight i's first tile
  for (int i = 0; i < count; i++) first[i + 1] = first[i] + tiles_of(Ns[i]);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < first[count]; t++) {
    int i = 0;
    while (t >= first[i + 1]) i++;
    typename Op::T *y = ys[i];
    const int64_t N = Ns[i];
    tile_rows<Op, R2, MT>(x, ws[i], M, N, K, t - first[i], [=](int64_t m, int64_t n, float v) { put(y + m * N + n, v); });
  }
}

#if defined(LLAMA_ISA_AVX512VNNI)
// x rows quantized for the int8 kernel: int8 values, the block scales spread over the 16 lanes of
// each 64-value chunk (lanes 0-7: the chunk's first block, 8-15: its second), and per row the
// correction 128 * sum over blocks of scale * sum(values)
struct QuantizedRows {
  static constexpr int kPassRows = 2;  // rows of x that share each weight load (tile_sums_i8's MT)
  std::vector<int8_t> q;
  std::vector<float> lane_scales, correction;
};

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t *p) { return bf16x16(p); }

template <class TX>
void quantize_rows(const TX *x, int64_t M, int64_t K, QuantizedRows &out) {
  out.q.resize(M * K);
  out.lane_scales.resize(M * K / 4);
  out.correction.resize(M);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; m++) {
    double correction = 0;
    for (int64_t b = 0; b < K / 32; b++) {
      const TX *blk = x + m * K + b * 32;
      const __m512 lo = load16(blk), hi = load16(blk + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(lo, abs_mask), _mm512_and_ps(hi, abs_mask)));
      const float scale = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      // rounded to nearest even (the default rounding mode); |v| <= 127
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128((__m128i *)(out.q.data() + m * K + b * 32), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128((__m128i *)(out.q.data() + m * K + b * 32 + 16), _mm512_cvtsepi32_epi8(qhi));
      _mm256_storeu_ps(out.lane_scales.data() + m * K / 4 + b * 8, _mm256_set1_ps(scale));
      correction += 128.0 * scale * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
    out.correction[m] = (float)correction;
  }
}

// the products of rows n..n+R-1 of w (scales w_scale) with quantized rows m..m+MT-1 of x:
// out[j * R + r] = w_scale[n + r] * (sum - correction[m + j]); meanwhile prefetch_rows rows at `prefetch`
template <int R, int MT>
__attribute__((always_inline)) inline void tile_sums_i8(const QuantizedRows &x, const int8_t *__restrict w,
                                                        const float *__restrict w_scale, int64_t K, int64_t n, int64_t m,
                                                        float *out, const int8_t *prefetch = nullptr, int prefetch_rows = 0) {
  __m512 a[R * MT];
#pragma GCC unroll 16
  for (int i = 0; i < R * MT; i++) a[i] = _mm512_setzero_ps();
  const __m512i sign = _mm512_set1_epi8((char)0x80);
  const int8_t *wr = w + n * K;
  for (int64_t k = 0; k < K; k += 64) {
    __m512i xq[MT];
    __m512 xs[MT];
#pragma GCC unroll 8
    for (int j = 0; j < MT; j++) {
      xq[j] = _mm512_loadu_si512(x.q.data() + (m + j) * K + k);
      xs[j] = _mm512_loadu_ps(x.lane_scales.data() + (m + j) * K / 4 + k / 4);
    }
    for (int p = 0; p < prefetch_rows; p++) _mm_prefetch((const char *)(prefetch + p * K + k), _MM_HINT_T0);  // a line a step
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wr + r * K + k), sign);  // w + 128, unsigned
#pragma GCC unroll 8
      for (int j = 0; j < MT; j++) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xq[j]);  // 16 sums of 4 products
        a[j * R + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs[j], a[j * R + r]);
      }
    }
  }
  Lanes512::reduce<R * MT>(a, out);
  for (int j = 0; j < MT; j++)
    for (int r = 0; r < R; r++) out[j * R + r] = w_scale[n + r] * (out[j * R + r] - x.correction[m + j]);
}

#elif defined(LLAMA_ISA_AVX2)
// x rows quantized for the AVX2 int8 kernel: int8 values and one scale per block of 32
struct QuantizedRows {
  static constexpr int kPassRows = 1;  // 8 accumulators and the operands fill the 16 registers
  std::vector<int8_t> q;
  std::vector<float> scales;
};

inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t *p) { return bf16x8(_mm_loadu_si128((const __m128i *)p)); }

template <class TX>
void quantize_rows(const TX *x, int64_t M, int64_t K, QuantizedRows &out) {
  out.q.resize(M * K);
  out.scales.resize(M * K / 32);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // packs interleave 128-bit lanes: this puts the 8 groups of 4 values back in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < K / 32; b++) {
      const TX *blk = x + m * K + b * 32;
      __m256 v[4];
      for (int i = 0; i < 4; i++) v[i] = load8(blk + 8 * i);
      const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                      _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
      const float amax = hmax256(mx);
      const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      __m256i q[4];  // rounded to nearest even (the default rounding mode), as the AVX-512 kernel; |q| <= 127
      for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256((__m256i *)(out.q.data() + m * K + b * 32), _mm256_permutevar8x32_epi32(packed, order));
      out.scales[m * K / 32 + b] = amax / 127.0f;
    }
}

// the products of rows n..n+R-1 of w (scales w_scale) with quantized row m of x: out[r]; meanwhile
// prefetch_rows rows at `prefetch`, a line every two steps
template <int R, int MT>
__attribute__((always_inline)) inline void tile_sums_i8(const QuantizedRows &x, const int8_t *__restrict w,
                                                        const float *__restrict w_scale, int64_t K, int64_t n, int64_t m,
                                                        float *out, const int8_t *prefetch = nullptr, int prefetch_rows = 0) {
  static_assert(MT == 1, "the AVX2 int8 tile reads one row of x at a time");
  __m256 a[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t *wr = w + n * K, *xr = x.q.data() + m * K;
  const float *xs = x.scales.data() + m * K / 32;
  for (int64_t k = 0; k < K; k += 32) {
    const __m256i xq = _mm256_loadu_si256((const __m256i *)(xr + k));
    const __m256i ax = _mm256_sign_epi8(xq, xq);  // |x|
    const __m256 s = _mm256_broadcast_ss(xs + k / 32);
    if (k % 64 == 0)  // a cache line holds 64 of the int8 weights: two steps
      for (int p = 0; p < prefetch_rows; p++) _mm_prefetch((const char *)(prefetch + p * K + k), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(wr + r * K + k)), xq);  // w * sign(x)
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), ones);  // 8 sums of 4 products
      a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, a[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = w_scale[n + r] * hsum256(a[r]);
}
#endif

#if defined(LLAMA_ISA_AVX512VNNI) || defined(LLAMA_ISA_AVX2)
// tile t of an int8 weight against all M quantized rows of x: out(m, n, value) for each
template <class Out>
__attribute__((always_inline)) inline void tile_rows_i8(const QuantizedRows &x, const int8_t *w, const float *w_scale,
                                                        int64_t M, int64_t N, int64_t K, int64_t t, Out &&out) {
  constexpr int MT = QuantizedRows::kPassRows;
  const int64_t n = t * kTileRows;
  float s[kTileRows * MT];
  if (n + kTileRows > N) {  // the last rows, one at a time
    for (int64_t r = n; r < N; r++)
      for (int64_t m = 0; m < M; m++) {
        tile_sums_i8<1, 1>(x, w, w_scale, K, r, m, s);
        out(m, r, s[0]);
      }
    return;
  }
  const int64_t passes = M / MT + M % MT;
  NextTile next(n, N, passes, passes);
  int64_t m = 0, pass = 0;
  if constexpr (MT > 1) {
    for (; m + MT <= M; m += MT, pass++) {
      tile_sums_i8<kTileRows, MT>(x, w, w_scale, K, n, m, s, next.at(w, K, pass), next.rows(pass));
      for (int j = 0; j < MT; j++)
        for (int r = 0; r < kTileRows; r++) out(m + j, n + r, s[j * kTileRows + r]);
    }
  }
  for (; m < M; m++, pass++) {
    if (next.rows(pass) > 0)
      tile_sums_i8<kTileRows, 1>(x, w, w_scale, K, n, m, s, next.at(w, K, pass), next.rows(pass));
    else  // (no prefetch loop in the steps: a single row of x, as a batch-1 step, runs at memory speed)
      tile_sums_i8<kTileRows, 1>(x, w, w_scale, K, n, m, s);
    for (int r = 0; r < kTileRows; r++) out(m, n + r, s[r]);
  }
}

template <class TX>
void linear_i8(const TX *x, const int8_t *w, const float *w_scale, TX *y, int64_t M, int64_t N, int64_t K, int threads) {
  static thread_local QuantizedRows scratch;  // this calling thread's, reused: no allocation per call
  QuantizedRows &rows = scratch;  // named here: inside the parallel region the name would be each worker's own
  quantize_rows(x, M, K, rows);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles_of(N); t++)
    tile_rows_i8(rows, w, w_scale, M, N, K, t, [=](int64_t m, int64_t n, float v) { put(y + m * N + n, v); });
}
#endif

}  // namespace
