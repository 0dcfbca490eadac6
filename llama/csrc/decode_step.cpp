// A whole decode step of the model in one call: one new token for each of M cache rows (rows 0..M-1,
// or any M distinct rows), each at its own position, through every layer, to the logits.
//
// Why: at batch 1 the step's matrix products (gemv.h) read the weights at memory speed, and
// what is left is the cost of running the step as some 300 torch operators a layer's worth of
// Python at a time: on the 110m shape (Zen 5 EPYC, bfloat16) about 2 ms of a 7-7.6 ms step, each
// operator a few microseconds of dispatch and a parallel region of its own for a few kilobytes
// of work. Here the step is one parallel region; the threads meet at a barrier after each
// stage (7 per layer), and every stage shares its work among them.
//
// The math is llama/model.py's (Transformer.decode_step), stage by stage, rounding to the
// model's dtype where torch rounds: after each product, RMSNorm, RoPE, SiLU, the product with
// the up projection and each residual sum; the logits are rounded to the dtype and returned as
// float32. The products' sums run in another order than oneDNN's, so results agree within the
// dtype's rounding, not bit for bit (tests/test_native_step.py checks them against the model).
//
// Layout (llama/native_step.py fills it from a Transformer with model parallel size 1):
// StepModel and one StepLayer per layer, all weights row-major as in the checkpoint, the KV
// cache as llama.model.KVCache holds it: (cache rows, kv_heads, max_seq_len, head_dim) per layer.
// Weights are all float (the activations' dtype) or all int8 with float32 per-row scales
// (llama/quantize.py), as llama.kernel_choice's "gemv" and "int8-gemv" read them.

#include <math.h>

#include <vector>

#include "attention.h"
#include "gemv.h"
#include "norm_rope.h"

extern "C" {
struct StepLayer {  // mirrored by llama/native_step.py
  const void *attention_norm, *ffn_norm;
  const void *wq, *wk, *wv, *wo, *w1, *w2, *w3;
  const float *sq, *sk, *sv, *so, *s1, *s2, *s3;  // int8 weights' per-row scales (unused for float weights)
  void *cache_k, *cache_v;
};

struct StepModel {  // mirrored by llama/native_step.py
  int64_t dim, hidden, heads, kv_heads, head_dim, vocab, n_layers, max_seq_len;
  float eps;
  const void *embedding;  // (vocab, dim), the activations' dtype
  const void *norm;
  const void *output;
  const float *output_scales;
  const float *rope_cos, *rope_sin;  // (max_seq_len, head_dim / 2)
  const StepLayer *layers;
};
}

