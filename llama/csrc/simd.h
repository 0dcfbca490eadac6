// Vector operations shared by the native kernels (gemv.cpp, attention.cpp, norm_rope.cpp), one struct per
// instruction set and dtype. Each .cpp file is compiled once per instruction set, with
// -DLLAMA_ISA_AVX2 (-mavx2 -mfma), -DLLAMA_ISA_AVX512 (-mavx512f -mavx512bw -mavx512dq -mavx512vl
// -mfma), -DLLAMA_ISA_AVX512BF16 (the same and -mavx512bf16) or -DLLAMA_ISA_AVX512VNNI (the same
// and -mavx512vnni: int8 weights, which the AVX2 objects also have), and defines only that set's ops.
//
// An Op has:
//   T           the element type (float, or uint16_t holding bfloat16 bits)
//   X, Acc      an activation chunk of kStep elements; a float32 accumulator of kLanes lanes
//   zero()      a zero accumulator
//   load_x(p)   kStep elements of an activation (or query) row
//   madd(a,x,w) a += the products of x and kStep elements of a weight (or key) row at w
//   W, load_w   kStep elements of a weight row, loaded into registers once for several rows of x;
//               madd(a,x,wv) with them
//   reduce<n>   out[i] = the sum of a[i]'s lanes, for n accumulators
//   widen(p)    kLanes elements at p as float32 lanes            (attention: value rows)
//   store(p,a)  kLanes float32 lanes to kLanes elements of T at p (rounded to nearest even)
//   loadf, storef, set1, mul, fmadd, max, exp, hmax, hsum on float32 lanes (attention: softmax)
//   exp2        2^x on float32 lanes, for x <= 0 (the prefill attention's softmax, scores in base 2)
//   keep(a, n, fill)    lanes l < n of a, fill in the others
// and, for the prefill attention's blocks as small matrix products C += A B (attention.h):
//   kPair       elements of a row of A that one step takes: 1 float32, 2 bfloat16 (a pair along
//               the inner dimension, the operand of vdpbf16ps)
//   PA, bcast_pair(p)   p[0..kPair) in every lane
//   PB, load_pairs(p)   kLanes * kPair elements of B packed with kPair inner elements per lane
//   madd_pairs(a,x,w)   a += per lane the kPair products of x and w
//   gather_units(base, stride, valid, dst)   dst[l] = 32-bit unit base[l * stride] for l < valid,
//                                            0 for valid <= l < kLanes (a block of keys transposed)
//   interleave16(a, b, dst)   dst[l] = a[l] | b[l] << 16 for l < kLanes: two rows of 16-bit
//                             elements as pairs (b null: zeros)

#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

