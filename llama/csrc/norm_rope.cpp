// RMSNorm's and RoPE's entry points (ctypes), in the AVX2 objects; the kernels: norm_rope.h.

#include "norm_rope.h"

extern "C" {
#if defined(LLAMA_ISA_AVX2)
void llama_rms_norm_f32(const float *x, const float *w, float *y, int64_t R, int64_t D, float eps) {
  rms_norm<F32Avx2>(x, w, y, R, D, eps);
}
void llama_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t R, int64_t D, float eps) {
  rms_norm<Bf16Avx2>(x, w, y, R, D, eps);
}
void llama_rope_f32(const float *x, const float *cos, const float *sin, float *y, int64_t B, int64_t S, int64_t H,
                    int64_t D, int64_t cos_rows) {
  rope(x, cos, sin, y, B, S, H, D, cos_rows);
}
void llama_rope_bf16(const uint16_t *x, const float *cos, const float *sin, uint16_t *y, int64_t B, int64_t S, int64_t H,
                     int64_t D, int64_t cos_rows) {
  rope(x, cos, sin, y, B, S, H, D, cos_rows);
}
#endif
}