namespace {

constexpr int64_t MAX_STEP_ROWS = 16;  // rows (tokens) per step: llama.native.MAX_STEP_ROWS

// How a stage's product reads its weights: dense ones in the activations' dtype...
template <class Op, int R2, int MT>
struct FloatWeights {
  using T = typename Op::T;
  struct Input {  // a stage's input, as the tiles read it
    const T *x;
  };
  static void prepare(Input &in, const T *x, int64_t, int64_t) { in.x = x; }
  template <class Out>
  static void tile(const Input &in, const void *w, const float *, int64_t M, int64_t N, int64_t K, int64_t t, Out &&out) {
    tile_rows<Op, R2, MT>(in.x, (const T *)w, M, N, K, t, out);
  }
};

#if defined(LLAMA_ISA_AVX512VNNI) || defined(LLAMA_ISA_AVX2)
// ... or int8 with per-row scales: each thread quantizes the stage's input for itself (M rows of
// dim or hidden values, 768 to 176K at M = 16: at decode sizes cheaper than another barrier)
template <class Op>
struct Int8Weights {
  using T = typename Op::T;
  struct Input {
    QuantizedRows rows;
  };
  static void prepare(Input &in, const T *x, int64_t M, int64_t K) { quantize_rows(x, M, K, in.rows); }
  template <class Out>
  static void tile(const Input &in, const void *w, const float *scales, int64_t M, int64_t N, int64_t K, int64_t t, Out &&out) {
    tile_rows_i8(in.rows, (const int8_t *)w, scales, M, N, K, t, out);
  }
};
#endif

template <class T>
inline float rounded(float v) {  // v as the dtype holds it
  T t;
  put(&t, v);
  return get(&t);
}

// rows[b]: the cache row of token b (null: row b)
template <class Op, class W>
void decode_step(const StepModel &md, const int64_t *tokens, const int64_t *positions, const int64_t *rows, int64_t M,
                 float *logits, int threads) {
  using T = typename Op::T;
  const int64_t dim = md.dim, hidden = md.hidden, H = md.heads, KVH = md.kv_heads, D = md.head_dim, S = md.max_seq_len;
  const int64_t rep = H / KVH, qdim = H * D, kvdim = KVH * D, half = D / 2;
  const float scale = 1.0f / sqrtf((float)D);
  static thread_local std::vector<T> scratch;  // the calling thread's, reused
  scratch.resize(M * (2 * dim + 2 * qdim + 2 * kvdim + hidden));
  T *h = scratch.data(), *xn = h + M * dim, *q = xn + M * dim, *k = q + M * qdim, *v = k + M * kvdim;
  T *attn = v + M * kvdim, *act = attn + M * qdim;

#pragma omp parallel num_threads(threads)
  {
    typename W::Input in;
    std::vector<float> scores(S);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < M; b++) memcpy(h + b * dim, (const T *)md.embedding + tokens[b] * dim, dim * sizeof(T));

    // h + the product of in with w (N = dim), rounded as torch rounds: each term, then the sum
    auto residual = [&](const void *w, const float *s, int64_t K) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles_of(dim); t++)
        W::tile(in, w, s, M, dim, K, t, [&](int64_t b, int64_t n, float y) {
          put(h + b * dim + n, get(h + b * dim + n) + rounded<T>(y));
        });
    };
    auto norm = [&](const void *weight) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < M; b++) rms_norm<Op>(h + b * dim, (const T *)weight, xn + b * dim, dim, md.eps);
    };

    for (int64_t l = 0; l < md.n_layers; l++) {
      const StepLayer &L = md.layers[l];
      norm(L.attention_norm);
      W::prepare(in, xn, M, dim);
      // q, k and v: one loop over all their tiles
      const int64_t tq = tiles_of(qdim), tk = tiles_of(kvdim);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tq + 2 * tk; t++) {
        const bool is_q = t < tq, is_k = !is_q && t < tq + tk;
        const void *w = is_q ? L.wq : is_k ? L.wk : L.wv;
        const float *s = is_q ? L.sq : is_k ? L.sk : L.sv;
        T *y = is_q ? q : is_k ? k : v;
        const int64_t N = is_q ? qdim : kvdim;
        W::tile(in, w, s, M, N, dim, is_q ? t : is_k ? t - tq : t - tq - tk,
                [&](int64_t b, int64_t n, float val) { put(y + b * N + n, val); });
      }
      // per cache row and kv head: RoPE, the new key and value into the cache, attention