// Internal linkage: each instruction set's object has its own copies. With external linkage the
// linker would keep one copy of each inline function, possibly the AVX-512 one, for every object.
namespace {

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// v, kept in a register from here: GCC otherwise folds a load used by several FMAs into each of
// them (one load per FMA), and a core loads fewer vectors per cycle than it multiplies
template <class V>
__attribute__((always_inline)) inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

inline void put(float *y, float v) { *y = v; }
inline void put(uint16_t *y, float v) { *y = to_bf16(v); }
inline float get(const float *x) { return *x; }
inline float get(const uint16_t *x) { return from_bf16(*x); }

// e^x on float32 lanes: 2^n * e^f, n = round(x / ln 2), |f| <= ln(2)/2, e^f by its Taylor series
// to f^6 (relative error below 2e-7); x clamped to [-87, 88] (e^-87 ~ 1.6e-38: zero for a softmax).
#define LLAMA_EXP_BODY(V, set1, mul, fmadd, roundn, scale2n, clampmin, clampmax)               \
  x = clampmax(clampmin(x, set1(-87.0f)), set1(88.0f));                                               \
  V n = roundn(mul(x, set1(1.44269504088896341f)));                                                   \
  V f = fmadd(n, set1(-0.693359375f), x);                                                            \
  f = fmadd(n, set1(2.12194440e-4f), f);                                                              \
  V p = set1(1.0f / 720);                                                                             \
  p = fmadd(p, f, set1(1.0f / 120));                                                                  \
  p = fmadd(p, f, set1(1.0f / 24));                                                                   \
  p = fmadd(p, f, set1(1.0f / 6));                                                                    \
  p = fmadd(p, f, set1(0.5f));                                                                        \
  p = fmadd(p, f, set1(1.0f));                                                                        \
  p = fmadd(p, f, set1(1.0f));                                                                        \
  return scale2n(p, n);

// 2^x on float32 lanes for x <= 0: 2^n * 2^f, n = round(x), |f| <= 1/2, 2^f by the Taylor series of
// e^(f ln 2) to f^6 (relative error below 2e-7); x clamped to -126 (2^-126: zero for a softmax).
#define LLAMA_EXP2_BODY(V, set1, sub, fmadd, roundn, scale2n, clampmin)         \
  x = clampmin(x, set1(-126.0f));                                              \
  V n = roundn(x);                                                             \
  V f = sub(x, n);                                                             \
  V p = set1(1.5403530393381606e-4f);                                          \
  p = fmadd(p, f, set1(1.3333558146428443e-3f));                               \
  p = fmadd(p, f, set1(9.6181291076284772e-3f));                               \
  p = fmadd(p, f, set1(5.5504108664821580e-2f));                               \
  p = fmadd(p, f, set1(2.4022650695910071e-1f));                               \
  p = fmadd(p, f, set1(6.9314718055994531e-1f));                               \
  p = fmadd(p, f, set1(1.0f));                                                 \
  return scale2n(p, n);

#if defined(LLAMA_ISA_AVX512) || defined(LLAMA_ISA_AVX512BF16) || defined(LLAMA_ISA_AVX512VNNI)
// ---------------------------------------------------------------------------------------- AVX-512

// lane i of the result: the sum of v[i]'s 16 lanes (one transpose tree instead of 16 reductions)
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

inline __m512 round512(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

struct Lanes512 {  // float32 lanes: what both AVX-512 Ops share
  using Acc = __m512;
  static constexpr int kLanes = 16;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc set1(float v) { return _mm512_set1_ps(v); }
  static Acc loadf(const float *p) { return _mm512_loadu_ps(p); }
  static void storef(float *p, Acc a) { _mm512_storeu_ps(p, a); }
  static Acc mul(Acc a, Acc b) { return _mm512_mul_ps(a, b); }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
  static Acc fmadd(Acc a, Acc b, Acc c) { return _mm512_fmadd_ps(a, b, c); }
  static Acc max(Acc a, Acc b) { return _mm512_max_ps(a, b); }
  static float hmax(Acc a) { return _mm512_reduce_max_ps(a); }
  static float hsum(Acc a) { return _mm512_reduce_add_ps(a); }
  static Acc exp(Acc x) { LLAMA_EXP_BODY(__m512, _mm512_set1_ps, _mm512_mul_ps, _mm512_fmadd_ps, round512, _mm512_scalef_ps, _mm512_max_ps, _mm512_min_ps) }
  static Acc exp2(Acc x) { LLAMA_EXP2_BODY(__m512, _mm512_set1_ps, _mm512_sub_ps, _mm512_fmadd_ps, round512, _mm512_scalef_ps, _mm512_max_ps) }
  static Acc keep(Acc a, int64_t n, float fill) {
    const __mmask16 mask = n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), mask, a);
  }
  static void gather_units(const uint32_t *base, int64_t stride, int64_t valid, uint32_t *dst) {
    const __mmask16 mask = valid >= 16 ? (__mmask16)0xffff : valid <= 0 ? (__mmask16)0 : (__mmask16)((1u << valid) - 1);
    const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32((int)stride));
    _mm512_storeu_si512(dst, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, index, base, 4));
  }
  static void interleave16(const uint16_t *a, const uint16_t *b, uint32_t *dst) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)a));
    const __m512i hi = b ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)b)), 16) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst, _mm512_or_si512(lo, hi));
  }
  template <int n>
  static void reduce(const Acc *a, float *out) {
    if constexpr (n == 16) {
      _mm512_storeu_ps(out, sum16(a));
    } else {
      for (int i = 0; i < n; i++) out[i] = _mm512_reduce_add_ps(a[i]);
    }
  }
};

// in every AVX-512 object: the int8 ones (AVX512-VNNI) run float32 activations with it
struct F32Avx512 : Lanes512 {  // float32: 16 products per FMA
  using T = float;
  using X = __m512;
  static constexpr int kStep = 16;
  static X load_x(const T *x) { return _mm512_loadu_ps(x); }
  using W = __m512;
  static W load_w(const T *w) { return in_register(_mm512_loadu_ps(w)); }
  static Acc madd(Acc a, X x, W w) { return _mm512_fmadd_ps(x, w, a); }
  static Acc madd(Acc a, X x, const T *w) { return _mm512_fmadd_ps(x, _mm512_loadu_ps(w), a); }
  static Acc widen(const T *p) { return _mm512_loadu_ps(p); }
  static void store(T *p, Acc a) { _mm512_storeu_ps(p, a); }
  static constexpr int kPair = 1;
  using PA = __m512;
  using PB = __m512;
  static PA bcast_pair(const T *p) { return _mm512_set1_ps(*p); }
  static PB load_pairs(const T *p) { return _mm512_loadu_ps(p); }
  static Acc madd_pairs(Acc a, PA x, PB w) { return _mm512_fmadd_ps(x, w, a); }
};

