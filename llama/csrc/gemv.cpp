// y = x @ w.T for the few rows of a decode step, reading the weight once at memory speed.
//
// x: (M, K) activations, w: (N, K) dense row-major weight (the checkpoint's layout), y: (M, N),
// all float32 or all bfloat16; float32 accumulation. See simd.h for how the file is compiled
// (once per instruction set) and llama/native.py for how it is built, loaded and called.
//
// Why a kernel of our own: at batch 1 a decode step is a chain of matrix-vector products whose
// speed is the rate at which the weights stream from memory. oneDNN and MKL reach about 60-90%
// of it on small matrices; this loop keeps eight rows' streams in flight (eight accumulators
// against one activation vector) and reaches the read bandwidth (llama.kernel_choice measures
// it against them on each machine and keeps the faster).
//
// Tiles: rows R of w against MT rows of x, R * MT accumulators; for M == 1, R = 8; for more rows
// R x 2 (AVX-512: 8 x 2 = 16 accumulators, summed across lanes with one transpose tree).
// K must be a multiple of the vector step (16 float32, 32 bfloat16 for AVX-512; 8 and 16 for
// AVX2): the Python side checks and falls back to torch where it is not.
//
// int8 weights (llama/quantize.py: per-row scales, values in [-127, 127]) with AVX512-VNNI:
// each call first quantizes x to int8 in blocks of 32 with a float32 scale per block (as
// llama.cpp's Q8 activations: robust to a few large channels), then one vpdpbusd makes 64
// int8 products: it multiplies unsigned by signed bytes, so the weights are read as w + 128
// (an XOR of the sign bit) and 128 * sum(x) is taken off once per row of x. Each pair of
// blocks' int32 sums is scaled by its block scales into float32 accumulators. K must be a
// multiple of 64.

#include <vector>

#include "simd.h"

namespace {

// rows n..n+R-1 of w against rows m..m+MT-1 of x
template <class Op, int R, int MT>
__attribute__((always_inline)) inline void tile(const typename Op::T *__restrict x, const typename Op::T *__restrict w,
                                                typename Op::T *__restrict y, int64_t N, int64_t K, int64_t n, int64_t m) {
  typename Op::Acc a[R * MT];
#pragma GCC unroll 16
  for (int i = 0; i < R * MT; i++) a[i] = Op::zero();
  const typename Op::T *wr = w + n * K, *xr = x + m * K;
  for (int64_t k = 0; k < K; k += Op::kStep) {
    typename Op::X xv[MT];
#pragma GCC unroll 16
    for (int j = 0; j < MT; j++) xv[j] = Op::load_x(xr + j * K + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 16
      for (int j = 0; j < MT; j++) a[j * R + r] = Op::madd(a[j * R + r], xv[j], wr + r * K + k);
    }
  }
  float out[R * MT];
  Op::template reduce<R * MT>(a, out);
  for (int j = 0; j < MT; j++)
    for (int r = 0; r < R; r++) put(y + (m + j) * N + n + r, out[j * R + r]);
}

// y_i = x @ w_i.T for `count` weights (N_i, K) that read the same x: one parallel region over all
// their row tiles (a layer's q, k and v projections, or w1 and w3), so the weights stream back to
// back and the threads meet once.
template <class Op, int R, int MT>
void linear_many(const typename Op::T *x, const typename Op::T *const *ws, typename Op::T *const *ys, const int64_t *Ns,
                 int count, int64_t M, int64_t K, int threads) {
  if (count > 8) {  // first[] below holds 8: the rest in another call
    linear_many<Op, R, MT>(x, ws + 8, ys + 8, Ns + 8, count - 8, M, K, threads);
    count = 8;
  }
  const int rows = M == 1 ? 8 : R;  // rows of w per tile
  int64_t first[9] = {0};            // first[i]: index of weight i's first tile
  for (int i = 0; i < count; i++) first[i + 1] = first[i] + Ns[i] / rows;
  const int64_t tiles = first[count];
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    int i = 0;
    while (t >= first[i + 1]) i++;
    const int64_t n = (t - first[i]) * rows;
    if (M == 1) {
      tile<Op, 8, 1>(x, ws[i], ys[i], Ns[i], K, n, 0);
    } else {
      int64_t m = 0;
      for (; m + MT <= M; m += MT) tile<Op, R, MT>(x, ws[i], ys[i], Ns[i], K, n, m);
      for (; m < M; m++) tile<Op, R, 1>(x, ws[i], ys[i], Ns[i], K, n, m);
    }
  }
  for (int i = 0; i < count; i++)  // the last rows of each weight, one at a time
    for (int64_t n = Ns[i] / rows * rows; n < Ns[i]; n++)
      for (int64_t m = 0; m < M; m++) tile<Op, 1, 1>(x, ws[i], ys[i], Ns[i], K, n, m);
}

