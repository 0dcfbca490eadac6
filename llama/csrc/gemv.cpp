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

template <class Op, int R, int MT>
void linear(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t M, int64_t N, int64_t K, int threads) {
  if (M == 1) {
    const int64_t tiles = N / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) tile<Op, 8, 1>(x, w, y, N, K, t * 8, 0);
  } else {
    const int64_t tiles = N / R;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) {
      int64_t m = 0;
      for (; m + MT <= M; m += MT) tile<Op, R, MT>(x, w, y, N, K, t * R, m);
      for (; m < M; m++) tile<Op, R, 1>(x, w, y, N, K, t * R, m);
    }
  }
  for (int64_t n = (M == 1 ? N / 8 * 8 : N / R * R); n < N; n++)  // the last rows, one at a time
    for (int64_t m = 0; m < M; m++) tile<Op, 1, 1>(x, w, y, N, K, n, m);
}

}  // namespace

// The entry points (ctypes): x (M, K), w (N, K), y (M, N), row-major and contiguous.
extern "C" {
#if defined(LLAMA_ISA_AVX512)
void llama_linear_f32_avx512(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear<F32Avx512, 8, 2>(x, w, y, M, N, K, threads);
}
#endif
#if defined(LLAMA_ISA_AVX512BF16)
void llama_linear_bf16_avx512bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                                  int threads) {
  linear<Bf16Avx512, 8, 2>(x, w, y, M, N, K, threads);
}
#endif
#if defined(LLAMA_ISA_AVX2)
void llama_linear_f32_avx2(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear<F32Avx2, 4, 2>(x, w, y, M, N, K, threads);
}
void llama_linear_bf16_avx2(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear<Bf16Avx2, 4, 2>(x, w, y, M, N, K, threads);
}
#endif
}
