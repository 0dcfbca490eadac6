// The matrix products' entry points (ctypes): x (M, K), w (N, K), y (M, N), row-major and
// contiguous; each runs one parallel region. The loops, and why they are ours: gemv.h.

#include "gemv.h"

namespace {

template <class Op, int R2, int MT>
void linear(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear_many<Op, R2, MT>(x, &w, &y, &N, 1, M, K, threads);
}

#if defined(LLAMA_ISA_AVX2)
// y = w * scale[row] for int8 rows w (N, K) with float32 per-row scales, in the activations' dtype:
// the product in float32, then (bfloat16) rounded to nearest even, as torch's
// (w.float() * scale[:, None]).to(dtype). Prefill with int8 weights runs oneDNN's GEMMs on blocks of
// rows dequantized by this (llama.linear_kernels.int8_prefill_dequantized): on the 7B shapes they ran
// 1.0-1.4x (32 rows) and 2.0-2.9x (128 rows) the speed of torch's int8 matmul on a Zen 5 EPYC.
inline __m256 dequantized8(const int8_t *w, __m256 scale) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w))), scale);
}

template <class T>
void dequantize_i8(const int8_t *w, const float *scales, T *y, int64_t N, int64_t K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; n++) {
    const int8_t *wr = w + n * K;
    T *yr = y + n * K;
    const float s = scales[n];
    const __m256 scale = _mm256_set1_ps(s);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 lo = dequantized8(wr + k, scale), hi = dequantized8(wr + k + 8, scale);
      if constexpr (sizeof(T) == 4) {
        _mm256_storeu_ps((float *)yr + k, lo);
        _mm256_storeu_ps((float *)yr + k + 8, hi);
      } else {  // 16 bfloat16: pack the two halves' 32-bit lanes to 16 bits, in order
        const __m256i packed = _mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi));
        _mm256_storeu_si256((__m256i *)(yr + k), _mm256_permute4x64_epi64(packed, 0xD8));
      }
    }
    for (; k < K; k++) put(yr + k, (float)wr[k] * s);
  }
}
#endif

}  // namespace

extern "C" {
#if defined(LLAMA_ISA_AVX2)
// llama_dequantize_i8_<dtype>: int8 w (N, K) and float32 scales (N,) -> y (N, K) float32 or bfloat16
void llama_dequantize_i8_f32(const int8_t *w, const float *scales, float *y, int64_t N, int64_t K, int threads) {
  dequantize_i8(w, scales, y, N, K, threads);
}
void llama_dequantize_i8_bf16(const int8_t *w, const float *scales, uint16_t *y, int64_t N, int64_t K, int threads) {
  dequantize_i8(w, scales, y, N, K, threads);
}
#endif
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
// llama_linear_i8_<dtype>_<isa>: int8 w (N, K) with float32 per-row scales w_scale (N,); x and y float32 or bfloat16
#define LLAMA_LINEAR_I8(suffix, TX)                                                                                     \
  void llama_linear_i8_##suffix(const TX *x, const int8_t *w, const float *w_scale, TX *y, int64_t M, int64_t N, int64_t K, \
                                int threads) {                                                                          \
    linear_i8(x, w, w_scale, y, M, N, K, threads);                                                                      \
  }
#if defined(LLAMA_ISA_AVX512VNNI)
LLAMA_LINEAR_I8(f32_avx512vnni, float)
LLAMA_LINEAR_I8(bf16_avx512vnni, uint16_t)
#endif
#if defined(LLAMA_ISA_AVX2)
LLAMA_LINEAR_I8(f32_avx2, float)
LLAMA_LINEAR_I8(bf16_avx2, uint16_t)
#endif
}