template <class Op, int R, int MT>
void linear(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear_many<Op, R, MT>(x, &w, &y, &N, 1, M, K, threads);
}

#if defined(LLAMA_ISA_AVX512VNNI)
// x rows quantized for the int8 kernel: int8 values, the block scales spread over the 16 lanes of
// each 64-value chunk (lanes 0-7: the chunk's first block, 8-15: its second), and per row the
// correction 128 * sum over blocks of scale * sum(values)
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> lane_scales, correction;
};

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t *p) {  // bfloat16 -> float32: a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

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

// rows n..n+R-1 of w against quantized rows m..m+MT-1 of x; y = w_scale * (sum - correction)
template <class TY, int R, int MT>
__attribute__((always_inline)) inline void tile_i8(const QuantizedRows &x, const int8_t *__restrict w,
                                                   const float *__restrict w_scale, TY *__restrict y, int64_t N, int64_t K,
                                                   int64_t n, int64_t m) {
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
  float out[R * MT];
  Lanes512::reduce<R * MT>(a, out);
  for (int j = 0; j < MT; j++)
    for (int r = 0; r < R; r++) put(y + (m + j) * N + n + r, w_scale[n + r] * (out[j * R + r] - x.correction[m + j]));
}

template <class TX>
void linear_i8(const TX *x, const int8_t *w, const float *w_scale, TX *y, int64_t M, int64_t N, int64_t K, int threads) {
  static thread_local QuantizedRows scratch;  // this calling thread's, reused: no allocation per call
  QuantizedRows &rows = scratch;  // named here: inside the parallel region the name would be each worker's own
  quantize_rows(x, M, K, rows);
  constexpr int R = 8, MT = 2;
  const int64_t tiles = N / R;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    int64_t m = 0;
    for (; m + MT <= M; m += MT) tile_i8<TX, R, MT>(rows, w, w_scale, y, N, K, t * R, m);
    for (; m < M; m++) tile_i8<TX, R, 1>(rows, w, w_scale, y, N, K, t * R, m);
  }
  for (int64_t n = N / R * R; n < N; n++)  // the last rows, one at a time
    for (int64_t m = 0; m < M; m++) tile_i8<TX, 1, 1>(rows, w, w_scale, y, N, K, n, m);
}
#endif

}  // namespace

// The entry points (ctypes): x (M, K), w (N, K), y (M, N), row-major and contiguous.
extern "C" {
// llama_linear_many_<suffix>: the same for `count` (at most 8) weights ws[i] (Ns[i], K) and outputs ys[i] (M, Ns[i])
#define LLAMA_LINEAR_MANY(suffix, Op, R, MT)                                                                    \
  void llama_linear_many_##suffix(const Op::T *x, const Op::T *const *ws, Op::T *const *ys, const int64_t *Ns, int count, \
                                  int64_t M, int64_t K, int threads) {                                          \
    linear_many<Op, R, MT>(x, ws, ys, Ns, count, M, K, threads);                                                \
  }

#if defined(LLAMA_ISA_AVX512)
LLAMA_LINEAR_MANY(f32_avx512, F32Avx512, 8, 2)
void llama_linear_f32_avx512(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear<F32Avx512, 8, 2>(x, w, y, M, N, K, threads);
}
#endif
#if defined(LLAMA_ISA_AVX512BF16)
LLAMA_LINEAR_MANY(bf16_avx512bf16, Bf16Avx512, 8, 2)
void llama_linear_bf16_avx512bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                                  int threads) {
  linear<Bf16Avx512, 8, 2>(x, w, y, M, N, K, threads);
}
#endif
#if defined(LLAMA_ISA_AVX2)
LLAMA_LINEAR_MANY(f32_avx2, F32Avx2, 4, 2)
LLAMA_LINEAR_MANY(bf16_avx2, Bf16Avx2, 4, 2)
void llama_linear_f32_avx2(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear<F32Avx2, 4, 2>(x, w, y, M, N, K, threads);
}
void llama_linear_bf16_avx2(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear<Bf16Avx2, 4, 2>(x, w, y, M, N, K, threads);
}
#endif
#if defined(LLAMA_ISA_AVX512VNNI)
// int8 w (N, K) with float32 per-row scales w_scale (N,); x and y float32 or bfloat16
void llama_linear_i8_f32_avx512vnni(const float *x, const int8_t *w, const float *w_scale, float *y, int64_t M, int64_t N,
                                    int64_t K, int threads) {
  linear_i8(x, w, w_scale, y, M, N, K, threads);
}
void llama_linear_i8_bf16_avx512vnni(const uint16_t *x, const int8_t *w, const float *w_scale, uint16_t *y, int64_t M,
                                     int64_t N, int64_t K, int threads) {
  linear_i8(x, w, w_scale, y, M, N, K, threads);
}
#endif
}
