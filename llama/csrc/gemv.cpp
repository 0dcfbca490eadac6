// The matrix products' entry points (ctypes): x (M, K), w (N, K), y (M, N), row-major and
// contiguous; each runs one parallel region. The loops, and why they are ours: gemv.h.

#include "gemv.h"

namespace {

template <class Op, int R2, int MT>
void linear(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t M, int64_t N, int64_t K, int threads) {
  linear_many<Op, R2, MT>(x, &w, &y, &N, 1, M, K, threads);
}

}  // namespace

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
