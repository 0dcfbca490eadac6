// y = x @ w.T for the few rows of a decode step, reading the weight once at memory speed.
//
// x: (M, K) activations, w: (N, K) dense row-major weight (the checkpoint's layout), y: (M, N),
// all float32 or all bfloat16; float32 accumulation. Built at first use by llama/native.py with
// the machine's C++ compiler, loaded with ctypes; no torch headers. The file is compiled once per
// instruction set (-DLLAMA_ISA_-mavx2 -mfma, -DLLAMA_ISA_..., -DLLAMA_ISA_AVX512BF16
// ...) into one library, and Python calls only the entry points whose instructions the CPU has
// (cpuinfo flags). Threads: OpenMP, the libgomp that torch has already loaded (same soname), with
// the thread count passed in (torch.get_num_threads()).
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

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline void put(float *y, float v) { *y = v; }
inline void put(uint16_t *y, float v) { *y = to_bf16(v); }

#if defined(LLAMA_ISA_AVX512) || defined(LLAMA_ISA_AVX512BF16)
// ---------------------------------------------------------------------------------------- AVX-512


// lane i of the result: the sum of v[i]'s 16 lanes
inline __m512 sum16(const __m512 *v) {
  __m512 g[4];
  for (int q = 0; q < 4; q++) {
    const __m512 *u = v + 4 * q;
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    g[q] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  }
  __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(g[0], g[1], 0x44), _mm512_shuffle_f32x4(g[0], g[1], 0xEE));
  __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(g[2], g[3], 0x44), _mm512_shuffle_f32x4(g[2], g[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xDD));
}

#endif

#if defined(LLAMA_ISA_AVX512)
struct F32Avx512 {  // float32: 16 products per FMA
  using T = float;
  using X = __m512;
  using Acc = __m512;
  static constexpr int kStep = 16;
  static Acc zero() { return _mm512_setzero_ps(); }
  static X load_x(const T *x) { return _mm512_loadu_ps(x); }
  static Acc madd(Acc a, X x, const T *w) { return _mm512_fmadd_ps(x, _mm512_loadu_ps(w), a); }
  template <int n>
  static void reduce(const Acc *a, float *out) {
    if constexpr (n == 16) {
      _mm512_storeu_ps(out, sum16(a));
    } else {
      for (int i = 0; i < n; i++) out[i] = _mm512_reduce_add_ps(a[i]);
    }
  }
};

#endif

#if defined(LLAMA_ISA_AVX512BF16)
struct Bf16Avx512 {  // bfloat16 with AVX512-BF16: 32 products (pairs) per vdpbf16ps
  using T = uint16_t;
  using X = __m512bh;
  using Acc = __m512;
  static constexpr int kStep = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static X load_x(const T *x) { return (__m512bh)_mm512_loadu_si512(x); }
  static Acc madd(Acc a, X x, const T *w) { return _mm512_dpbf16_ps(a, x, (__m512bh)_mm512_loadu_si512(w)); }
  template <int n>
  static void reduce(const Acc *a, float *out) {
    if constexpr (n == 16) {
      _mm512_storeu_ps(out, sum16(a));
    } else {
      for (int i = 0; i < n; i++) out[i] = _mm512_reduce_add_ps(a[i]);
    }
  }
};

#endif

#if defined(LLAMA_ISA_AVX2)
// ------------------------------------------------------------------------------------------ AVX2

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct F32Avx2 {  // float32: 8 products per FMA
  using T = float;
  using X = __m256;
  using Acc = __m256;
  static constexpr int kStep = 8;
  static Acc zero() { return _mm256_setzero_ps(); }
  static X load_x(const T *x) { return _mm256_loadu_ps(x); }
  static Acc madd(Acc a, X x, const T *w) { return _mm256_fmadd_ps(x, _mm256_loadu_ps(w), a); }
  template <int n>
  static void reduce(const Acc *a, float *out) {
    for (int i = 0; i < n; i++) out[i] = hsum256(a[i]);
  }
};

// bfloat16 -> float32 is a 16-bit shift: 16 weights become two float32 vectors
inline __m256 bf16_lo(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16)); }
inline __m256 bf16_hi(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16)); }

struct Bf16Avx2 {  // bfloat16 without AVX512-BF16: widened to float32, 16 products per two FMAs
  using T = uint16_t;
  struct X {
    __m256 lo, hi;
  };
  using Acc = __m256;
  static constexpr int kStep = 16;
  static Acc zero() { return _mm256_setzero_ps(); }
  static X load_x(const T *x) {
    __m256i v = _mm256_loadu_si256((const __m256i *)x);
    return X{bf16_lo(v), bf16_hi(v)};
  }
  static Acc madd(Acc a, X x, const T *w) {
    __m256i v = _mm256_loadu_si256((const __m256i *)w);
    return _mm256_fmadd_ps(x.hi, bf16_hi(v), _mm256_fmadd_ps(x.lo, bf16_lo(v), a));
  }
  template <int n>
  static void reduce(const Acc *a, float *out) {
    for (int i = 0; i < n; i++) out[i] = hsum256(a[i]);
  }
};

#endif

// ------------------------------------------------------------------------------------------ tiles

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
