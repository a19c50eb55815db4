/*
 * simd.h - the vector vocabulary of the kernels (internal, header-only): loads and
 * stores of 8 elements of either element type, widened to or rounded from double,
 * the ReLU mask's bits, and the fixed summation tree of 16 lanes.
 *
 * Every kernel body is written once against these helpers, with the element type
 * (`dt`: SYNCBN_F32 or SYNCBN_BF16) and the epilogue as compile-time constants, so
 * one body serves every combination (sums.c, apply.c). Elements are addressed by
 * base pointer and ELEMENT index, never by typed pointer arithmetic.
 *
 * GNU vector types (not intrinsics) wherever the compiler emits good code by
 * itself: it then targets AVX-512, AVX2 or SSE as the build allows, and each lane is
 * an ordinary IEEE double operation, so a vector step gives the bits of the scalar
 * steps it replaces (-ffp-contract=off keeps a*b+c as two roundings). Intrinsics are
 * used only where GCC 12's generic code is slow; each has a generic twin computing
 * the same bits (tests/test_repro_builds.sh compares the builds).
 *
 * What it does not do: no buffer is assumed aligned (users pass any 4-byte, or for
 * bfloat16 2-byte, alignment), except where a comment says so (streaming stores).
 */
#ifndef SYNCBN_SIMD_H
#define SYNCBN_SIMD_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__AVX__) || defined(__FMA__)
#include <immintrin.h> /* also for the kernels' AVX-only and FMA-only branches */
#endif

#include "syncbn.h"

/* Reassociation would change every sum's bits (and the reproducible mode's across
 * builds), finite-math would drop the NaN and Inf checks: CMakeLists.txt turns them
 * off after any user flags; this catches a build that does not go through it. */
#if defined(__FAST_MATH__) || __FINITE_MATH_ONLY__
#error "syncbn's kernels must be built without -ffast-math / -ffinite-math-only"
#endif

#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors only cross static, inlined calls */
typedef double sbn_v8d __attribute__((vector_size(64)));
typedef double sbn_v4d __attribute__((vector_size(32)));
typedef float sbn_v8f __attribute__((vector_size(32)));
typedef uint64_t sbn_v8u __attribute__((vector_size(64)));
typedef int64_t sbn_v8l __attribute__((vector_size(64)));
typedef uint32_t sbn_v8w __attribute__((vector_size(32)));
typedef int32_t sbn_v8i __attribute__((vector_size(32)));
typedef uint16_t sbn_v8h __attribute__((vector_size(16)));
typedef uint32_t sbn_v16u __attribute__((vector_size(64)));
typedef float sbn_v16f __attribute__((vector_size(64)));
typedef uint16_t sbn_v16h __attribute__((vector_size(32)));

#define SBN_INLINE static inline __attribute__((always_inline))

/* The mask is read byte-wise with bit i of element i at bit i % 8 of byte i / 8, and
 * written as 64-bit words: the same thing on a little-endian machine only. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the ReLU mask assumes little-endian words");

/* Masked (first k of 8) loads and stores in one instruction: float needs AVX-512F+VL,
 * bfloat16 (16-bit elements) AVX-512BW+VL as well. Without them callers take scalar
 * steps (the same values). */
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define SBN_HAVE_MASKED_F32 1
#else
#define SBN_HAVE_MASKED_F32 0
#endif
#if SBN_HAVE_MASKED_F32 && defined(__AVX512BW__)
#define SBN_HAVE_MASKED_BF16 1
#else
#define SBN_HAVE_MASKED_BF16 0
#endif
#define SBN_HAVE_MASKED(dt) ((dt) == SYNCBN_F32 ? SBN_HAVE_MASKED_F32 : SBN_HAVE_MASKED_BF16)

/* The AVX-512 subsets that every AVX-512 CPU since Skylake-X has together (F, DQ, BW,
 * VL): code that needs more than one of them asks for them all. */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SBN_AVX512 1
#else
#define SBN_AVX512 0
#endif

/* Streaming stores (non-temporal) of 32-byte vectors: AVX and later. (Without them,
 * an AVX2 build's normalize spent 80 % of its time on the ordinary stores' reads for
 * ownership of lines that leave the cache anyway.) */