inline __m512 bf16x16(const uint16_t *p) {  // bfloat16 -> float32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// bfloat16 without AVX512-BF16's instructions, widened to float32: 32 products per two FMAs (the
// int8 objects' bfloat16 activations: AVX512-VNNI CPUs need not have AVX512-BF16)
struct Bf16Avx512Widened : Lanes512 {
  using T = uint16_t;
  struct X {
    __m512 lo, hi;
  };
  static constexpr int kStep = 32;
  static X load_x(const T *x) { return X{bf16x16(x), bf16x16(x + 16)}; }
  using W = X;
  static W load_w(const T *w) { return W{in_register(bf16x16(w)), in_register(bf16x16(w + 16))}; }
  static Acc madd(Acc a, X x, W w) { return _mm512_fmadd_ps(x.hi, w.hi, _mm512_fmadd_ps(x.lo, w.lo, a)); }
  static Acc madd(Acc a, X x, const T *w) { return _mm512_fmadd_ps(x.hi, bf16x16(w + 16), _mm512_fmadd_ps(x.lo, bf16x16(w), a)); }
  static Acc widen(const T *p) { return bf16x16(p); }
  static void store(T *p, Acc a) {
    float f[16];
    _mm512_storeu_ps(f, a);
    for (int i = 0; i < 16; i++) p[i] = to_bf16(f[i]);
  }
};
#endif

#if defined(LLAMA_ISA_AVX512BF16)
struct Bf16Avx512 : Lanes512 {  // bfloat16 with AVX512-BF16: 32 products (pairs) per vdpbf16ps
  using T = uint16_t;
  using X = __m512bh;
  static constexpr int kStep = 32;
  static X load_x(const T *x) { return (__m512bh)_mm512_loadu_si512(x); }
  using W = __m512bh;
  static W load_w(const T *w) { return in_register((__m512bh)_mm512_loadu_si512(w)); }
  static Acc madd(Acc a, X x, W w) { return _mm512_dpbf16_ps(a, x, w); }
  static Acc madd(Acc a, X x, const T *w) { return _mm512_dpbf16_ps(a, x, (__m512bh)_mm512_loadu_si512(w)); }
  static Acc widen(const T *p) { return bf16x16(p); }
  static void store(T *p, Acc a) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(a)); }
  static constexpr int kPair = 2;
  using PA = __m512bh;
  using PB = __m512bh;
  static PA bcast_pair(const T *p) {
    int32_t pair;
    memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static PB load_pairs(const T *p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Acc madd_pairs(Acc a, PA x, PB w) { return _mm512_dpbf16_ps(a, x, w); }
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

inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 round256(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256 scale2n256(__m256 p, __m256 n) {  // p * 2^n for integral n in [-126, 127]
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

struct Lanes256 {
  using Acc = __m256;
  static constexpr int kLanes = 8;
  static Acc zero() { return _mm256_setzero_ps(); }
  static Acc set1(float v) { return _mm256_set1_ps(v); }
  static Acc loadf(const float *p) { return _mm256_loadu_ps(p); }
  static void storef(float *p, Acc a) { _mm256_storeu_ps(p, a); }
  static Acc mul(Acc a, Acc b) { return _mm256_mul_ps(a, b); }
  static Acc add(Acc a, Acc b) { return _mm256_add_ps(a, b); }
  static Acc fmadd(Acc a, Acc b, Acc c) { return _mm256_fmadd_ps(a, b, c); }
  static Acc max(Acc a, Acc b) { return _mm256_max_ps(a, b); }
  static float hmax(Acc a) { return hmax256(a); }
  static float hsum(Acc a) { return hsum256(a); }
  static Acc exp(Acc x) { LLAMA_EXP_BODY(__m256, _mm256_set1_ps, _mm256_mul_ps, _mm256_fmadd_ps, round256, scale2n256, _mm256_max_ps, _mm256_min_ps) }
  static Acc exp2(Acc x) { LLAMA_EXP2_BODY(__m256, _mm256_set1_ps, _mm256_sub_ps, _mm256_fmadd_ps, round256, scale2n256, _mm256_max_ps) }
  static Acc keep(Acc a, int64_t n, float fill) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? (n > 0 ? n : 0) : 8)), lanes));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), a, mask);
  }
  static void gather_units(const uint32_t *base, int64_t stride, int64_t valid, uint32_t *dst) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(valid < 8 ? valid : 8)), lanes);
    const __m256i index = _mm256_mullo_epi32(lanes, _mm256_set1_epi32((int)stride));
    _mm256_storeu_si256((__m256i *)dst, _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)base, index, mask, 4));
  }
  static void interleave16(const uint16_t *a, const uint16_t *b, uint32_t *dst) {
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)a));
    const __m256i hi = b ? _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)b)), 16) : _mm256_setzero_si256();
    _mm256_storeu_si256((__m256i *)dst, _mm256_or_si256(lo, hi));
  }
  template <int n>
  static void reduce(const Acc *a, float *out) {
    for (int i = 0; i < n; i++) out[i] = hsum256(a[i]);
  }
};

