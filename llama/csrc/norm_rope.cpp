// RMSNorm's and RoPE's entry points (ctypes), in the AVX2 objects; the kernels: norm_rope.h.
// A call with many rows (a prefill) shares them among `threads`; a decode step's few rows run on
// the calling thread (a parallel region would cost more than the work).

#include "norm_rope.h"

namespace {

constexpr int64_t kParallelElements = 1 << 16;  // below this many elements, one thread

template <class Op>
void rms_norm_rows(const typename Op::T *x, const typename Op::T *w, typename Op::T *y, int64_t R, int64_t D, float eps,
                   int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (R * D >= kParallelElements)
  for (int64_t r = 0; r < R; r++) rms_norm<Op>(x + r * D, w, y + r * D, D, eps);
}

template <class T>
void rope_rows(const T *x, const float *cos, const float *sin, T *y, int64_t B, int64_t S, int64_t H, int64_t D,
               int64_t cos_rows, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (B * S * H * D >= kParallelElements)
  for (int64_t bs = 0; bs < B * S; bs++) {
    const int64_t t = (cos_rows == 1 ? bs % S : bs);  // the token's row of the tables
    rope_token(x + bs * H * D, cos + t * D / 2, sin + t * D / 2, y + bs * H * D, H, D);
  }
}

}  // namespace

extern "C" {
#if defined(LLAMA_ISA_AVX2)
void llama_rms_norm_f32(const float *x, const float *w, float *y, int64_t R, int64_t D, float eps, int threads) {
  rms_norm_rows<F32Avx2>(x, w, y, R, D, eps, threads);
}
void llama_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t R, int64_t D, float eps, int threads) {
  rms_norm_rows<Bf16Avx2>(x, w, y, R, D, eps, threads);
}
void llama_rope_f32(const float *x, const float *cos, const float *sin, float *y, int64_t B, int64_t S, int64_t H,
                    int64_t D, int64_t cos_rows, int threads) {
  rope_rows(x, cos, sin, y, B, S, H, D, cos_rows, threads);
}
void llama_rope_bf16(const uint16_t *x, const float *cos, const float *sin, uint16_t *y, int64_t B, int64_t S, int64_t H,
                     int64_t D, int64_t cos_rows, int threads) {
  rope_rows(x, cos, sin, y, B, S, H, D, cos_rows, threads);
}
#endif
}
