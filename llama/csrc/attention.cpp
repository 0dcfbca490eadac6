// The decode attention's entry points (ctypes); the kernel, and why it is ours: attention.h.

#include "attention.h"

// The entry points (ctypes): q (B, H, D), k and v (rows >= B, KVH, S, D), out (B, H, D), contiguous.
#define LLAMA_ATTENTION_ENTRY(name, Op)                                                                                 \
  void name(const Op::T *q, const Op::T *k, const Op::T *v, Op::T *out, const int64_t *lengths, int64_t B, int64_t H,    \
            int64_t KVH, int64_t S, int64_t D, float scale, int threads) {                                             \
    decode_attention<Op>(q, k, v, out, lengths, B, H, KVH, S, D, scale, threads);                                       \
  }

// llama_prefill_attention_<suffix>: q, out (S, H, D); k, v: one cache row's (KVH, Smax, D); the chunk's S
// tokens at positions start..start+S-1, their keys and values already in the row
#define LLAMA_PREFILL_ATTENTION_ENTRY(name, Op)                                                                         \
  void name(const Op::T *q, const Op::T *k, const Op::T *v, Op::T *out, int64_t S, int64_t start, int64_t H,           \
            int64_t KVH, int64_t Smax, int64_t D, float scale, int threads) {                                          \
    prefill_attention<Op>(q, k, v, out, S, start, H, KVH, Smax, D, scale, threads);                                     \
  }

extern "C" {
#if defined(LLAMA_ISA_AVX512)
LLAMA_ATTENTION_ENTRY(llama_decode_attention_f32_avx512, F32Avx512)
LLAMA_PREFILL_ATTENTION_ENTRY(llama_prefill_attention_f32_avx512, F32Avx512)
#endif
#if defined(LLAMA_ISA_AVX512BF16)
LLAMA_ATTENTION_ENTRY(llama_decode_attention_bf16_avx512bf16, Bf16Avx512)
LLAMA_PREFILL_ATTENTION_ENTRY(llama_prefill_attention_bf16_avx512bf16, Bf16Avx512)
#endif
#if defined(LLAMA_ISA_AVX2)
LLAMA_ATTENTION_ENTRY(llama_decode_attention_f32_avx2, F32Avx2)
LLAMA_ATTENTION_ENTRY(llama_decode_attention_bf16_avx2, Bf16Avx2)
LLAMA_PREFILL_ATTENTION_ENTRY(llama_prefill_attention_f32_avx2, F32Avx2)
LLAMA_PREFILL_ATTENTION_ENTRY(llama_prefill_attention_bf16_avx2, Bf16Avx2)
#endif
}