#pragma omp for schedule(static)
      for (int64_t task = 0; task < M * KVH; task++) {
        const int64_t b = task / KVH, g = task % KVH, pos = positions[b], row = rows ? rows[b] : b;
        const float *c = md.rope_cos + pos * half, *sn = md.rope_sin + pos * half;
        T *ck = (T *)L.cache_k + ((row * KVH + g) * S) * D, *cv = (T *)L.cache_v + ((row * KVH + g) * S) * D;
        rope_token(q + b * qdim + g * rep * D, c, sn, q + b * qdim + g * rep * D, rep, D);
        rope_token(k + b * kvdim + g * D, c, sn, ck + pos * D, 1, D);
        memcpy(cv + pos * D, v + b * kvdim + g * D, D * sizeof(T));
        attend_group<Op>(q + b * qdim, ck, cv, attn + b * qdim, g, rep, pos + 1, D, scale, scores.data());
      }
      W::prepare(in, attn, M, qdim);
      residual(L.wo, L.so, qdim);
      norm(L.ffn_norm);
      W::prepare(in, xn, M, dim);
      // SwiGLU: silu(w1 x) * (w3 x), tile by tile (the same rows of w1 and w3)
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles_of(hidden); t++) {
        float gate[MAX_STEP_ROWS * kTileRows];
        const int64_t n0 = t * kTileRows;
        W::tile(in, L.w1, L.s1, M, hidden, dim, t, [&](int64_t b, int64_t n, float y) { gate[b * kTileRows + n - n0] = y; });
        W::tile(in, L.w3, L.s3, M, hidden, dim, t, [&](int64_t b, int64_t n, float up) {
          const float g = rounded<T>(gate[b * kTileRows + n - n0]);
          put(act + b * hidden + n, rounded<T>(g / (1.0f + expf(-g))) * rounded<T>(up));
        });
      }
      W::prepare(in, act, M, hidden);
      residual(L.w2, L.s2, hidden);
    }
    norm(md.norm);
    W::prepare(in, xn, M, dim);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles_of(md.vocab); t++)
      W::tile(in, md.output, md.output_scales, M, md.vocab, dim, t,
              [&](int64_t b, int64_t n, float y) { logits[b * md.vocab + n] = rounded<T>(y); });
  }
}

}  // namespace

// The entry points (ctypes): tokens, positions, rows (M,) int64 (rows: each token's cache row, distinct;
// null for rows 0..M-1); logits (M, vocab) float32. Each returns 0, or 1 (having done nothing) for M
// outside 1..MAX_STEP_ROWS. Tokens must be ids of the vocabulary, positions below max_seq_len and rows
// below the cache's: llama/native_step.py checks them.
#if defined(LLAMA_ISA_AVX512)
using F32Avx512Float = FloatWeights<F32Avx512, 8, 2>;
#endif
#if defined(LLAMA_ISA_AVX512BF16)
using Bf16Avx512Float = FloatWeights<Bf16Avx512, 8, 2>;
#endif
#if defined(LLAMA_ISA_AVX2)
using F32Avx2Float = FloatWeights<F32Avx2, 4, 2>;
using Bf16Avx2Float = FloatWeights<Bf16Avx2, 4, 2>;
#endif

#define LLAMA_STEP_ENTRY(name, Op, W)                                                                                  \
  int name(const StepModel *model, const int64_t *tokens, const int64_t *positions, const int64_t *rows, int64_t M,     \
           float *logits, int threads) {                                                                                \
    if (M < 1 || M > MAX_STEP_ROWS) return 1;                                                                           \
    decode_step<Op, W>(*model, tokens, positions, rows, M, logits, threads);                                            \
    return 0;                                                                                                           \
  }

extern "C" {
#if defined(LLAMA_ISA_AVX512)
LLAMA_STEP_ENTRY(llama_decode_step_f32_avx512, F32Avx512, F32Avx512Float)
#endif
#if defined(LLAMA_ISA_AVX512BF16)
LLAMA_STEP_ENTRY(llama_decode_step_bf16_avx512bf16, Bf16Avx512, Bf16Avx512Float)
#endif
#if defined(LLAMA_ISA_AVX2)
LLAMA_STEP_ENTRY(llama_decode_step_f32_avx2, F32Avx2, F32Avx2Float)
LLAMA_STEP_ENTRY(llama_decode_step_bf16_avx2, Bf16Avx2, Bf16Avx2Float)
LLAMA_STEP_ENTRY(llama_decode_step_i8_f32_avx2, F32Avx2, Int8Weights<F32Avx2>)
LLAMA_STEP_ENTRY(llama_decode_step_i8_bf16_avx2, Bf16Avx2, Int8Weights<Bf16Avx2>)
#endif
#if defined(LLAMA_ISA_AVX512VNNI)
LLAMA_STEP_ENTRY(llama_decode_step_i8_f32_avx512vnni, F32Avx512, Int8Weights<F32Avx512>)
LLAMA_STEP_ENTRY(llama_decode_step_i8_bf16_avx512vnni, Bf16Avx512Widened, Int8Weights<Bf16Avx512Widened>)
#endif
}