#ifdef __AVX__
#define SBN_HAVE_NT 1
#else
#define SBN_HAVE_NT 0
#endif

SBN_INLINE int64_t sbn_esize(int dt) { return dt == SYNCBN_F32 ? 4 : 2; }

SBN_INLINE sbn_v8d sbn_bcast8(double v) { return (sbn_v8d){v, v, v, v, v, v, v, v}; }

SBN_INLINE sbn_v8d sbn_loadd8(const double *p) /* 8 doubles, any alignment */
{
    sbn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---- loads: 8 elements from element index i, widened exactly to double ---- */

/* bfloat16 bits h are the float with bits h << 16. */
SBN_INLINE sbn_v8f sbn_bf16_widen(sbn_v8h h)
{
#ifdef __AVX2__ /* vpmovzxwd + vpslld; GCC 12's generic widening shuffles halves */
    return (sbn_v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
    return (sbn_v8f)(__builtin_convertvector(h, sbn_v8w) << 16);
#endif
}

SBN_INLINE sbn_v8d sbn_f8_to_d8(sbn_v8f f)
{
#ifdef __AVX512F__ /* one vcvtps2pd ymm->zmm; the generic form is split in 128-bit halves */
    return (sbn_v8d)_mm512_cvtps_pd((__m256)f);
#else
    return __builtin_convertvector(f, sbn_v8d);
#endif
}

/* 8 elements as floats (exact for both types). */
SBN_INLINE sbn_v8f sbn_ldf8(int dt, const void *p, int64_t i)
{
    if (dt == SYNCBN_F32) {
        sbn_v8f v;
        memcpy(&v, (const float *)p + i, sizeof v);
        return v;
    }
    sbn_v8h h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return sbn_bf16_widen(h);
}

SBN_INLINE sbn_v8d sbn_ld8(int dt, const void *p, int64_t i) { return sbn_f8_to_d8(sbn_ldf8(dt, p, i)); }

/* The first k elements (0 < k < 8), zeros after; nothing past them is read. */
SBN_INLINE sbn_v8d sbn_ld8_first(int dt, const void *p, int64_t i, int64_t k)
{
#if SBN_HAVE_MASKED_F32
    if (dt == SYNCBN_F32)
        return (sbn_v8d)_mm512_cvtps_pd(_mm256_maskz_loadu_ps((__mmask8)((1u << k) - 1), (const float *)p + i));
#endif
#if SBN_HAVE_MASKED_BF16
    if (dt == SYNCBN_BF16)
        return sbn_f8_to_d8(
            sbn_bf16_widen((sbn_v8h)_mm_maskz_loadu_epi16((__mmask8)((1u << k) - 1), (const uint16_t *)p + i)));
#endif
    union {
        float f[8];
        uint16_t h[8];
    } t = {{0}};
    memcpy(&t, (const char *)p + i * sbn_esize(dt), (size_t)(k * sbn_esize(dt)));
    return sbn_ld8(dt, &t, 0);
}

SBN_INLINE double sbn_ld1(int dt, const void *p, int64_t i)
{
    if (dt == SYNCBN_F32)
        return ((const float *)p)[i];
    const uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* ---- rounding: double to the element type, held as floats ----
 * float: as a C cast (to nearest-even). bfloat16: to nearest-even ONCE, from the
 * double itself, never through float (which would round twice). Two ways, both
 * exact, so every build gives the same bits:
 *   - fast: round the double's own significand to bfloat16's 8 bits with integer
 *     arithmetic (add half an ulp minus one, plus the kept lsb; clear the rest), then
 *     convert to float, which is exact. Right wherever the result is a normal float:
 *     bfloat16's normal range is float's, and overflow (>= 2^128 after rounding)
 *     becomes Inf in the conversion. Not for results in the subnormal range (there
 *     bfloat16 has fewer than 8 bits), nor for NaN (whose payload the carry could
 *     run into the exponent and sign: a NaN would become -0).
 *   - general (those lanes, rare): to float rounding to ODD (truncate, then set the
 *     last bit if anything was lost), which keeps every bit the final rounding needs
 *     (float has 16 more significant bits than bfloat16, at least the 2 that
 *     round-to-odd requires, and finer spacing in every binade, subnormals included),
 *     then to nearest-even at bfloat16's 8 bits. A NaN becomes THE canonical quiet
 *     NaN 0x7FC0, whatever its sign and payload: x86 propagates the payload of
 *     whichever NaN operand comes first, and the compiler orders the operands of
 *     + and * differently in vector, masked and scalar steps and in each build, so
 *     only a canonical NaN keeps every build's bits the same.
 * The result's low 16 bits are zero: widening it back is exact. */
#define SBN_BF16_NAN 0x7FC00000u /* as float bits */
SBN_INLINE sbn_v8f sbn_round8_odd(const sbn_v8d *v)
{
    const sbn_v8f f = __builtin_convertvector(*v, sbn_v8f);
    const sbn_v8d back = __builtin_convertvector(f, sbn_v8d);
    const sbn_v8u mag = (sbn_v8u)sbn_bcast8(0) | INT64_MAX;
    const sbn_v8l away = (sbn_v8l)(((sbn_v8u)back & mag) > ((sbn_v8u)*v & mag)); /* -1: rounded away */
    const sbn_v8l lost = back != *v;                                               /* -1: inexact (or NaN) */
    sbn_v8w b = (sbn_v8w)f;
    b += (sbn_v8w)__builtin_convertvector(away, sbn_v8i); /* one step towards zero */
    b |= (sbn_v8w)__builtin_convertvector(lost, sbn_v8i) & 1u;
    b += 0x7FFFu + ((b >> 16) & 1u);
    b &= 0xFFFF0000u;
    const sbn_v8w nan = (sbn_v8w)__builtin_convertvector(*v != *v, sbn_v8i);
    return (sbn_v8f)((b & ~nan) | (SBN_BF16_NAN & nan));
}

SBN_INLINE sbn_v8f sbn_round8(int dt, const sbn_v8d *v)
{
#ifdef __AVX512F__
    if (dt == SYNCBN_F32)
        return (sbn_v8f)_mm512_cvtpd_ps((__m512d)*v);
#else
    if (dt == SYNCBN_F32)
        return __builtin_convertvector(*v, sbn_v8f);
#endif
    sbn_v8u u = (sbn_v8u)*v;
    u += ((UINT64_C(1) << 44) - 1) + ((u >> 45) & 1);
    u &= ~((UINT64_C(1) << 45) - 1);
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
    const __m256 f = _mm512_cvtpd_ps((__m512d)u);
    /* NaN is decided on the input (the carry may have made it anything); a finite
     * or infinite input gives a finite or infinite f, so only subnormal f is left. */
    if (__builtin_expect((_mm256_fpclass_ps_mask(f, 0x20) | _mm512_cmp_pd_mask((__m512d)*v, (__m512d)*v,
                                                                                 _CMP_UNORD_Q)) != 0, 0))
        return sbn_round8_odd(v);
    return (sbn_v8f)f;
#else
    const sbn_v8f f = __builtin_convertvector((sbn_v8d)u, sbn_v8f);
    const sbn_v8w e = (sbn_v8w)f & 0x7F800000u;
    const sbn_v8i bad = (sbn_v8i)(e == 0u) & (sbn_v8i)(((sbn_v8w)f & 0x7FFFFFFFu) != 0u); /* subnormal */
    const sbn_v8i nan = __builtin_convertvector(*v != *v, sbn_v8i); /* on the input, as above */
#ifdef __AVX__
    const int any = _mm256_movemask_ps((__m256)(bad | nan));
#else
    int any = 0;
    for (int j = 0; j < 8; j++)
        any |= bad[j] | nan[j];
#endif
    return any ? sbn_round8_odd(v) : f;
#endif
}

/* Values already exact in the element type (a copy of an input): no rounding. */
SBN_INLINE sbn_v8f sbn_exact8(const sbn_v8d *v)
{
#ifdef __AVX512F__
    return (sbn_v8f)_mm512_cvtpd_ps((__m512d)*v);
#else
    return __builtin_convertvector(*v, sbn_v8f);
#endif
}

SBN_INLINE float sbn_round1(int dt, double v)
{
    const float f = (float)v;
    if (dt == SYNCBN_F32)
        return f;
    /* the general way of sbn_round8 (the fast one gives the same bits where it applies) */
    if (v != v) {
        const uint32_t nb = SBN_BF16_NAN;
        float r;
        memcpy(&r, &nb, sizeof r);
        return r;
    }
    const double back = f;
    uint64_t bv, bb;
    memcpy(&bv, &v, sizeof bv), memcpy(&bb, &back, sizeof bb);
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    if ((bb & INT64_MAX) > (bv & INT64_MAX))
        b -= 1;
    if (back != v)
        b |= 1;
    b += 0x7FFFu + ((b >> 16) & 1u);
    b &= 0xFFFF0000u;
    float r;
    memcpy(&r, &b, sizeof r);
    return r;
}

/* ---- stores of rounded values (sbn_round8 / sbn_round1) ---- */

#if defined(__AVX512VL__) && defined(__AVX512BW__)
/* The upper halves of 8 floats, packed: one word permute. (GCC would fuse the
 * obvious vpmovdw with the store, and vpmovdw to memory is microcoded on some CPUs:
 * 2.5x slower bfloat16 passes measured on an AMD EPYC.) */
SBN_INLINE __m128i sbn_bf16_narrow(sbn_v8f f)
{
    const __m256i odd = _mm256_setr_epi16(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    return _mm256_castsi256_si128(_mm256_permutexvar_epi16(odd, (__m256i)f));
}
#endif

/* 8 elements at element i; streaming when nt (the address must then be 32-byte
 * (float) or 16-byte (bfloat16) aligned). */
SBN_INLINE void sbn_st8(int dt, void *p, int64_t i, sbn_v8f f, int nt)
{
    if (dt == SYNCBN_F32) {
#if SBN_HAVE_NT
        if (nt) {
            _mm256_stream_ps((float *)p + i, (__m256)f);
            return;
        }
#endif
        memcpy((float *)p + i, &f, sizeof f);
        return;
    }
#if defined(__AVX512VL__) && defined(__AVX512BW__)
    const __m128i h = sbn_bf16_narrow(f);
#else
    const sbn_v8h h = __builtin_convertvector((sbn_v8w)f >> 16, sbn_v8h);
#endif
#if SBN_HAVE_NT
    if (nt) {
        _mm_stream_si128((__m128i *)((uint16_t *)p + i), (__m128i)h);
        return;
    }
#endif
    memcpy((uint16_t *)p + i, &h, sizeof h);
    (void)nt;
}

/* The first k < 8 of them, one masked store (only where SBN_HAVE_MASKED(dt)). */
SBN_INLINE void sbn_st8_first(int dt, void *p, int64_t i, sbn_v8f f, int64_t k)
{
#if SBN_HAVE_MASKED_F32
    if (dt == SYNCBN_F32)
        _mm256_mask_storeu_ps((float *)p + i, (__mmask8)((1u << k) - 1), (__m256)f);
#endif
#if SBN_HAVE_MASKED_BF16
    if (dt == SYNCBN_BF16)
        _mm_mask_storeu_epi16((uint16_t *)p + i, (__mmask8)((1u << k) - 1), sbn_bf16_narrow(f));
#endif
    (void)dt, (void)p, (void)i, (void)f, (void)k;
}

SBN_INLINE void sbn_st1(int dt, void *p, int64_t i, float f)
{
    if (dt == SYNCBN_F32) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
}

/* Streaming stores are weakly ordered: each thread fences its own before the
 * region's closing barrier, so the data are visible to whoever reads them next. */
SBN_INLINE void sbn_nt_fence(int nt)
{
#if SBN_HAVE_NT
    if (nt)
        _mm_sfence();
#else
    (void)nt;
#endif
}

/* ---- the ReLU mask: bit i set where element i's pre-activation was > 0 ----
 * Readers may touch the byte after the last element's: the layer allocates it. */

/* Bits i .. i+7 as the low 8 bits. */
SBN_INLINE unsigned sbn_mask8(const uint8_t *m, int64_t i)
{
    const uint8_t *b = m + (i >> 3);
    if (!(i & 7)) /* rows of a multiple of 8 elements: every step, and predictably so */
        return b[0];
    return (unsigned)((b[0] | (unsigned)b[1] << 8) >> (i & 7)) & 0xFFu;
}

SBN_INLINE int sbn_mask1(const uint8_t *m, int64_t i) { return (m[i >> 3] >> (i & 7)) & 1; }

/* *v with the lanes whose bit is clear set to +0. */
SBN_INLINE sbn_v8d sbn_keep_bits(const sbn_v8d *v, unsigned bits)
{
#ifdef __AVX512F__
    return (sbn_v8d)_mm512_maskz_mov_pd((__mmask8)bits, (__m512d)*v);
#else
    const sbn_v8u lane = {1, 2, 4, 8, 16, 32, 64, 128};
    return (sbn_v8d)((sbn_v8u)*v & (sbn_v8u)((lane & (uint64_t)bits) != 0));
#endif
}

/* The same for 8 floats. */
SBN_INLINE sbn_v8f sbn_keep_bits_f(sbn_v8f v, unsigned bits)
{
#ifdef __AVX512VL__
    return (sbn_v8f)_mm256_maskz_mov_ps((__mmask8)bits, (__m256)v);
#else
    const sbn_v8w lane = {1, 2, 4, 8, 16, 32, 64, 128};
    return (sbn_v8f)((sbn_v8w)v & (sbn_v8w)((lane & bits) != 0));
#endif
}

/* Mask bits i .. i+15 as the low 16 bits. The four bytes from bit i's are read (one
 * load and a shift where bit i is not the first of its byte, as in NCHW rows of an
 * odd multiple of 4 elements), up to three past the byte of the last element used
 * (i + k - 1, k >= 1): the mask must have that slack, which the layer's (layer.c,
 * mask_reserve: a whole spare 64-bit word) always has. */
SBN_INLINE unsigned sbn_mask16(const uint8_t *m, int64_t i)
{
    const uint8_t *b = m + (i >> 3);
    if (!(i & 7)) {
        uint16_t w;
        memcpy(&w, b, sizeof w);
        return w;
    }
    uint32_t w;
    memcpy(&w, b, sizeof w);
    return (w >> (i & 7)) & 0xFFFFu;
}

/* 16 bfloat16 (as 8 words), elements whose bit is clear set to +0 (bits 0x0000). */
SBN_INLINE sbn_v8w sbn_keep16(sbn_v8w w, unsigned bits)
{
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return (sbn_v8w)_mm256_maskz_mov_epi16((__mmask16)bits, (__m256i)w);
#else
    const sbn_v16h lane = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
    return (sbn_v8w)((sbn_v16h)w & (sbn_v16h)((lane & (uint16_t)bits) != 0));
#endif
}

/* *v with lanes k..7 set to +0 (0 <= k <= 8). */
SBN_INLINE sbn_v8d sbn_keep_first(const sbn_v8d *v, int64_t k)
{
    const sbn_v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return (sbn_v8d)((sbn_v8u)*v & (sbn_v8u)(lane < (uint64_t)k));
}

/* ReLU of rounded values: +0 where !(f > 0) unless NaN; returns the mask bits
 * (f > 0) of the 8 lanes. */
SBN_INLINE unsigned sbn_relu8(sbn_v8f *f)
{
#if defined(__AVX512F__) && defined(__AVX512VL__) /* a 256-bit compare into a mask */
    const __mmask8 pos = _mm256_cmp_ps_mask((__m256)*f, _mm256_setzero_ps(), _CMP_GT_OQ);
    /* max(+0, f + 0): f + 0 turns -0 into +0 (exactly; other values unchanged), and
     * maxps returns its second operand when either is NaN, so NaN stays. */
    *f = (sbn_v8f)_mm256_max_ps(_mm256_setzero_ps(), _mm256_add_ps((__m256)*f, _mm256_setzero_ps()));
    return pos;
#elif defined(__AVX__) /* the generic form's bits, the mask by one movemask */
    const __m256 z = _mm256_setzero_ps(), v = (__m256)*f;
    *f = (sbn_v8f)_mm256_andnot_ps(_mm256_cmp_ps(v, z, _CMP_LE_OQ), v);
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, z, _CMP_GT_OQ));
#else
    const sbn_v8i pos = *f > 0, keep = ~(*f <= 0); /* NaN: not <= 0, kept */
    *f = (sbn_v8f)((sbn_v8i)*f & keep);
    const sbn_v8i lane = {1, 2, 4, 8, 16, 32, 64, 128};
    const sbn_v8i bits = pos & lane;
    return (unsigned)(bits[0] | bits[1] | bits[2] | bits[3] | bits[4] | bits[5] | bits[6] | bits[7]);
#endif
}

SBN_INLINE unsigned sbn_relu1(float *f)
{
    const unsigned pos = *f > 0;
    if (*f <= 0)
        *f = 0.0f;
    return pos;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* Mask bits i .. i+15 in a mask register (kmovw). The mask is a byte array, so the
 * two bytes are read with memcpy: _load_mask16 would dereference a __mmask16 pointer
 * at any byte address, which C does not allow (UBSan reports it). */
SBN_INLINE __mmask16 sbn_kmask16(const uint8_t *m, int64_t i)
{
    if (!(i & 7)) {
        uint16_t w;
        memcpy(&w, m + (i >> 3), sizeof w);
        return _cvtu32_mask16(w);
    }
    return (__mmask16)sbn_mask16(m, i);
}
#endif

/* Mask bits i .. i+63 as one word (nothing past the byte of bit i+63 is read). */
SBN_INLINE uint64_t sbn_mask64(const uint8_t *m, int64_t i)
{
    const uint8_t *b = m + (i >> 3);
    uint64_t w;
    memcpy(&w, b, sizeof w);
    if (!(i & 7))
        return w;
    return w >> (i & 7) | (uint64_t)b[8] << (64 - (i & 7));
}

/* 16 bfloat16 (as 8 words) at mask bits i .. i+15, the elements whose bit is clear
 * set to +0. */
SBN_INLINE sbn_v8w sbn_keep16_at(sbn_v8w w, const uint8_t *m, int64_t i)
{
#if SBN_AVX512
    return (sbn_v8w)_mm256_maskz_mov_epi16(sbn_kmask16(m, i), (__m256i)w);
#else
    return sbn_keep16(w, sbn_mask16(m, i));
#endif
}

/* dy at i .. i+7 with the lanes whose bit (bit j of `bits` for lane j) is clear set
 * to +0. */
SBN_INLINE sbn_v8d sbn_ldg8_bits(int dt, const void *dy, int64_t i, unsigned bits)
{
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (dt == SYNCBN_F32) {
        /* The widening itself zeroes the masked lanes (vcvtps2pd with a zeroing mask:
         * +0, as sbn_keep_bits gives): no separate masking step. The load stays an
         * ordinary one (the empty asm keeps the compiler from folding it into the
         * masked instruction): masked loads of dy measured slower on AMD Zen. */
        __m256 d;
        memcpy(&d, (const float *)dy + i, sizeof d);
        __asm__("" : "+v"(d));
        return (sbn_v8d)_mm512_maskz_cvtps_pd((__mmask8)bits, d);
    }
#endif
    sbn_v8d g = sbn_ld8(dt, dy, i);
    return sbn_keep_bits(&g, bits);
}

/* dy where the mask (when `relu`) says the forward's pre-activation was > 0. */
SBN_INLINE sbn_v8d sbn_ldg8(int dt, int relu, const void *dy, const uint8_t *m, int64_t i)
{
    return relu ? sbn_ldg8_bits(dt, dy, i, sbn_mask8(m, i)) : sbn_ld8(dt, dy, i);
}

SBN_INLINE sbn_v8d sbn_ldg8_first(int dt, int relu, const void *dy, const uint8_t *m, int64_t i, int64_t k)
{
    sbn_v8d g = sbn_ld8_first(dt, dy, i, k);
    return relu ? sbn_keep_bits(&g, sbn_mask8(m, i)) : g;
}

SBN_INLINE double sbn_ldg1(int dt, int relu, const void *dy, const uint8_t *m, int64_t i)
{
    return relu && !sbn_mask1(m, i) ? 0.0 : sbn_ld1(dt, dy, i);
}

/* ---- the fixed summation tree ----
 * 16 lanes (a[0] = lanes 0..7, a[1] = lanes 8..15): lane j + lane j+8, then j + j+4,
 * then j + j+2, then 0 + 1. */
SBN_INLINE double sbn_lanes16(const sbn_v8d *a)
{
    sbn_v8d v = a[0] + a[1];
    sbn_v4d lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    sbn_v4d w = lo + hi;
    double w0 = w[0] + w[2], w1 = w[1] + w[3];
    return w0 + w1;
}

#endif /* SYNCBN_SIMD_H */