struct F32Avx2 : Lanes256 {  // float32: 8 products per FMA
  using T = float;
  using X = __m256;
  static constexpr int kStep = 8;
  static X load_x(const T *x) { return _mm256_loadu_ps(x); }
  using W = __m256;
  static W load_w(const T *w) { return in_register(_mm256_loadu_ps(w)); }
  static Acc madd(Acc a, X x, W w) { return _mm256_fmadd_ps(x, w, a); }
  static Acc madd(Acc a, X x, const T *w) { return _mm256_fmadd_ps(x, _mm256_loadu_ps(w), a); }
  static Acc widen(const T *p) { return _mm256_loadu_ps(p); }
  static void store(T *p, Acc a) { _mm256_storeu_ps(p, a); }
  static constexpr int kPair = 1;
  using PA = __m256;
  using PB = __m256;
  static PA bcast_pair(const T *p) { return _mm256_broadcast_ss(p); }
  static PB load_pairs(const T *p) { return _mm256_loadu_ps(p); }
  static Acc madd_pairs(Acc a, PA x, PB w) { return _mm256_fmadd_ps(x, w, a); }
};

inline __m256 bf16x8(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }

inline __m256i bf16_bits8(__m256 v) {  // as to_bf16: to nearest even, NaN stays NaN; in the low 16 bits of each lane
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

// a pair of bfloat16 in each 32-bit lane as two float32 vectors: the first elements, the second elements
struct Pairs256 {
  __m256 first, second;
};
inline Pairs256 split_pairs(__m256i v) {
  return Pairs256{_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000)))};
}

struct Bf16Avx2 : Lanes256 {  // bfloat16 without AVX512-BF16: widened to float32, 16 products per two FMAs
  using T = uint16_t;
  struct X {
    __m256 lo, hi;
  };
  static constexpr int kStep = 16;
  static X load_x(const T *x) {
    __m256i v = _mm256_loadu_si256((const __m256i *)x);
    return X{bf16x8(_mm256_castsi256_si128(v)), bf16x8(_mm256_extracti128_si256(v, 1))};
  }
  using W = X;
  static W load_w(const T *w) {
    const X v = load_x(w);
    return W{in_register(v.lo), in_register(v.hi)};
  }
  static Acc madd(Acc a, X x, W w) { return _mm256_fmadd_ps(x.hi, w.hi, _mm256_fmadd_ps(x.lo, w.lo, a)); }
  static Acc madd(Acc a, X x, const T *w) {
    __m256i v = _mm256_loadu_si256((const __m256i *)w);
    return _mm256_fmadd_ps(x.hi, bf16x8(_mm256_extracti128_si256(v, 1)), _mm256_fmadd_ps(x.lo, bf16x8(_mm256_castsi256_si128(v)), a));
  }
  static Acc widen(const T *p) { return bf16x8(_mm_loadu_si128((const __m128i *)p)); }
  static void store(T *p, Acc a) {  // 8 lanes' low 16 bits, in order: pack (per 128-bit half), then join the halves
    const __m256i bits = bf16_bits8(a);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08)));
  }
  static constexpr int kPair = 2;  // no vdpbf16ps: each pair's elements widened, two FMAs
  using PA = Pairs256;
  using PB = Pairs256;
  static PA bcast_pair(const T *p) {
    int32_t pair;
    memcpy(&pair, p, 4);
    return split_pairs(_mm256_set1_epi32(pair));
  }
  static PB load_pairs(const T *p) { return split_pairs(_mm256_loadu_si256((const __m256i *)p)); }
  static Acc madd_pairs(Acc a, PA x, PB w) { return _mm256_fmadd_ps(x.second, w.second, _mm256_fmadd_ps(x.first, w.first, a)); }
};
#endif

}  // namespace
