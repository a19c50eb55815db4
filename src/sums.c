/*
 * sums.c - the per-channel sums of BN: forward (x, x^2) and backward (g, g*(x - m)),
 * FAST (double) and REPRODUCIBLE (exact accumulators), for every element type and
 * with or without the ReLU mask applied to dy.
 *
 * Memory-bound by design: each kernel streams its inputs once. Inner loops keep
 * SBN_LANES independent double accumulators as GNU vectors of 8 doubles (one AVX-512
 * register), so nothing is reassociated (no reassociating compiler flags needed), and
 * the lanes are combined in a fixed order; vector bodies and scalar tails round
 * identically. See moments.h for the reduction order and examples/bench.c to measure.
 */
#include "moments.h"
#include "simd.h"

#include <omp.h>
#include <stdint.h>
#include <string.h>

#define SBN_LANES 16
#define SBN_CBLOCK 256              /* NHWC channel sub-block held in registers/L1 */
#define SBN_RENORM_EVERY (1 << 29)  /* deposits between exactsum normalizations */
#define SBN_ROW_SPLIT_BYTES 256     /* NHWC: below this many bytes of a row per thread, split samples */
#define SBN_PART_MAX 4096           /* ... if n*C partials fit on the stack (64 KiB) */

/* Variants of the typed passes, as the bits of one compile-time constant:
 *   SV_KIND  0: forward sums (x, x^2);  1: backward sums (g, g*(x - m))
 *   SV_BF16  elements are bfloat16 (else float)
 *   SV_RELU  g is dy masked by the ReLU mask (else g = dy)
 * SV_DISPATCH(v, CALL) expands CALL(V) for the run-time v as the matching constant V,
 * so every body below is written once and instantiated per variant. */
enum { SV_KIND = 1, SV_BF16 = 2, SV_RELU = 4 };
#define SV_DISPATCH(v, CALL)                                                  \
    switch (v) {                                                              \
    case 0: CALL(0); break;                                                   \
    case SV_BF16: CALL(SV_BF16); break;                                       \
    case SV_KIND: CALL(SV_KIND); break;                                       \
    case SV_KIND | SV_BF16: CALL(SV_KIND | SV_BF16); break;                   \
    case SV_KIND | SV_RELU: CALL(SV_KIND | SV_RELU); break;                   \
    default: CALL(SV_KIND | SV_BF16 | SV_RELU); break; /* the last one left */ \
    }

/* The inputs of a typed pass, addressed by element index. */
typedef struct {
    const void *x, *dy;
    const uint8_t *mask; /* SV_RELU only */
    const double *mean;  /* SV_KIND only: [C] */
} sv_in;

#define SV_DT(v) ((v) & SV_BF16 ? SYNCBN_BF16 : SYNCBN_F32)
SBN_INLINE sbn_v8d sv_x8(int v, const sv_in *in, int64_t i) { return sbn_ld8(SV_DT(v), in->x, i); }
SBN_INLINE sbn_v8d sv_g8(int v, const sv_in *in, int64_t i)
{
    return sbn_ldg8(SV_DT(v), (v & SV_RELU) != 0, in->dy, in->mask, i);
}
SBN_INLINE double sv_x1(int v, const sv_in *in, int64_t i) { return sbn_ld1(SV_DT(v), in->x, i); }
SBN_INLINE double sv_g1(int v, const sv_in *in, int64_t i)
{
    return sbn_ldg1(SV_DT(v), (v & SV_RELU) != 0, in->dy, in->mask, i);
}

/* ---- 16 elements at once: bfloat16 pairs ----
 * Widening 8 bfloat16 takes a zero-extension shuffle and a shift, twice the work of
 * 8 floats for half the bytes. Read as 32-bit words instead, 16 bfloat16 are 8 words
 * holding two elements each (little-endian: the even element in the low half), so
 * the odd elements ARE the floats (word & 0xFFFF0000) and the even ones (word << 16):
 * one integer operation per 8 elements, no shuffle. The two vectors then hold the
 * even positions i, i+2, ..., i+14 and the odd ones: a sum keeps one accumulator
 * lane per position class mod 16 either way, only the lane NUMBERS differ, and
 * sv_unpair puts them back in position order before the lanes are combined, so
 * every addition is the one the position-ordered lanes make (same bits).
 * For float, the 16 come as elements i..i+7 and i+8..i+15 (no pairing). The ReLU
 * mask is applied to the 16-bit elements before widening (a masked element is +0,
 * as in sbn_ldg8). */
SBN_INLINE void sv_split16(sbn_v8w w, sbn_v8d *even, sbn_v8d *odd)
{
    *even = sbn_f8_to_d8((sbn_v8f)(w << 16));
    *odd = sbn_f8_to_d8((sbn_v8f)(w & 0xFFFF0000u));
}

/* x (g = 0) or g (g = 1; masked when SV_RELU) at elements i .. i+15: the first k of
 * them when 0 < k < 16 (zeros after, nothing past them read), all when k == 16. */
SBN_INLINE void sv_ld16(int v, int g, const sv_in *in, int64_t i, int64_t k, sbn_v8d *lo, sbn_v8d *hi)
{
    const void *p = g ? in->dy : in->x;
    const int relu = g && (v & SV_RELU);
    if (!(v & SV_BF16)) {
        if (relu && k == 16) { /* the 16 mask bits read once */
            const unsigned gb = sbn_mask16(in->mask, i);
            *lo = sbn_ldg8_bits(SYNCBN_F32, p, i, gb & 0xFFu);
            *hi = sbn_ldg8_bits(SYNCBN_F32, p, i + 8, gb >> 8);
            return;
        }
        const int64_t k0 = k < 8 ? k : 8, k1 = k - k0;
        *lo = k0 == 8 ? sbn_ldg8(SYNCBN_F32, relu, p, in->mask, i)
                      : sbn_ldg8_first(SYNCBN_F32, relu, p, in->mask, i, k0);
        *hi = k1 == 8   ? sbn_ldg8(SYNCBN_F32, relu, p, in->mask, i + 8)
              : k1 > 0 ? sbn_ldg8_first(SYNCBN_F32, relu, p, in->mask, i + 8, k1)
                       : (sbn_v8d){0};
        return;
    }
    sbn_v8w w;
    if (k == 16) {
        memcpy(&w, (const uint16_t *)p + i, sizeof w);
    } else {
#if SBN_HAVE_MASKED_BF16
        w = (sbn_v8w)_mm256_maskz_loadu_epi16((__mmask16)((1u << k) - 1), (const uint16_t *)p + i);
#else
        uint16_t t[16] = {0};
        memcpy(t, (const uint16_t *)p + i, (size_t)k * sizeof *t);
        memcpy(&w, t, sizeof w);
#endif
    }
    if (relu)
        w = sbn_keep16_at(w, in->mask, i);
    sv_split16(w, lo, hi);
}

/* Accumulators of sv_ld16's two vectors back in position order (lanes 0-7, 8-15). */
SBN_INLINE void sv_unpair(int v, sbn_v8d *lo, sbn_v8d *hi)
{
    if (!(v & SV_BF16))
        return;
    const sbn_v8d e = *lo, o = *hi;
    for (int j = 0; j < 4; j++) {
        (*lo)[2 * j] = e[j], (*lo)[2 * j + 1] = o[j];
        (*hi)[2 * j] = e[j + 4], (*hi)[2 * j + 1] = o[j + 4];
    }
}

/* Two vectors of 8 per-element doubles in position order (lanes 0-7, 8-15) put in
 * sv_ld16's order: the inverse of sv_unpair. */
SBN_INLINE void sv_pair_means(sbn_v8d *lo, sbn_v8d *hi)
{
    const sbn_v8d a = *lo, b = *hi;
    for (int j = 0; j < 4; j++) {
        (*lo)[j] = a[2 * j], (*lo)[j + 4] = b[2 * j];
        (*hi)[j] = a[2 * j + 1], (*hi)[j + 4] = b[2 * j + 1];
    }
}

/* The number of sv_ld16(k) positions in each vector: the first k elements. */
SBN_INLINE int64_t sv_lo_count(int v, int64_t k) { return v & SV_BF16 ? (k + 1) / 2 : (k < 8 ? k : 8); }
SBN_INLINE int64_t sv_hi_count(int v, int64_t k) { return v & SV_BF16 ? k / 2 : (k < 8 ? 0 : k - 8); }

/* The exact blocks below read only doubles, or floats packed by the caller. */
static inline sbn_v8d load8(const float *p) { return sbn_ld8(SYNCBN_F32, p, 0); }

/* ---- per-sample partials of one (sample, channel) row, NCHW ---- */

/* Builds with AVX2 and without AVX-512: rows_partials on 256-bit vectors. GCC 12 has
 * no register mode for a 64-byte vector without AVX-512, so rows_partials' sbn_v8d
 * accumulators live on the stack there, and every step stores and reloads them
 * (measured 4.6x the AVX-512 build's time at 14x14). Here each of a row's two 8-lane
 * accumulators is carried as two vectors of 4 doubles, q[0..1] = lanes 0-3 and 4-7 of
 * the first, q[2..3] those of the second: every lane takes the same values in the
 * same order as in rows_partials (the same loads, the same zeros in a short last step,
 * the same mask), and the same sv_unpair and sbn_lanes16 tree ends it, so the bits
 * are the same. One row at a time: its 8 vectors of accumulators and the step's
 * temporaries fit the 16 registers. */
#if defined(__AVX2__) && !SBN_AVX512
#define SBN_ROWS_Q 1
typedef int64_t sbn_v4l __attribute__((vector_size(32)));

/* The mask bits of the k (1..16) positions from element i: sbn_mask16's one load for
 * a whole step, bit by bit for a short one (nothing past them read). */
SBN_INLINE unsigned rq_bits(const uint8_t *mask, int64_t i, int64_t k)
{
    if (k == 16)
        return sbn_mask16(mask, i);
    unsigned bits = 0;
    for (int64_t j = 0; j < k; j++)
        bits |= (unsigned)sbn_mask1(mask, i + j) << j;
    return bits;
}

/* q[0..3] = the doubles of lo's floats 0-3, 4-7, then hi's. */
SBN_INLINE void rq_widen(__m256 lo, __m256 hi, sbn_v4d q[4])
{
    q[0] = (sbn_v4d)_mm256_cvtps_pd(_mm256_castps256_ps128(lo));
    q[1] = (sbn_v4d)_mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1));
    q[2] = (sbn_v4d)_mm256_cvtps_pd(_mm256_castps256_ps128(hi));
    q[3] = (sbn_v4d)_mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1));
}

/* x (g = 0) or g (g = 1) at 16 elements from element i, k (1..16) of them real: the
 * rest +0, and nothing past them read; a masked g is +0, as in sbn_ldg8. Floats, and
 * bfloat16 without `pairs`, in element order (q[h] holds elements 4h .. 4h+3);
 * bfloat16 with `pairs` in rows_partials' lanes (sv_ld16: the even elements, then the
 * odd ones). */
SBN_INLINE void rq_load(int v, int g, int pairs, const sv_in *in, int64_t i, int64_t k, sbn_v4d q[4])
{
    const void *p = g ? in->dy : in->x;
    const int relu = g && (v & SV_RELU);
    if (!(v & SV_BF16)) {
        float t[16] = {0};
        const float *f = (const float *)p + i;
        if (k < 16)
            memcpy(t, f, (size_t)k * sizeof *t), f = t;
        const unsigned bits = relu ? rq_bits(in->mask, i, k) : 0;
        const __m256i lane = _mm256_setr_epi64x(1, 2, 4, 8);
        for (int h = 0; h < 4; h++) {
            q[h] = (sbn_v4d)_mm256_cvtps_pd(_mm_loadu_ps(f + 4 * h));
            if (relu) {
                const __m256i b = _mm256_set1_epi64x((long long)(bits >> 4 * h & 15u));
                const __m256i keep = _mm256_cmpeq_epi64(_mm256_and_si256(b, lane), lane);
                q[h] = (sbn_v4d)_mm256_and_pd((__m256d)q[h], _mm256_castsi256_pd(keep));
            }
        }
        return;
    }
    __m256i w;
    if (k == 16) {
        w = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    } else {
        uint16_t t[16] = {0};
        memcpy(t, (const uint16_t *)p + i, (size_t)k * sizeof *t);
        w = _mm256_loadu_si256((const __m256i *)t);
    }
    if (relu)
        w = (__m256i)sbn_keep16((sbn_v8w)w, rq_bits(in->mask, i, k));
    if (!pairs) {
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)), 16));
        const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1)), 16));
        rq_widen(lo, hi, q);
        return;
    }
    const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    rq_widen(e, _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u))), q);
}

/* One step of 16 positions from element i, k of them real, into the accumulators. */
SBN_INLINE void rq_step(int v, const sv_in *in, int64_t i, int64_t k, sbn_v4d mv, sbn_v4d a[4], sbn_v4d b[4])
{
    sbn_v4d u[4], g[4];
    rq_load(v, 0, 1, in, i, k, u);
    if (!(v & SV_KIND)) {
        for (int h = 0; h < 4; h++)
            a[h] += u[h], b[h] += u[h] * u[h];
        return;
    }
    rq_load(v, 1, 1, in, i, k, g);
    /* lanes holding no position of a short step: x - m zeroed (see rows_partials) */
    const int64_t n0 = sv_lo_count(v, k), n1 = sv_hi_count(v, k);
    for (int h = 0; h < 4; h++) {
        sbn_v4d d = u[h] - mv;
        if (k < SBN_LANES) {
            const sbn_v4l idx = (sbn_v4l){0, 1, 2, 3} + 4 * (h & 1);
            d = (sbn_v4d)((sbn_v4l)d & (idx < (h < 2 ? n0 : n1)));
        }
        a[h] += g[h], b[h] += g[h] * d;
    }
}

/* rows_partials of one row (element o, mean m) in the lanes above. */
SBN_INLINE void row_partials_q(int v, const sv_in *in, int64_t o, double m, int64_t S, double *p1, double *p2)
{
    sbn_v4d a[4] = {{0}}, b[4] = {{0}};
    const sbn_v4d mv = {m, m, m, m};
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES)
        rq_step(v, in, o + s, SBN_LANES, mv, a, b);
    if (s < S)
        rq_step(v, in, o + s, S - s, mv, a, b);
    sbn_v8d A[2], B[2]; /* a[0..3] are A's lanes 0-3, 4-7, 8-11, 12-15: the same bytes */
    _Static_assert(sizeof A == sizeof a && sizeof B == sizeof b, "two 8-lane vectors as four 4-lane ones");
    memcpy(A, a, sizeof A), memcpy(B, b, sizeof B);
    sv_unpair(v, &A[0], &A[1]), sv_unpair(v, &B[0], &B[1]);
    *p1 = sbn_lanes16(A), *p2 = sbn_lanes16(B);
}
#else
#define SBN_ROWS_Q 0
#endif

/* p1 = sum x, p2 = sum x^2 (forward) or p1 = sum g, p2 = sum g*(x - m) (backward)
 * over each of nr contiguous rows of S elements starting at element o[r] (m[r]: their
 * channels' means). Lane j of a row's 16 accumulators takes positions s = j (mod 16),
 * the last S mod 16 positions as one masked step (a masked-off position adds +0, which
 * changes no lane: its loads are zero, and for g*(x-m) the factor x-m is zeroed as
 * well, so that a non-finite mean cannot make it NaN); the lanes are then summed as
 * the fixed tree of sbn_lanes16. Every operation is a vector one, so a short row
 * (S = 196: 12 full steps, one 4-wide step, a tree of 5 additions) costs little
 * beyond its loads. nr = SBN_NCHW_NR (4, or 2 without AVX-512) runs that many
 * independent chains, which hides the latency of the additions of long rows; each row
 * still gets exactly its own operations. v and nr (1 or SBN_NCHW_NR) are compile-time
 * constants at every call. */
SBN_INLINE void rows_partials(int v, int nr, const sv_in *in, const int64_t *o, const double *m, int64_t S,
                              double *p1, double *p2)
{
#if SBN_ROWS_Q
    for (int r = 0; r < nr; r++)
        row_partials_q(v, in, o[r], v & SV_KIND ? m[r] : 0.0, S, p1 + r, p2 + r);
    return;
#endif
    const int kind = v & SV_KIND;
    sbn_v8d a[4][2], b[4][2], mv[4];
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++) {
        a[r][0] = a[r][1] = b[r][0] = b[r][1] = mv[r] = (sbn_v8d){0};
        if (kind)
            mv[r] = sbn_bcast8(m[r]);
    }
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const int64_t i = o[r] + s;
            sbn_v8d u, w;
            sv_ld16(v, 0, in, i, 16, &u, &w);
            if (!kind) {
                a[r][0] += u, a[r][1] += w;
                b[r][0] += u * u, b[r][1] += w * w; /* exact: a float squared fits in a double */
            } else {
                sbn_v8d g, h;
                sv_ld16(v, 1, in, i, 16, &g, &h);
                a[r][0] += g, a[r][1] += h;
                b[r][0] += g * (u - mv[r]), b[r][1] += h * (w - mv[r]);
            }
        }
    }
    const int64_t t = S - s; /* 0 <= t < 16 positions left */
    if (t) {
        const int64_t t0 = sv_lo_count(v, t), t1 = sv_hi_count(v, t); /* positions in each vector */
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const int64_t i = o[r] + s;
            sbn_v8d u, w;
            sv_ld16(v, 0, in, i, t, &u, &w);
            if (!kind) {
                a[r][0] += u, a[r][1] += w;
                b[r][0] += u * u, b[r][1] += w * w;
            } else {
                sbn_v8d g, h;
                sv_ld16(v, 1, in, i, t, &g, &h);
                a[r][0] += g, a[r][1] += h;
                const sbn_v8d du = u - mv[r], dw = w - mv[r];
                b[r][0] += g * sbn_keep_first(&du, t0), b[r][1] += h * sbn_keep_first(&dw, t1);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++) {
        sv_unpair(v, &a[r][0], &a[r][1]), sv_unpair(v, &b[r][0], &b[r][1]);
        p1[r] = sbn_lanes16(a[r]), p2[r] = sbn_lanes16(b[r]);
    }
}

/* ---- exact block deposits (REPRODUCIBLE) ----
 * One sbx_add per partial costs about as much as streaming a whole row, so when a
 * partial covers few elements (small S) the deposits dominate. Instead, a block of up
 * to SBN_XB partials of one channel is summed EXACTLY in double arithmetic and the
 * total deposited once with sbx_add_scaled.
 *
 * Exactness. Let |v| < 2^e for every partial v of a block of K <= 2^B, and let every
 * v be a multiple of u1 = 2^e1, with e1 = max(e + 2B - 103, lsb) and u0 = 2^(52-B) u1
 * (so u0 >= 2^(e+B-51)). With sigma = 1.5 * 2^(log2 u0 + 52), |v| <= 2^(e) keeps
 * sigma + v in sigma's binade, so q0 = fl(fl(sigma + v) - sigma) is v rounded to the
 * grid u0 (Rump's error-free extraction: one rounding, then an exact subtraction),
 * and r0 = v - q0 is exact, a multiple of u1, |r0| <= u0/2. Every partial sum of the
 * q0 stays below K (2^e + u0/2) < 2^53 u0, and of the r0 below K u0/2 = 2^51 u1, so
 * the double accumulations T0 += q0, T1 += r0 are exact: T0 + T1 is exactly the
 * block's sum. (If every v is a multiple of u0, r0 = 0 and T0 += v alone is exact.)
 * The multiple-of-u1 condition is read off the smallest nonzero |v|: a value with
 * 2^f <= |v| is a multiple of 2^(f - mbits) for the source's significand width.
 * A lane (channel) is taken this way only if, in addition, no partial is NaN or Inf
 * and K 2^e fits the window. Each partial is then a multiple of 2^lsb (so sbx_add
 * would not have rounded it) and in the window (so sbx_add would not have counted it
 * as Inf, nor does sbx_add_scaled count the total), so the accumulator receives the
 * same integer as from the per-partial sbx_adds. Otherwise that lane's partials go
 * through sbx_add one by one. Either way the words after sbx_normalize are the same,
 * whatever the blocking, so block edges and thread splits cannot change a bit. */
#define SBN_XB_BITS 8
#define SBN_XB (1 << SBN_XB_BITS) /* partials per block at most (K <= 2^B) */
#define SBN_XC 32                 /* S == 1: row stride of packed tail channels (pack_rows_v) */
#define SBN_XBUF 4096             /* S > 1: doubles per buffer of partials (32 KiB) */
_Static_assert(SBN_XB * SBN_XC * sizeof(float) <= SBN_XBUF * sizeof(double), "S == 1 rows fit the buffers");

/* t / 2^e2 for a double t that is an integer multiple of 2^e2, |t| < 2^53 * 2^e2. */
static inline int64_t scaled_int(double t, int32_t e2)
{
    uint64_t b;
    memcpy(&b, &t, sizeof b);
    uint32_t eb = (uint32_t)(b >> 52) & 0x7FF;
    if (!eb) return 0; /* zero (t is never subnormal: 2^e2 >= 2^lsb is normal) */
    int64_t m = (int64_t)((b & ((UINT64_C(1) << 52) - 1)) | (UINT64_C(1) << 52));
    int32_t sh = (int32_t)eb - 1075 - e2;
    m = sh >= 0 ? m << sh : m >> -sh; /* |t/2^e2| < 2^53: no bit is lost either way */
    return b >> 63 ? -m : m;
}

/* Where a block's partials come from. XS_BUF: doubles p[k*ld + j]. With S == 1 the
 * partial of (sample k, channel j) is one element's term, computed on the fly from
 * the input rows (k*ld + j) instead of being stored first: x, x^2, dy, dy*(x - m[j]).
 * (The NHWC partial is 0 + term; adding +0 changes only the sign of a zero, which
 * no deposit sees.) */
enum { XS_BUF, XS_X, XS_XX, XS_DY, XS_DYXM };

static inline __attribute__((always_inline)) sbn_v8d xs_load(int src, const double *p, const float *x,
                                                             const float *dy, const double *m, int64_t o,
                                                             int64_t j)
{
    sbn_v8d v;
    switch (src) {
    case XS_BUF: memcpy(&v, p + o, sizeof v); return v;
    case XS_X: return load8(x + o);
    case XS_XX: v = load8(x + o); return v * v;
    case XS_DY: return load8(dy + o);
    default: memcpy(&v, m + j, sizeof v); return load8(dy + o) * (load8(x + o) - v);
    }
}

static inline __attribute__((always_inline)) double xs_scalar(int src, const double *p, const float *x,
                                                              const float *dy, const double *m, int64_t o,
                                                              int64_t j)
{
    switch (src) {
    case XS_BUF: return p[o];
    case XS_X: return x[o];
    case XS_XX: return (double)x[o] * x[o];
    case XS_DY: return dy[o];
    default: return (double)dy[o] * ((double)x[o] - m[j]);
    }
}

/* Each value of a source is a multiple of 2^(e - xs_mbits) where 2^e <= |v| (or
 * |v| < 2^-1022 and e = -1022): floats carry 24 significant bits, squares of floats
 * 48 (x = m 2^(f-23) with m < 2^24 gives x^2 a multiple of 2^(2f-46), 2^(2f) <= x^2),
 * doubles 53. Denormal floats are multiples of 2^-149, coarser than the rule says. */
static inline int xs_mbits(int src)
{
    return src == XS_X || src == XS_DY ? 23 : src == XS_XX ? 47 : 52;
}

#if !defined(__AVX512F__) && defined(__AVX2__)
/* AVX2 has no unsigned 64-bit compare: the signed one on a ^ 2^63, b ^ 2^63, then one
 * blend per half; max when hi, else min. (GCC 12's generic form of the compare takes
 * two more operations per half.) */
SBN_INLINE sbn_v8u u64pick8(sbn_v8u a, sbn_v8u b, int hi)
{
    __m256i h[2][2];
    memcpy(h[0], &a, sizeof a), memcpy(h[1], &b, sizeof b);
    const __m256i s = _mm256_set1_epi64x(INT64_MIN);
    for (int k = 0; k < 2; k++) {
        const __m256i agt = _mm256_cmpgt_epi64(_mm256_xor_si256(h[0][k], s), _mm256_xor_si256(h[1][k], s));
        h[0][k] = hi ? _mm256_blendv_epi8(h[1][k], h[0][k], agt) : _mm256_blendv_epi8(h[0][k], h[1][k], agt);
    }
    sbn_v8u r;
    memcpy(&r, h[0], sizeof r);
    return r;
}
#endif

/* Lane-wise maximum and minimum of unsigned 64-bit lanes. */
SBN_INLINE sbn_v8u u64max8(sbn_v8u a, sbn_v8u b)
{
#ifdef __AVX512F__ /* GCC 12 emits compare + blend for the generic form */
    return (sbn_v8u)_mm512_max_epu64((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    return u64pick8(a, b, 1);
#else
    const sbn_v8u gt = (sbn_v8u)(a > b);
    return (a & gt) | (b & ~gt);
#endif
}

SBN_INLINE sbn_v8u u64min8(sbn_v8u a, sbn_v8u b)
{
#ifdef __AVX512F__
    return (sbn_v8u)_mm512_min_epu64((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    return u64pick8(a, b, 0);
#else
    const sbn_v8u lt = (sbn_v8u)(a < b);
    return (a & lt) | (b & ~lt);
#endif
}

/* |v| of 8 doubles as bit patterns (NaN > Inf > finite; a NaN's sign cleared). */
SBN_INLINE sbn_v8u abs_bits8(sbn_v8d v)
{
    const uint64_t big = INT64_MAX;
    return (sbn_v8u)v & (sbn_v8u){big, big, big, big, big, big, big, big};
}

/* Pass 1 step: the largest magnitude and the smallest nonzero magnitude (minus one, so
 * that a zero wraps to the top) of each lane, on the bit patterns (NaN > Inf > finite). */
static inline __attribute__((always_inline)) void track(sbn_v8d v, sbn_v8u *mx, sbn_v8u *mn)
{
    const sbn_v8u b = abs_bits8(v);
    *mx = u64max8(b, *mx);
    *mn = u64min8(b - 1, *mn);
}

/* Per-lane plan of one sum from pass 1 (see above): e0 = log2 u0, e1 = log2 u1, the
 * extraction constants sigma, and whether the lane is taken at all. Returns 1 if every
 * taken lane needs one level only. */
typedef struct {
    double s0[32];
    int32_t E0[32], E1[32];
    int ok[32];
} xplan;

/* Whether any lane of v is nonzero (one test, not eight extractions). */
SBN_INLINE int sbn_any8l(sbn_v8l v)
{
#if defined(__AVX512F__)
    return _mm512_test_epi64_mask((__m512i)v, (__m512i)v) != 0;
#elif defined(__AVX2__)
    __m256i lo, hi;
    memcpy(&lo, &v, sizeof lo), memcpy(&hi, (const int64_t *)&v + 4, sizeof hi);
    return !_mm256_testz_si256(_mm256_or_si256(lo, hi), _mm256_or_si256(lo, hi));
#else
    int64_t a = 0;
    for (int l = 0; l < 8; l++)
        a |= v[l];
    return a != 0;
#endif
}

/* The plan of 8 lanes as vectors (the same integer steps for every lane): sig (the
 * extraction constant sigma's bits), e0, e1, e (every |v| < 2^e), lo (every v a
 * multiple of 2^lo), and the masks ok (lane taken) and two (taken and needing two
 * levels). A lane counts as needing one level only if lo - margin >= e0: margin > 0
 * leaves room for values not yet seen. */
typedef struct {
    sbn_v8u sig;
    sbn_v8l e0, e1, e, lo, ok, two;
} plan8_t;

static inline __attribute__((always_inline)) plan8_t plan8v(sbn_v8u mx, sbn_v8u mn, int mbits, sbx_format f,
                                                            int margin)
{
    const int B = SBN_XB_BITS;
    const int64_t lsb = f.lsb_exp;
    plan8_t p;
    const sbn_v8l eb = (sbn_v8l)(mx >> 52), ebm = (sbn_v8l)((mn + 1) >> 52);
    p.e = eb - (eb == 0) - 1022;                                             /* every |v| < 2^e */
    const sbn_v8l none = (sbn_v8l)(mn == ~(sbn_v8u){0});                     /* all zero */
    p.lo = ((ebm - (ebm == 0) - 1023 - mbits) & ~none) | (INT32_MAX & none);
    sbn_v8l e1 = p.e + 2 * B - 103, big = e1 > lsb;
    e1 = (e1 & big) | (lsb & ~big);
    p.ok = (eb != 0x7FF) & (p.lo >= e1) & (p.e + B <= lsb + 32 * (f.ndigits - 1));
    p.e1 = (e1 & p.ok) | (lsb & ~p.ok); /* keeps sigma finite; totals discarded */
    p.e0 = p.e1 + 52 - B, p.two = p.ok & (p.lo - margin < p.e0);
    p.sig = (sbn_v8u)(p.e0 + 52 + 1023) << 52 | UINT64_C(1) << 51;
    return p;
}

/* plan8v stored: sigma, E0, E1 and ok per lane, and (el, lol not NULL) e and lo, for
 * checking a plan against other data. Returns 1 if every taken lane needs one level. */
static inline __attribute__((always_inline)) int plan8(sbn_v8u mx, sbn_v8u mn, int mbits, sbx_format f, int margin,
                                                       double *s0, int32_t *E0, int32_t *E1, int *ok, int32_t *el,
                                                       int32_t *lol)
{
    const plan8_t p = plan8v(mx, mn, mbits, f, margin);
    const sbn_v8i o = __builtin_convertvector(p.ok & 1, sbn_v8i), i0 = __builtin_convertvector(p.e0, sbn_v8i),
                  i1 = __builtin_convertvector(p.e1, sbn_v8i);
    _Static_assert(sizeof(int) == sizeof(int32_t), "ok[] holds int32 lanes");
    memcpy(s0, &p.sig, sizeof p.sig), memcpy(E0, &i0, sizeof i0), memcpy(E1, &i1, sizeof i1), memcpy(ok, &o, sizeof o);
    if (el) {
        const sbn_v8i ie = __builtin_convertvector(p.e, sbn_v8i), il = __builtin_convertvector(p.lo, sbn_v8i);
        memcpy(el, &ie, sizeof ie), memcpy(lol, &il, sizeof il);
    }
    return !sbn_any8l(p.two);
}

static inline __attribute__((always_inline)) int plan_lanes_to(int nv, const sbn_v8u *mx, const sbn_v8u *mn,
                                                               int mbits, sbx_format f, int margin, double *s0,
                                                               int32_t *E0, int32_t *E1, int *ok, int32_t *el,
                                                               int32_t *lol)
{
    int one_level = 1;
    for (int q = 0; q < nv; q++)
        one_level &= plan8(mx[q], mn[q], mbits, f, margin, s0 + 8 * q, E0 + 8 * q, E1 + 8 * q, ok + 8 * q,
                           el ? el + 8 * q : NULL, lol ? lol + 8 * q : NULL);
    return one_level;
}

static inline __attribute__((always_inline)) int plan_lanes(int nv, const sbn_v8u *mx, const sbn_v8u *mn,
                                                            int mbits, sbx_format f, xplan *pl)
{
    return plan_lanes_to(nv, mx, mn, mbits, f, 0, pl->s0, pl->E0, pl->E1, pl->ok, NULL, NULL);
}

/* The exact total T0 + T1 of a taken lane (plan E0, E1) as the integer of one deposit. */
static inline void deposit_total(double T0, double T1, int32_t E0, int32_t E1, sbx_format f, int64_t *acc)
{
    const __int128 v = (__int128)scaled_int(T0, E0) * ((__int128)1 << (52 - SBN_XB_BITS)) + scaled_int(T1, E1);
    sbx_add_scaled(acc, f, v, E1);
}

/* Pass 2 step: T0 += q0, T1 += v - q0 (or T0 += v with one level). */
static inline __attribute__((always_inline)) void extract(sbn_v8d v, sbn_v8d s0, int one_level, sbn_v8d *T0,
                                                          sbn_v8d *T1)
{
    if (one_level) {
        *T0 += v;
    } else {
        sbn_v8d q0 = (v + s0) - s0;
        *T0 += q0, *T1 += v - q0;
    }
}

/* Deposits each taken lane's exact total; the other lanes' partials one by one. */
static inline __attribute__((always_inline)) void deposit_lanes(int src, int nv, const sbn_v8d *T0,
                                                                const sbn_v8d *T1, const xplan *pl,
                                                                const double *p, const float *x,
                                                                const float *dy, const double *m, int64_t ld,
                                                                int64_t K, sbx_format f, int64_t *acc)
{
    const int64_t W = sbx_words(f);
    for (int q = 0; q < nv; q++)
        for (int j = 0; j < 8; j++) {
            const int l = 8 * q + j;
            int64_t *a = acc + l * W;
            if (pl->ok[l]) {
                deposit_total(T0[q][j], T1[q][j], pl->E0[l], pl->E1[l], f, a);
            } else {
                for (int64_t k = 0; k < K; k++)
                    sbx_add(a, f, xs_scalar(src, p, x, dy, m, k * ld + l, l));
            }
        }
}

/* Deposits the partials (k, j), k < K <= SBN_XB, of 8*nv channels j (nv <= 4, a
 * compile-time constant; several lane groups at once hide the latency of the
 * accumulation chains) into acc + j * sbx_words(f). */
static inline __attribute__((always_inline)) void xblock(int src, int nv, const double *p, const float *x,
                                                         const float *dy, const double *m, int64_t ld,
                                                         int64_t K, sbx_format f, int64_t *acc)
{
    sbn_v8u mx[4] = {{0}}, mn[4];
    for (int q = 0; q < nv; q++)
        mn[q] = ~(sbn_v8u){0};
    for (int64_t k = 0; k < K; k++)
        for (int q = 0; q < nv; q++)
            track(xs_load(src, p, x, dy, m, k * ld + 8 * q, 8 * q), &mx[q], &mn[q]);
    xplan pl;
    const int one = plan_lanes(nv, mx, mn, xs_mbits(src), f, &pl);
    sbn_v8d S0[4], T0[4] = {{0}}, T1[4] = {{0}};
    memcpy(S0, pl.s0, (size_t)nv * sizeof S0[0]);
    if (one) {
        for (int64_t k = 0; k < K; k++)
            for (int q = 0; q < nv; q++)
                extract(xs_load(src, p, x, dy, m, k * ld + 8 * q, 8 * q), S0[q], 1, &T0[q], &T1[q]);
    } else {
        for (int64_t k = 0; k < K; k++)
            for (int q = 0; q < nv; q++)
                extract(xs_load(src, p, x, dy, m, k * ld + 8 * q, 8 * q), S0[q], 0, &T0[q], &T1[q]);
    }
    deposit_lanes(src, nv, T0, T1, &pl, p, x, dy, m, ld, K, f, acc);
}

/* Partials (k, j) of channels j < nc of one source into acc (channel 0's first). */
static void xblock_any(int src, const double *p, const float *x, const float *dy, const double *m,
                       int64_t ld, int64_t K, int64_t nc, sbx_format f, int64_t *acc)
{
    const int64_t W = sbx_words(f);
    int64_t j = 0;
#define SBN_XSRC(nv)                                                                                   \
    switch (src) {                                                                                 \
    case XS_BUF: xblock(XS_BUF, nv, p + j, NULL, NULL, NULL, ld, K, f, acc + j * W); break;          \
    case XS_X: xblock(XS_X, nv, NULL, x + j, NULL, NULL, ld, K, f, acc + j * W); break;              \
    case XS_XX: xblock(XS_XX, nv, NULL, x + j, NULL, NULL, ld, K, f, acc + j * W); break;            \
    case XS_DY: xblock(XS_DY, nv, NULL, NULL, dy + j, NULL, ld, K, f, acc + j * W); break;           \
    default: xblock(XS_DYXM, nv, NULL, x + j, dy + j, m + j, ld, K, f, acc + j * W); break;          \
    }
    for (; j + 32 <= nc; j += 32)
        SBN_XSRC(4)
    for (; j + 8 <= nc; j += 8)
        SBN_XSRC(1)
#undef SBN_XSRC
    if (j < nc) { /* fewer than 8 channels: through a zero-padded copy (zeros deposit nothing) */
        double pad[SBN_XB * 8] = {0};
        for (int64_t k = 0; k < K; k++)
            for (int64_t l = 0; l < nc - j; l++)
                pad[8 * k + l] = xs_scalar(src, p, x, dy, m, k * ld + j + l, j + l); /* (no offset on NULL) */
        int64_t tmp[8 * (64 + SBX_SPECIALS)];
        memset(tmp, 0, (size_t)(8 * W) * sizeof *tmp);
        memcpy(tmp, acc + j * W, (size_t)((nc - j) * W) * sizeof *tmp);
        xblock(XS_BUF, 1, pad, NULL, NULL, NULL, 8, K, f, tmp);
        memcpy(acc + j * W, tmp, (size_t)((nc - j) * W) * sizeof *tmp);
    }
}

/* Deposits a block (K <= SBN_XB samples, nc channels) of both sums into acc1, acc2
 * (channel 0's accumulators first). src1/src2 and p1/p2 as in xblock; `done` counts
 * the partials already deposited per channel, for the renormalization contract: a
 * block makes at most K deposits per accumulator. */
static void deposit_block(int src1, int src2, const double *p1, const double *p2, const float *x,
                          const float *dy, const double *m, int64_t ld, int64_t K, int64_t nc, int64_t *acc1,
                          int64_t *acc2, int64_t done)
{
    const int64_t W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
    xblock_any(src1, p1, x, dy, m, ld, K, nc, SBX_LINEAR, acc1);
    xblock_any(src2, p2, x, dy, m, ld, K, nc, SBX_QUADRATIC, acc2);
    if ((done + K) / SBN_RENORM_EVERY != done / SBN_RENORM_EVERY)
        for (int64_t j = 0; j < nc; j++) {
            sbx_normalize(acc1 + j * W1, SBX_LINEAR);
            sbx_normalize(acc2 + j * W2, SBX_QUADRATIC);
        }
}

/* This thread's share [*c0, *c1) of C channels; chunk edges on multiples of `granule`
 * (SBN_LANES where channels are vector lanes, 1 where each channel is a row). */
static void thread_channels(int64_t C, int64_t granule, int64_t *c0, int64_t *c1)
{
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t per = (C + T - 1) / T;
    per = (per + granule - 1) / granule * granule;
    *c0 = t * per < C ? t * per : C;
    *c1 = *c0 + per < C ? *c0 + per : C;
}

/* ---- sums ---- */

/* NHWC partials of nq*8 channels starting at c0 of the sample whose first element is
 * `base`, held in registers across all S positions (one pass over the sample's rows).
 * Each channel's partial is summed over s in order, exactly as the scalar loop below.
 * v and nq are compile-time constants at every call, so the arrays live in vector
 * registers. */
SBN_INLINE void nhwc_block(int v, int nq, const sv_in *in, int64_t base, int64_t S, int64_t C, int64_t c0,
                           double *p1, double *p2)
{
    const int kind = v & SV_KIND;
    sbn_v8d P1[8], P2[8], M[8];
    for (int q = 0; q < nq; q++) {
        P1[q] = (sbn_v8d){0}, P2[q] = (sbn_v8d){0};
        if (kind)
            M[q] = sbn_loadd8(in->mean + c0 + 8 * q);
    }
    if (v & SV_BF16 && nq >= 2) { /* 16 channels a step as bfloat16 pairs (sv_ld16): even, odd */
        for (int q = 0; q < nq; q += 2) /* the means in the same lane order */
            sv_pair_means(&M[q], &M[q + 1]);
        for (int64_t s = 0; s < S; s++) {
            const int64_t i = base + s * C + c0;
            for (int q = 0; q < nq; q += 2) {
                sbn_v8d u, w;
                sv_ld16(v, 0, in, i + 8 * q, 16, &u, &w);
                if (!kind) {
                    P1[q] += u, P2[q] += u * u, P1[q + 1] += w, P2[q + 1] += w * w;
                } else {
                    sbn_v8d g, h;
                    sv_ld16(v, 1, in, i + 8 * q, 16, &g, &h);
                    P1[q] += g, P2[q] += g * (u - M[q]), P1[q + 1] += h, P2[q + 1] += h * (w - M[q + 1]);
                }
            }
        }
        for (int q = 0; q < nq; q += 2)
            sv_unpair(v, &P1[q], &P1[q + 1]), sv_unpair(v, &P2[q], &P2[q + 1]);
    } else {
        const int word = (v & SV_RELU) && nq == 8; /* the 64 mask bits of a row read once */
        for (int64_t s = 0; s < S; s++) {
            const int64_t i = base + s * C + c0;
            const uint64_t gb = word ? sbn_mask64(in->mask, i) : 0;
            for (int q = 0; q < nq; q++) {
                if (!kind) {
                    sbn_v8d u = sv_x8(v, in, i + 8 * q);
                    P1[q] += u, P2[q] += u * u;
                } else {
                    sbn_v8d g = word ? sbn_ldg8_bits(SV_DT(v), in->dy, i + 8 * q, (unsigned)(gb >> 8 * q) & 0xFFu)
                                     : sv_g8(v, in, i + 8 * q);
                    P1[q] += g, P2[q] += g * (sv_x8(v, in, i + 8 * q) - M[q]);
                }
            }
        }
    }
    for (int q = 0; q < nq; q++) {
        memcpy(p1 + 8 * q, &P1[q], sizeof P1[q]);
        memcpy(p2 + 8 * q, &P2[q], sizeof P2[q]);
    }
}

#if SBN_ROWS_Q
/* nhwc_block in builds with AVX2 and without AVX-512 (see row_partials_q), for nb
 * groups of 16 channels (nb <= 4): vectors of 4 doubles, channel by channel in element
 * order, each channel's partial summed over s in order, as there. 64 channels' sums
 * need 32 vectors, twice the registers, and narrower blocks would each walk the sample
 * with a stride of C elements (measured at a fifth of the memory rate); so the
 * accumulators are arrays in L1, loaded, added to and stored for every position, and
 * each position's channels are read in one contiguous run. */
SBN_INLINE void nhwc_block_q(int v, int nb, const sv_in *in, int64_t base, int64_t S, int64_t C, int64_t c0,
                             double *p1, double *p2)
{
    const int kind = v & SV_KIND;
    sbn_v4d P1[16], P2[16];
    for (int h = 0; h < 4 * nb; h++)
        P1[h] = (sbn_v4d){0}, P2[h] = (sbn_v4d){0};
    for (int64_t s = 0; s < S; s++) {
        const int64_t i = base + s * C + c0;
        for (int b = 0; b < nb; b++) {
            sbn_v4d u[4], g[4];
            rq_load(v, 0, 0, in, i + 16 * b, 16, u);
            if (!kind) {
                for (int h = 0; h < 4; h++)
                    P1[4 * b + h] += u[h], P2[4 * b + h] += u[h] * u[h];
            } else {
                rq_load(v, 1, 0, in, i + 16 * b, 16, g);
                for (int h = 0; h < 4; h++) {
                    const sbn_v4d m = (sbn_v4d)_mm256_loadu_pd(in->mean + c0 + 16 * b + 4 * h);
                    P1[4 * b + h] += g[h], P2[4 * b + h] += g[h] * (u[h] - m);
                }
            }
        }
    }
    for (int h = 0; h < 4 * nb; h++)
        _mm256_storeu_pd(p1 + 4 * h, (__m256d)P1[h]), _mm256_storeu_pd(p2 + 4 * h, (__m256d)P2[h]);
}
#endif

/* NHWC partials of channels [c0, c1) of the sample starting at element `base`: the S
 * positions are summed in order, one channel per vector lane. Blocks of 64, then 32,
 * 16, 8 channels in registers; a scalar tail for the rest. */
SBN_INLINE void nhwc_partials_v(int v, const sv_in *in, int64_t base, int64_t S, int64_t C, int64_t c0,
                                int64_t c1, double *p1, double *p2)
{
    int64_t c = c0;
#if SBN_ROWS_Q
    for (; c + 64 <= c1; c += 64)
        nhwc_block_q(v, 4, in, base, S, C, c, p1 + (c - c0), p2 + (c - c0));
    if (c + 16 <= c1) {
        const int nb = (int)((c1 - c) / 16);
        nhwc_block_q(v, nb, in, base, S, C, c, p1 + (c - c0), p2 + (c - c0));
        c += 16 * nb;
    }
#endif
    for (; c + 64 <= c1; c += 64)
        nhwc_block(v, 8, in, base, S, C, c, p1 + (c - c0), p2 + (c - c0));
    for (; c + 32 <= c1; c += 32)
        nhwc_block(v, 4, in, base, S, C, c, p1 + (c - c0), p2 + (c - c0));
    for (; c + 16 <= c1; c += 16)
        nhwc_block(v, 2, in, base, S, C, c, p1 + (c - c0), p2 + (c - c0));
    for (; c + 8 <= c1; c += 8)
        nhwc_block(v, 1, in, base, S, C, c, p1 + (c - c0), p2 + (c - c0));
    for (; c < c1; c++) {
        double t1 = 0, t2 = 0;
        for (int64_t s = 0; s < S; s++) {
            const int64_t i = base + s * C + c;
            if (!(v & SV_KIND)) {
                const double u = sv_x1(v, in, i);
                t1 += u, t2 += u * u;
            } else {
                const double g = sv_g1(v, in, i);
                t1 += g, t2 += g * (sv_x1(v, in, i) - in->mean[c]);
            }
        }
        p1[c - c0] = t1, p2[c - c0] = t2;
    }
}

static void nhwc_partials(int v, const sv_in *in, int64_t base, int64_t S, int64_t C, int64_t c0, int64_t c1,
                          double *p1, double *p2)
{
#define SBN_NHWC_CALL(V) nhwc_partials_v(V, in, base, S, C, c0, c1, p1, p2)
    SV_DISPATCH(v, SBN_NHWC_CALL)
#undef SBN_NHWC_CALL
}

/* NCHW sums. Each thread owns a range of channels and reads its rows in memory
 * order: for each sample, the run of its channels' rows, a block of SBN_NCHW_CW
 * channels at a time (rows_partials). (A walk down one channel would jump C*S
 * elements from row to row.) Rows of at least SBN_NCHW_MULTI_S elements go four
 * at once, as four independent chains of additions; shorter rows one at a time, so
 * that the reads stay in address order within each page, which the hardware
 * prefetcher follows (four interleaved short rows measured 1.1-1.15x slower on
 * (32,256,14,14), and one long row at a time 1.12-1.15x slower on 56x56). The
 * partials of SBN_NCHW_K samples go to a buffer, and each channel's are then
 * combined in sample order, by adding (FAST: the same additions, in the same order,
 * as one partial at a time) or as exact blocks (REPRODUCIBLE: the same accumulated
 * integer). Owning channels, a thread never waits for another. */
#define SBN_NCHW_CW 64                      /* channels per block */
#define SBN_NCHW_MULTI_S 1024               /* rows this long: SBN_NCHW_NR at once */
/* Four rows' 16 vectors of 8 doubles fit AVX-512's 32 registers; with 16 registers
 * they spill, and two rows at once is the most that fits. */
#ifdef __AVX512F__
#define SBN_NCHW_NR 4
#else
#define SBN_NCHW_NR 2
#endif
#define SBN_NCHW_K (SBN_XBUF / SBN_NCHW_CW) /* samples per block */
_Static_assert(SBN_NCHW_K <= SBN_XB, "an NCHW block is one exact deposit");

/* The partials of channels [c0, c0 + nc) of one sample (row0: element index of
 * channel c0's row) into o1, o2. */
SBN_INLINE void nchw_sample_v(int v, const sv_in *in, int64_t row0, int64_t c0, int64_t nc, int64_t S,
                              double *o1, double *o2)
{
    for (int64_t j = 0; j < nc;) {
        const int nr = S >= SBN_NCHW_MULTI_S && nc - j >= SBN_NCHW_NR ? SBN_NCHW_NR : 1;
        int64_t o[4];
        for (int r = 0; r < nr; r++)
            o[r] = row0 + (j + r) * S;
        const double *m = v & SV_KIND ? in->mean + c0 + j : NULL;
        if (nr > 1)
            rows_partials(v, SBN_NCHW_NR, in, o, m, S, o1 + j, o2 + j);
        else
            rows_partials(v, 1, in, o, m, S, o1 + j, o2 + j);
        j += nr;
    }
}

static void nchw_sums(int v, const sv_in *in, sbn_shape sh, double *s1, double *s2, int64_t *acc1,
                      int64_t *acc2)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
    {
        int64_t t0, t1;
        thread_channels(C, 1, &t0, &t1);
        double q1[SBN_XBUF], q2[SBN_XBUF]; /* [k][j]: sample i0 + k, channel c0 + j */
        for (int64_t c0 = t0; c0 < t1; c0 += SBN_NCHW_CW) {
            const int64_t nc = t1 - c0 < SBN_NCHW_CW ? t1 - c0 : SBN_NCHW_CW;
            for (int64_t i0 = 0; i0 < n; i0 += SBN_NCHW_K) {
                const int64_t K = n - i0 < SBN_NCHW_K ? n - i0 : SBN_NCHW_K;
                for (int64_t k = 0; k < K; k++) {
                    const int64_t row0 = ((i0 + k) * C + c0) * S;
#define SBN_NCHW_CALL(V) nchw_sample_v(V, in, row0, c0, nc, S, q1 + k * nc, q2 + k * nc)
                    SV_DISPATCH(v, SBN_NCHW_CALL)
#undef SBN_NCHW_CALL
                }
                if (acc1) {
                    deposit_block(XS_BUF, XS_BUF, q1, q2, NULL, NULL, NULL, nc, K, nc,
                                  acc1 + c0 * sbx_words(SBX_LINEAR), acc2 + c0 * sbx_words(SBX_QUADRATIC), i0);
                } else {
                    for (int64_t j = 0; j < nc; j++)
                        for (int64_t k = 0; k < K; k++)
                            s1[c0 + j] += q1[k * nc + j], s2[c0 + j] += q2[k * nc + j];
                }
            }
        }
    }
}

/* FAST, S == 1: adds R consecutive rows [R][C] (samples in order, the first starting
 * at element `base`) into the totals of channels [t0, t1). The one-element partial of
 * each sample is 0 + term, and the total adds it: total + (0 + term). That is
 * total + term, bit for bit: 0 + term is term except that -0 becomes +0, and adding
 * -0 or +0 gives the same result unless total is -0, which it never is (it starts at
 * +0, and a sum of nonzero values that cancels is +0 when rounding to nearest). So
 * the +0 is not added (one double addition per term less). v and R (1 or 4) are
 * compile-time constants at every call. */
SBN_INLINE void add_rows8(int v, int R, int bytes, const sv_in *in, int64_t base, int64_t C, int64_t c,
                          double *s1, double *s2)
{
    const int kind = v & SV_KIND;
    sbn_v8d a = sbn_loadd8(s1 + c), b = sbn_loadd8(s2 + c), m = {0};
    if (kind)
        m = sbn_loadd8(in->mean + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const int64_t i = base + r * C + c;
        if (!kind) {
            const sbn_v8d u = sv_x8(v, in, i);
            a += u, b += u * u;
        } else {
            const unsigned gb = bytes ? in->mask[(base >> 3) + r * (C >> 3) + (c >> 3)] : 0;
            const sbn_v8d g = bytes ? sbn_ldg8_bits(SV_DT(v), in->dy, i, gb) : sv_g8(v, in, i);
            a += g, b += g * (sv_x8(v, in, i) - m);
        }
    }
    memcpy(s1 + c, &a, sizeof a), memcpy(s2 + c, &b, sizeof b);
}

SBN_INLINE void add_rows(int v, int R, const sv_in *in, int64_t base, int64_t C, int64_t t0, int64_t t1,
                         double *s1, double *s2)
{
    const int kind = v & SV_KIND;
    int64_t c = t0;
    /* 8 channels a vector: the scalar loop's operations, lane by lane. With the ReLU,
     * where every row starts on a byte of the mask (C, base and t0 multiples of 8), a
     * vector's 8 bits are one byte, read by its index: the general reader works out a
     * byte and a bit offset per vector (about 5 integer operations per 8 elements). */
    if ((v & SV_RELU) && kind && C % 8 == 0 && base % 8 == 0 && t0 % 8 == 0)
        for (; c + 8 <= t1; c += 8)
            add_rows8(v, R, 1, in, base, C, c, s1, s2);
    for (; c + 8 <= t1; c += 8)
        add_rows8(v, R, 0, in, base, C, c, s1, s2);
    for (; c < t1; c++) {
        double a = s1[c], b = s2[c];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int64_t i = base + r * C + c;
            if (!kind) {
                const double u = sv_x1(v, in, i);
                a += u, b += u * u;
            } else {
                const double g = sv_g1(v, in, i);
                a += g, b += g * (sv_x1(v, in, i) - in->mean[c]);
            }
        }
        s1[c] = a, s2[c] = b;
    }
}

/* REPRODUCIBLE, S == 1, the last nc < 8 channels of a thread (below a vector of the
 * chunks): the rows of samples [i0, i0 + K) as floats packed SBN_XC apart, for the
 * exact blocks, which read floats (a bfloat16 widens exactly, a masked dy is +0). */
SBN_INLINE void pack_rows_v(int v, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c0, int64_t nc,
                            float *xb, float *gb)
{
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < nc; j++) {
            const int64_t e = (i0 + k) * C + c0 + j;
            xb[k * SBN_XC + j] = (float)sv_x1(v, in, e);
            if (v & SV_KIND)
                gb[k * SBN_XC + j] = (float)sv_g1(v, in, e);
        }
}

/* ---- REPRODUCIBLE, S == 1: a chunk of channels, walked row after row ----
 * The exact blocks need each channel's extreme magnitudes before its sums. With
 * S == 1 a channel's K terms lie C elements apart, so walking a few channels down all
 * K rows reads 64-128 bytes from each of K rows: K streams that defeat the
 * prefetchers, from rows that share L1 sets when C is a power of two (packing them
 * first into a contiguous buffer was measured at about half the time of the S == 1
 * sums). Instead a chunk of up to SBN_S1_CW channels is walked row after row, each
 * row a run of contiguous cache lines, its per-channel state in arrays of the chunk
 * (s1_work, in L1), read and written once per SBN_S1_R rows.
 *
 * One pass, checked (K >= SBN_S1_SPEC rows; forward and backward). The quadratic
 * sum's plan is GUESSED from the extremes of the first SBN_S1_GUESS rows, the largest
 * magnitude taken SBN_S1_HEAD (a product's SBN_S1_HEADQ) binades higher (and one level
 * chosen only if the smallest would pass SBN_S1_MARGIN binades lower); the linear sum
 * gets no plan: it is summed plainly, one double accumulator from +0 (one addition a
 * term instead of Fast2Sum's four). A single pass over all K rows forms both sums and
 * tracks every term's extremes (what pass 1 tracks; for the backward's quadratic term
 * g (x - m), bounds of them from the extremes of |g| and |x - m|, s1_extremes). Afterwards
 * each lane is checked against the true plan of its tracked extremes (s1_verify;
 * "true plan" and "tracked extremes" below include those bounds, which the
 * exactness argument accepts as they are, being conservative):
 *  - the linear sum is exact where the true plan allows one level, lo >= e0 (every
 *    term a multiple of 2^lo, |v| < 2^e, e0 >= e + B - 51): then every partial sum
 *    is a multiple of 2^lo below K 2^e <= 2^(e+B) <= 2^(51+lo), an integer multiple
 *    of 2^lo with at most 51 bits, so every addition is exact and T0 is the exact
 *    sum, a multiple of 2^e0 below 2^51 2^e0: the T0 that the true plan's one-level
 *    pass makes, deposited under that plan (installed by s1_verify);
 *  - the quadratic sum holds where the guess's hypotheses hold for the data that were
 *    actually summed (every |v| < 2^e of the guess, every v a multiple of the grid
 *    the guess relies on: 2^e0 with one level, 2^e1 with two), which are exactly the
 *    hypotheses of the exactness argument above, so its T0 + T1 is the exact sum.
 * A group of 8 lanes with a lane that the true plan takes but the check does not
 * certify is summed again, that sum only, on two levels under the true plan
 * (s1_redo: one 64-byte run per row, not the chunk). A lane the true plan does not
 * take (NaN, Inf, a range too wide) deposits its terms one by one either way. So the
 * result is the exact sum whatever the guess was; the guess only decides the time.
 * tests/test_moments.c forces misses (a late large value, a late tiny one, zeros in
 * the first rows, a linear sum just past the one-level grid) and checks the words
 * against an independent big integer.
 * Fewer rows: two passes. Pass 1 keeps each channel's extremes, then the plan, then
 * pass 2 its sums (the chunk's K rows, 256 KiB at most, stay in L2).
 *
 * Two levels are summed as A = sigma + (the sum so far on the grid u0) and T1:
 * a = fl(A + v), T1 += v - (a - A), A = a (Fast2Sum into an accumulator kept in
 * sigma's binade, one operation fewer than extracting q0 first). sigma = 1.5 2^52 u0.
 * Each step moves A by v rounded to the grid u0, at most max(2^e, u0) in magnitude
 * (2^e is on the grid when u0 <= 2^e), and K such steps at most 2^51 u0 (K <= 2^B
 * and the plan's u0 >= 2^(e+B-51) give K 2^e <= 2^51 u0, and K u0 < 2^51 u0), so
 * every A + v lies strictly between 2^52 u0 and 2^53 u0, where the grid of doubles
 * is u0: a - A is v rounded to the grid (exact: a and A are within a factor 2), and
 * v - (a - A), at most u0/2 in magnitude, is exact, a multiple of u1 if v is; T1 then
 * sums exactly as above, and T0 = A - sigma (exact, same binade). The rounding
 * of a tie may depend on A, the split of v between T0 and T1 with it; T0 + T1, the
 * block's exact sum, does not. Lane by lane, tracking, plan and deposit are those of
 * the exact block deposits above, so the accumulated integer, hence every bit, is the
 * same as with any other blocking. */
#define SBN_S1_CW 256   /* channels per chunk */
#define SBN_S1_R 4      /* rows per sweep */
#define SBN_S1_GUESS 16 /* rows that guess the plan */
#define SBN_S1_SPEC 64  /* blocks of at least this many rows: one pass, checked */
#define SBN_S1_HEAD 2   /* binades of headroom over the guess rows' largest magnitude, */
#define SBN_S1_HEADQ 4  /* ... of a product g (x - m), whose tails are heavier */
#define SBN_S1_MARGIN 8 /* binades below their smallest for one level */

typedef struct {
    uint32_t fmx[SBN_S1_CW], fmn[SBN_S1_CW]; /* tracked, linear term: |float| bits, max and min - 1 */
    uint64_t dmx[SBN_S1_CW], dmn[SBN_S1_CW]; /* tracked, backward: max and min |x - m| (double bits) */
    double sa[SBN_S1_CW], sb[SBN_S1_CW];     /* plans: extraction constants, */
    int32_t ea0[SBN_S1_CW], ea1[SBN_S1_CW], eb0[SBN_S1_CW], eb1[SBN_S1_CW]; /* grids, */
    int32_t ga[SBN_S1_CW], gb[SBN_S1_CW];                                   /* e (|v| < 2^e), */
    int oka[SBN_S1_CW], okb[SBN_S1_CW];                                     /* lanes taken */
    double ta0[SBN_S1_CW], ta1[SBN_S1_CW], tb0[SBN_S1_CW], tb1[SBN_S1_CW]; /* sums */
} s1_work;

/* The linear term (x, or g) and the quadratic one (x^2, or g (x - m)) of 8 channels
 * of one row, from element i: the same operations as xs_load's on packed rows (a
 * bfloat16 widens exactly, a masked g is +0); backward, also d = x - m, for the
 * tracking (s1_track). */
SBN_INLINE void s1_terms8(int v, const sv_in *in, int64_t i, sbn_v8d m, sbn_v8f *lin, sbn_v8d *d, sbn_v8d *a,
                          sbn_v8d *b)
{
    const sbn_v8f u = sbn_ldf8(SV_DT(v), in->x, i);
    if (!(v & SV_KIND)) {
        *lin = u;
        *a = sbn_f8_to_d8(u);
        *b = *a * *a;
        return;
    }
    sbn_v8f g = sbn_ldf8(SV_DT(v), in->dy, i);
    if (v & SV_RELU)
        g = sbn_keep_bits_f(g, sbn_mask8(in->mask, i));
    *lin = g;
    *a = sbn_f8_to_d8(g);
    *d = sbn_f8_to_d8(u) - m;
    *b = *a * *d;
}

/* The same terms of one element, for a lane not taken. */
SBN_INLINE double s1_term1(int v, const sv_in *in, int64_t i, int64_t c, int quad)
{
    if (!(v & SV_KIND)) {
        const double u = sv_x1(v, in, i);
        return quad ? u * u : u;
    }
    const double g = sv_g1(v, in, i);
    return quad ? g * (sv_x1(v, in, i) - in->mean[c]) : g;
}

SBN_INLINE sbn_v8w s1_max32(sbn_v8w a, sbn_v8w b)
{
#ifdef __AVX2__
    return (sbn_v8w)_mm256_max_epu32((__m256i)a, (__m256i)b);
#else
    const sbn_v8w gt = (sbn_v8w)(a > b);
    return (a & gt) | (b & ~gt);
#endif
}

SBN_INLINE sbn_v8w s1_min32(sbn_v8w a, sbn_v8w b)
{
#ifdef __AVX2__
    return (sbn_v8w)_mm256_min_epu32((__m256i)a, (__m256i)b);
#else
    const sbn_v8w lt = (sbn_v8w)(a < b);
    return (a & lt) | (b & ~lt);
#endif
}

/* Tracking of one row's 8 lanes: the linear term's float bits (max, and min - 1 so
 * that a zero wraps to the top); backward, instead of the quadratic term itself, the
 * largest and the smallest |d| = |x - m|, zeros included (the bit patterns: NaN >
 * Inf > finite), from which s1_extremes bounds it: three operations (no minus 1)
 * where the product's own extremes took four. */
SBN_INLINE void s1_track(int v, sbn_v8f lin, sbn_v8d d, sbn_v8w *mx, sbn_v8w *mn, sbn_v8u *dx, sbn_v8u *dn)
{
    const sbn_v8w fb = (sbn_v8w)lin & 0x7FFFFFFFu;
    *mx = s1_max32(fb, *mx), *mn = s1_min32(fb - 1u, *mn);
    if (v & SV_KIND) {
        const sbn_v8u b = abs_bits8(d);
        *dx = u64max8(b, *dx), *dn = u64min8(b, *dn);
    }
}

/* Starts the tracking of channels [0, nc) of the chunk. */
static void s1_track_init(int kind, int64_t nc, s1_work *w)
{
    memset(w->fmx, 0, (size_t)nc * sizeof *w->fmx), memset(w->fmn, 0xFF, (size_t)nc * sizeof *w->fmn);
    if (kind)
        memset(w->dmx, 0, (size_t)nc * sizeof *w->dmx), memset(w->dmn, 0xFF, (size_t)nc * sizeof *w->dmn);
}

/* The float bits of x at elements e .. e+15 (a bfloat16's are its 16 bits << 16). */
SBN_INLINE sbn_v16u s1_bits16(int v, const sv_in *in, int64_t e)
{
    sbn_v16u b;
    if (v & SV_BF16) {
        sbn_v16h h;
        memcpy(&h, (const uint16_t *)in->x + e, sizeof h);
        b = __builtin_convertvector(h, sbn_v16u) << 16;
    } else {
        memcpy(&b, (const float *)in->x + e, sizeof b);
    }
    return b;
}

/* Forward tracking step of 16 lanes: the |float| bits of 16 values into the running
 * max and min - 1 (a zero wraps to the top), as s1_track does for 8. */
SBN_INLINE void s1_track16b(sbn_v16u b, sbn_v16u *mx, sbn_v16u *mn)
{
    b &= 0x7FFFFFFFu;
    const sbn_v16u bm = b - 1u;
#ifdef __AVX512F__
    *mx = (sbn_v16u)_mm512_max_epu32((__m512i)b, (__m512i)*mx);
    *mn = (sbn_v16u)_mm512_min_epu32((__m512i)bm, (__m512i)*mn);
#elif defined(__AVX2__) /* two halves, as s1_max32 and s1_min32 (GCC 12's generic form: xor, compare, blend) */
    sbn_v8w h[4][2];
    memcpy(h[0], &b, sizeof b), memcpy(h[1], &bm, sizeof bm), memcpy(h[2], mx, sizeof *mx), memcpy(h[3], mn, sizeof *mn);
    for (int k = 0; k < 2; k++)
        h[2][k] = s1_max32(h[0][k], h[2][k]), h[3][k] = s1_min32(h[1][k], h[3][k]);
    memcpy(mx, h[2], sizeof *mx), memcpy(mn, h[3], sizeof *mn);
#else
    const sbn_v16u gt = (sbn_v16u)(b > *mx), lt = (sbn_v16u)(bm < *mn);
    *mx = (b & gt) | (*mx & ~gt);
    *mn = (bm & lt) | (*mn & ~lt);
#endif
}

/* Forward pass 1 step of 16 lanes: x at elements e .. e+15. */
SBN_INLINE void s1_track16(int v, const sv_in *in, int64_t e, sbn_v16u *mx, sbn_v16u *mn)
{
    s1_track16b(s1_bits16(v, in, e), mx, mn);
}

/* Pass 1 over R rows from row i (R a compile-time constant), channels [c0, c0 + nc)
 * (nc a multiple of 8). The forward tracks 16 channels a step where it can (only
 * x's bits: no conversion, so twice the lanes per instruction). */
SBN_INLINE void s1_sweep1(int v, int R, const sv_in *in, int64_t C, int64_t i, int64_t c0, int64_t nc, s1_work *w)
{
    int64_t j0 = 0;
    if (!(v & SV_KIND))
        for (; j0 + 16 <= nc; j0 += 16) {
            sbn_v16u mx, mn;
            memcpy(&mx, w->fmx + j0, sizeof mx), memcpy(&mn, w->fmn + j0, sizeof mn);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                s1_track16(v, in, (i + r) * C + c0 + j0, &mx, &mn);
            memcpy(w->fmx + j0, &mx, sizeof mx), memcpy(w->fmn + j0, &mn, sizeof mn);
        }
    for (int64_t j = j0; j < nc; j += 8) {
        sbn_v8w mx, mn;
        sbn_v8u dx = {0}, dn = {0};
        sbn_v8d m = {0};
        memcpy(&mx, w->fmx + j, sizeof mx), memcpy(&mn, w->fmn + j, sizeof mn);
        if (v & SV_KIND) {
            memcpy(&dx, w->dmx + j, sizeof dx), memcpy(&dn, w->dmn + j, sizeof dn);
            m = sbn_loadd8(in->mean + c0 + j);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int64_t e = (i + r) * C + c0 + j;
            sbn_v8f lin;
            sbn_v8d a = {0}, b = {0}, d = {0};
            if (!(v & SV_KIND))
                lin = sbn_ldf8(SV_DT(v), in->x, e); /* x^2's extremes follow from x's */
            else
                s1_terms8(v, in, e, m, &lin, &d, &a, &b);
            s1_track(v, lin, d, &mx, &mn, &dx, &dn);
        }
        memcpy(w->fmx + j, &mx, sizeof mx), memcpy(w->fmn + j, &mn, sizeof mn);
        if (v & SV_KIND)
            memcpy(w->dmx + j, &dx, sizeof dx), memcpy(w->dmn + j, &dn, sizeof dn);
    }
}

SBN_INLINE void s1_pass1(int v, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c0, int64_t nc,
                         s1_work *w)
{
    s1_track_init(v & SV_KIND, nc, w);
    int64_t k = 0;
    for (; k + SBN_S1_R <= K; k += SBN_S1_R)
        s1_sweep1(v, SBN_S1_R, in, C, i0 + k, c0, nc, w);
    for (; k < K; k++)
        s1_sweep1(v, 1, in, C, i0 + k, c0, nc, w);
}

/* The tracked extremes of both terms of lanes j .. j+7 as double bit patterns (the
 * largest magnitude, the smallest nonzero one minus 1; a bound of each, for the
 * backward quadratic term), the largest times 2^h (that of a backward quadratic term
 * times 2^hq).
 *
 * The backward quadratic term v = fl(g d), d = fl(x - m), is bounded, not tracked:
 * with G = max |g| and D = max |d|, |v| = fl(|g| |d|) <= fl(G D), since rounding to
 * nearest is monotonic. A nonzero v has g != 0 and d != 0, so |g| >= g0 (the smallest
 * nonzero |g|) and |d| >= d0 (the smallest |d|, zeros included), and |v| >= fl(g0 d0)
 * by the same monotonicity; a bound of 0 (d0 = 0, or g0 d0 below the subnormals)
 * becomes the smallest positive double, which no plan takes (conservative). With no
 * nonzero g, every v is +-0 (or NaN: below), as the tracked extremes of v said
 * before. A NaN or Inf term has a NaN or Inf g or d, which makes G or D, hence
 * fl(G D), NaN or Inf (0 Inf = NaN; NaN bit patterns are the largest), or two finite
 * factors whose product overflows, and then so does fl(G D) >= |g d|: either way the
 * lane is not taken. The plan (plan8v) and the exactness argument need only
 * |v| < 2^e and every v a multiple of 2^lo (from the smallest magnitude's binade),
 * and bounds give both. */
static void s1_extremes(int kind, const s1_work *w, int64_t j, int h, int hq, sbn_v8u *mxa, sbn_v8u *mna,
                        sbn_v8u *mxb, sbn_v8u *mnb)
{
    /* widening is exact and monotonic: the extremes of the widened terms; a minimum
     * of ~0 (no nonzero term) wraps to +0, whose bits minus 1 are ~0 again */
    sbn_v8w fx, fn;
    memcpy(&fx, w->fmx + j, sizeof fx), memcpy(&fn, w->fmn + j, sizeof fn);
    sbn_v8d dh = sbn_f8_to_d8((sbn_v8f)fx) * (double)(1 << h), dl = sbn_f8_to_d8((sbn_v8f)(fn + 1u));
    *mxa = (sbn_v8u)dh, *mna = (sbn_v8u)dl - 1;
    if (kind) {
        sbn_v8d D, d0;
        memcpy(&D, w->dmx + j, sizeof D), memcpy(&d0, w->dmn + j, sizeof d0);
        const sbn_v8d G = sbn_f8_to_d8((sbn_v8f)fx);
        *mxb = abs_bits8(G * D * (double)(1 << hq));
        const sbn_v8u lb = abs_bits8(dl * d0); /* dl = g0, or +0 with no nonzero g */
        const sbn_v8u none = (sbn_v8u)(*mna == ~(sbn_v8u){0});
        *mnb = none | (lb - 1 - (sbn_v8u)(lb == 0)); /* min - 1; a bound of 0 (true: -1): min 2^-1074 */
    } else { /* squaring is exact and monotonic in |x| */
        *mxb = (sbn_v8u)(dh * dh), *mnb = (sbn_v8u)(dl * dl) - 1;
    }
}

/* The plans of both sums from the tracked extremes, the largest magnitudes taken h
 * binades higher and one level required to hold `margin` binades lower; returns
 * whether every taken lane of the chunk needs one extraction level only, per sum
 * (bit 0: linear, bit 1: quadratic). */
static int s1_plan(int kind, int64_t nc, s1_work *w, int h, int hq, int margin)
{
    int onea = 1, oneb = 1;
    for (int64_t j = 0; j < nc; j += 8) {
        sbn_v8u mxa, mna, mxb, mnb;
        int32_t lo[8];
        s1_extremes(kind, w, j, h, hq, &mxa, &mna, &mxb, &mnb);
        onea &= plan_lanes_to(1, &mxa, &mna, xs_mbits(kind ? XS_DY : XS_X), SBX_LINEAR, margin, w->sa + j,
                              w->ea0 + j, w->ea1 + j, w->oka + j, w->ga + j, lo);
        oneb &= plan_lanes_to(1, &mxb, &mnb, xs_mbits(kind ? XS_DYXM : XS_XX), SBX_QUADRATIC, margin, w->sb + j,
                              w->eb0 + j, w->eb1 + j, w->okb + j, w->gb + j, lo);
    }
    return onea | oneb << 1;
}

/* How many lanes of a mask (0 or all bits set per lane) are set. */
SBN_INLINE int s1_lanes(sbn_v8i m)
{
#ifdef __AVX__
    return __builtin_popcount((unsigned)_mm256_movemask_ps((__m256)m));
#else
    int n = 0;
    for (int l = 0; l < 8; l++)
        n += m[l] & 1;
    return n;
#endif
}

/* After a checked pass: each lane's sums checked against its tracked extremes, which
 * give the true plan (margin 0). The linear sum was summed plainly (one level from
 * +0, no plan): it is exact where the true plan allows one level (below), and the
 * true plan is installed for its deposit. The quadratic sum was summed under the
 * guessed plan: exact where the guess's hypotheses hold for the data (every |v| < 2^e
 * of the guess, every v a multiple of its grid: 2^e0 with one level, 2^e1 with two).
 * A lane that the true plan takes and whose sum is not so certified puts its group of
 * 8 lanes in redo[0] (linear) or redo[1] (quadratic), bit j / 8, with the true plan
 * installed for the whole group, to be summed again (s1_redo). A lane the true plan
 * does not take (NaN, Inf, a range too wide) deposits its terms one by one. Counts
 * (sbn_s1_counts) the lanes' sums that the true plan takes into cnt[0], those not
 * certified into cnt[1]. */
static void s1_verify(int kind, int64_t nc, s1_work *w, int oneb, uint32_t redo[2], uint64_t cnt[2])
{
    redo[0] = redo[1] = 0, cnt[0] = cnt[1] = 0;
    for (int64_t j = 0; j < nc; j += 8) {
        sbn_v8u mx[2], mn[2];
        s1_extremes(kind, w, j, 0, 0, &mx[0], &mn[0], &mx[1], &mn[1]);
        for (int q = 0; q < 2; q++) {
            const plan8_t p = plan8v(mx[q], mn[q], xs_mbits(q ? (kind ? XS_DYXM : XS_XX) : (kind ? XS_DY : XS_X)),
                                     q ? SBX_QUADRATIC : SBX_LINEAR, 0);
            const sbn_v8i ok = __builtin_convertvector(p.ok, sbn_v8i), e = __builtin_convertvector(p.e, sbn_v8i),
                          lo = __builtin_convertvector(p.lo, sbn_v8i), E0 = __builtin_convertvector(p.e0, sbn_v8i),
                          E1 = __builtin_convertvector(p.e1, sbn_v8i);
            int *gok = (q ? w->okb : w->oka) + j;
            sbn_v8i holds; /* lanes certified (all bits set) */
            if (q) {
                sbn_v8i go, ge, grid;
                memcpy(&go, gok, sizeof go), memcpy(&ge, w->gb + j, sizeof ge);
                memcpy(&grid, (oneb ? w->eb0 : w->eb1) + j, sizeof grid);
                holds = (go != 0) & (e <= ge) & (lo >= grid);
            } else {
                holds = ok & (lo >= E0);
            }
            const int nbad = s1_lanes(ok & ~holds);
            cnt[0] += (uint64_t)s1_lanes(ok), cnt[1] += (uint64_t)nbad;
            if (q && !nbad) {
                const sbn_v8i h1 = holds & 1;
                memcpy(gok, &h1, sizeof h1);
                continue;
            }
            const sbn_v8i o1 = ok & 1;
            memcpy(gok, &o1, sizeof o1), memcpy((q ? w->sb : w->sa) + j, &p.sig, sizeof p.sig);
            memcpy((q ? w->eb0 : w->ea0) + j, &E0, sizeof E0), memcpy((q ? w->eb1 : w->ea1) + j, &E1, sizeof E1);
            redo[q] |= (uint32_t)(nbad != 0) << (j / 8);
        }
    }
}

/* Pass 2 step: T0 += v (one level), or the two-level Fast2Sum step (above) with A in
 * place of T0. */
SBN_INLINE void s1_acc(sbn_v8d v, int one_level, sbn_v8d *A, sbn_v8d *T1)
{
    if (one_level) {
        *A += v;
    } else {
        const sbn_v8d a = *A + v;
        *T1 += v - (a - *A);
        *A = a;
    }
}

/* fl(x x + A) for x a widened float (or bfloat16): x x is exact in double (at most
 * 48 significant bits; |x| >= 2^-149 puts x^2 far above double's subnormals, and
 * below its overflow), so the fused multiply-add rounds the same exact sum as
 * A + x * x does, to the same bits; it only saves the multiply. Builds without
 * AVX-512 multiply, then add: on AVX2, GCC 12 passed the two 256-bit fused halves of
 * a 64-byte vector through the stack, and the reproducible S = 1 layer took 1.6x the
 * time it takes with the plain form. */
SBN_INLINE sbn_v8d s1_sqadd(sbn_v8d x, sbn_v8d A)
{
#if defined(__AVX512F__)
    return (sbn_v8d)_mm512_fmadd_pd((__m512d)x, (__m512d)x, (__m512d)A);
#else
    return x * x + A;
#endif
}

/* s1_acc of the term x^2 (forward), x a widened float: the same steps with the
 * products through s1_sqadd: a = fl(A + x^2), and x^2 - (a - A) = fl(-(a - A) + x x);
 * same values, same bits, and on AVX-512 (fused) one multiply fewer per term. */
SBN_INLINE void s1_acc_sq(sbn_v8d x, int one_level, sbn_v8d *A, sbn_v8d *T1)
{
    if (one_level) {
        *A = s1_sqadd(x, *A);
    } else {
        const sbn_v8d a = s1_sqadd(x, *A);
        *T1 += s1_sqadd(x, -(a - *A));
        *A = a;
    }
}

/* The checked forward pass over R rows from row i, 16 channels a step, float input
 * only: the tracking of x's float bits on 16 lanes an instruction (as s1_track16),
 * each sum on two vectors of 8 with the operations of s1_sweep2 (the linear sum plain,
 * i.e. one level from +0, which is what the checked pass always does with it; the
 * quadratic one on `oneb` levels). Returns the channels done (the rest, fewer than
 * 16, go to s1_sweep2's 8-lane loop). */
SBN_INLINE int64_t s1_sweep2_x16(int v, int R, int oneb, const sv_in *in, int64_t C, int64_t i, int64_t c0,
                                 int64_t nc, s1_work *w)
{
    int64_t j = 0;
    for (; j + 16 <= nc; j += 16) {
        sbn_v8d a0 = sbn_loadd8(w->ta0 + j), a1 = sbn_loadd8(w->ta0 + j + 8);
        sbn_v8d b0 = sbn_loadd8(w->tb0 + j), b1 = sbn_loadd8(w->tb0 + j + 8);
        sbn_v8d u0 = sbn_loadd8(w->tb1 + j), u1 = sbn_loadd8(w->tb1 + j + 8);
        sbn_v16u mx, mn;
        memcpy(&mx, w->fmx + j, sizeof mx), memcpy(&mn, w->fmn + j, sizeof mn);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int64_t e = (i + r) * C + c0 + j;
            const sbn_v16u bits = s1_bits16(v, in, e);
            s1_track16b(bits, &mx, &mn);
            /* the conversions read memory: no extraction */
            const sbn_v8d x0 = sbn_ld8(SYNCBN_F32, in->x, e), x1 = sbn_ld8(SYNCBN_F32, in->x, e + 8);
            a0 += x0, a1 += x1;
            s1_acc_sq(x0, oneb, &b0, &u0);
            s1_acc_sq(x1, oneb, &b1, &u1);
        }
        memcpy(w->ta0 + j, &a0, sizeof a0), memcpy(w->ta0 + j + 8, &a1, sizeof a1);
        memcpy(w->tb0 + j, &b0, sizeof b0), memcpy(w->tb0 + j + 8, &b1, sizeof b1);
        memcpy(w->tb1 + j, &u0, sizeof u0), memcpy(w->tb1 + j + 8, &u1, sizeof u1);
        memcpy(w->fmx + j, &mx, sizeof mx), memcpy(w->fmn + j, &mn, sizeof mn);
    }
    return j;
}

/* Pass 2 over R rows from row i: the sums of both terms (one level or two, per sum),
 * and with trk the tracking of pass 1 as well. */
SBN_INLINE void s1_sweep2(int v, int R, int onea, int oneb, int trk, const sv_in *in, int64_t C, int64_t i,
                          int64_t c0, int64_t nc, s1_work *w)
{
    int64_t j0 = 0;
    if (trk && onea && !(v & (SV_KIND | SV_BF16))) /* bfloat16: measured slower (widening twice the work) */
        j0 = s1_sweep2_x16(v, R, oneb, in, C, i, c0, nc, w);
    for (int64_t j = j0; j < nc; j += 8) {
        sbn_v8d ta0, ta1, tb0, tb1, m = {0};
        sbn_v8w mx = {0}, mn = {0};
        sbn_v8u dx = {0}, dn = {0};
        memcpy(&ta0, w->ta0 + j, sizeof ta0), memcpy(&ta1, w->ta1 + j, sizeof ta1);
        memcpy(&tb0, w->tb0 + j, sizeof tb0), memcpy(&tb1, w->tb1 + j, sizeof tb1);
        if (trk) {
            memcpy(&mx, w->fmx + j, sizeof mx), memcpy(&mn, w->fmn + j, sizeof mn);
            if (v & SV_KIND)
                memcpy(&dx, w->dmx + j, sizeof dx), memcpy(&dn, w->dmn + j, sizeof dn);
        }
        if (v & SV_KIND)
            m = sbn_loadd8(in->mean + c0 + j);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            sbn_v8f lin;
            sbn_v8d a, b, d = {0};
            s1_terms8(v, in, (i + r) * C + c0 + j, m, &lin, &d, &a, &b);
            if (trk)
                s1_track(v, lin, d, &mx, &mn, &dx, &dn);
            s1_acc(a, onea, &ta0, &ta1);
            if (v & SV_KIND)
                s1_acc(b, oneb, &tb0, &tb1);
            else
                s1_acc_sq(a, oneb, &tb0, &tb1);
        }
        memcpy(w->ta0 + j, &ta0, sizeof ta0), memcpy(w->ta1 + j, &ta1, sizeof ta1);
        memcpy(w->tb0 + j, &tb0, sizeof tb0), memcpy(w->tb1 + j, &tb1, sizeof tb1);
        if (trk) {
            memcpy(w->fmx + j, &mx, sizeof mx), memcpy(w->fmn + j, &mn, sizeof mn);
            if (v & SV_KIND)
                memcpy(w->dmx + j, &dx, sizeof dx), memcpy(w->dmn + j, &dn, sizeof dn);
        }
    }
}

/* The sums of lanes j .. j+7 again (the linear one if lin, the quadratic one if
 * quad), on two levels under the true plan that s1_verify installed: the operations
 * of pass 2 with two levels on these lanes, so the exactness argument above holds for
 * every lane the plan takes (two levels need only the hypotheses of its `ok`; one
 * level is a shortcut). A group, not the chunk: one 64-byte run per row. */
SBN_INLINE void s1_redo(int v, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c0, int64_t j, int lin,
                        int quad, s1_work *w)
{
    const sbn_v8d sa = sbn_loadd8(w->sa + j), sb = sbn_loadd8(w->sb + j);
    const sbn_v8d m = v & SV_KIND ? sbn_loadd8(in->mean + c0 + j) : (sbn_v8d){0};
    sbn_v8d A = sa, T1 = {0}, B = sb, U1 = {0};
    for (int64_t k = 0; k < K; k++) {
        sbn_v8f f;
        sbn_v8d a, b, d;
        s1_terms8(v, in, (i0 + k) * C + c0 + j, m, &f, &d, &a, &b);
        if (lin)
            s1_acc(a, 0, &A, &T1);
        if (quad)
            s1_acc(b, 0, &B, &U1);
    }
    A -= sa, B -= sb;
    if (lin)
        memcpy(w->ta0 + j, &A, sizeof A), memcpy(w->ta1 + j, &T1, sizeof T1);
    if (quad)
        memcpy(w->tb0 + j, &B, sizeof B), memcpy(w->tb1 + j, &U1, sizeof U1);
}

/* Pass 2 over rows [i0, i0 + K): T0, T1 of both sums (A starts at sigma on two
 * levels, and T0 = A - sigma after), tracking with trk. */
SBN_INLINE void s1_pass2(int v, int onea, int oneb, int trk, const sv_in *in, int64_t C, int64_t i0, int64_t K,
                         int64_t c0, int64_t nc, s1_work *w)
{
    for (int64_t j = 0; j < nc; j++) {
        w->ta0[j] = onea ? 0 : w->sa[j], w->tb0[j] = oneb ? 0 : w->sb[j];
        w->ta1[j] = 0, w->tb1[j] = 0;
    }
    if (trk)
        s1_track_init(v & SV_KIND, nc, w);
    int64_t k = 0;
    for (; k + SBN_S1_R <= K; k += SBN_S1_R)
        s1_sweep2(v, SBN_S1_R, onea, oneb, trk, in, C, i0 + k, c0, nc, w);
    for (; k < K; k++)
        s1_sweep2(v, 1, onea, oneb, trk, in, C, i0 + k, c0, nc, w);
    for (int64_t j = 0; j < nc; j++) {
        if (!onea)
            w->ta0[j] -= w->sa[j];
        if (!oneb)
            w->tb0[j] -= w->sb[j];
    }
}

/* s1_pass2 with the plan's levels `one` (s1_plan's bits); the common cases compiled
 * apart so that no level is tested in the inner loop: the checked pass (trk) with the
 * linear sum plain and the quadratic one on two levels (the guess's margin usually
 * rules one level out) or one; after pass 1, one level for the linear sum and two for
 * the quadratic one, or two for both. */
SBN_INLINE void s1_pass2_for(int v, int one, int trk, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c0,
                             int64_t nc, s1_work *w)
{
    if (trk && one == 1)
        s1_pass2(v, 1, 0, 1, in, C, i0, K, c0, nc, w);
    else if (trk)
        s1_pass2(v, 1, 1, 1, in, C, i0, K, c0, nc, w);
    else if (one == 1)
        s1_pass2(v, 1, 0, 0, in, C, i0, K, c0, nc, w);
    else if (one == 0)
        s1_pass2(v, 0, 0, 0, in, C, i0, K, c0, nc, w);
    else
        s1_pass2(v, one & 1, one >> 1, 0, in, C, i0, K, c0, nc, w);
}

/* Deposits the chunk's totals: a taken lane's as one exact integer, the others'
 * terms one by one. Rounded (r1 != NULL: the chunk's rows are the whole batch, and
 * the caller wants each sum rounded once, not accumulated): a taken lane's sum is
 * T0 + T1 in double, which IS the exact sum rounded once, as sbx_round would round
 * it: T0 and T1 are doubles whose exact sum is the block's (the exactness argument
 * above), and an IEEE addition returns its operands' exact sum rounded to nearest,
 * ties to even, with no double rounding; a subnormal sum of two doubles is exact;
 * the sum cannot overflow (the plan keeps it below 2^(lsb + 32 ndigits) <= 2^384);
 * and an exact zero is +0 either way (T0 and T1 start at +0 and never become -0: a
 * sum with +0 or a cancelling sum is +0 when rounding to nearest; A - sigma is an
 * exact difference, +0 when zero). A lane not taken is summed into its (zeroed)
 * accumulator and rounded by sbx_round. */
SBN_INLINE void s1_deposit_sum(int v, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c, int quad,
                               int ok, double t0, double t1, int32_t e0, int32_t e1, int64_t *a, double *r)
{
    const sbx_format f = quad ? SBX_QUADRATIC : SBX_LINEAR;
    if (ok && r) {
        *r = t0 + t1;
    } else if (ok) {
        deposit_total(t0, t1, e0, e1, f, a);
    } else {
        if (r)
            sbx_zero(a, f);
        for (int64_t k = 0; k < K; k++)
            sbx_add(a, f, s1_term1(v, in, (i0 + k) * C + c, c, quad));
        if (r)
            *r = sbx_round(a, f);
    }
}

SBN_INLINE void s1_deposit(int v, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c0, int64_t nc,
                           const s1_work *w, int64_t *acc1, int64_t *acc2, double *r1, double *r2)
{
    const int64_t W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
    for (int64_t j0 = 0; j0 < nc; j0 += 8) /* nc: a multiple of 8 */
        for (int q = 0; q < 2; q++) {
            const int *ok = (q ? w->okb : w->oka) + j0;
            const double *t0 = (q ? w->tb0 : w->ta0) + j0, *t1 = (q ? w->tb1 : w->ta1) + j0;
            double *r = q ? r2 : r1;
            sbn_v8i o;
            memcpy(&o, ok, sizeof o);
            if (r && s1_lanes(o != 0) == 8) { /* rounded, 8 lanes taken: T0 + T1 lane by lane */
                const sbn_v8d t = sbn_loadd8(t0) + sbn_loadd8(t1);
                memcpy(r + j0, &t, sizeof t);
                continue;
            }
            for (int64_t j = j0; j < j0 + 8; j++)
                s1_deposit_sum(v, in, C, i0, K, c0 + j, q, ok[j - j0], t0[j - j0], t1[j - j0],
                               (q ? w->eb0 : w->ea0)[j], (q ? w->eb1 : w->ea1)[j],
                               q ? acc2 + j * W2 : acc1 + j * W1, r ? r + j : NULL);
        }
}

static uint64_t s1_checked, s1_missed; /* sbn_s1_counts */

void sbn_s1_counts(uint64_t *checked, uint64_t *missed)
{
    *checked = __atomic_load_n(&s1_checked, __ATOMIC_RELAXED);
    *missed = __atomic_load_n(&s1_missed, __ATOMIC_RELAXED);
}

/* Both sums of rows [i0, i0 + K) (K <= SBN_XB), channels [c0, c0 + nc), nc a multiple
 * of 8 and at most SBN_S1_CW, into acc1, acc2 (channel c0's first); or, when r1 is not
 * NULL (K rows are the whole batch), rounded into r1, r2 (acc1, acc2 as scratch). One
 * checked pass, or two (see above). */
SBN_INLINE void s1_chunk_v(int v, const sv_in *in, int64_t C, int64_t i0, int64_t K, int64_t c0, int64_t nc,
                           s1_work *w, int64_t *acc1, int64_t *acc2, double *r1, double *r2)
{
    const int kind = v & SV_KIND;
    if (K >= SBN_S1_SPEC) {
        uint32_t redo[2];
        uint64_t cnt[2];
        s1_pass1(v, in, C, i0, SBN_S1_GUESS, c0, nc, w);
        const int one = s1_plan(kind, nc, w, SBN_S1_HEAD, SBN_S1_HEADQ, SBN_S1_MARGIN) | 1; /* linear: plain */
        s1_pass2_for(v, one, 1, in, C, i0, K, c0, nc, w);
        s1_verify(kind, nc, w, one >> 1, redo, cnt);
        __atomic_fetch_add(&s1_checked, cnt[0], __ATOMIC_RELAXED);
        __atomic_fetch_add(&s1_missed, cnt[1], __ATOMIC_RELAXED);
        for (uint32_t g = redo[0] | redo[1]; g; g &= g - 1) {
            const int b = __builtin_ctz(g);
            s1_redo(v, in, C, i0, K, c0, 8 * b, (int)(redo[0] >> b & 1), (int)(redo[1] >> b & 1), w);
        }
    } else {
        s1_pass1(v, in, C, i0, K, c0, nc, w);
        s1_pass2_for(v, s1_plan(kind, nc, w, 0, 0, 0), 0, in, C, i0, K, c0, nc, w);
    }
    s1_deposit(v, in, C, i0, K, c0, nc, w, acc1, acc2, r1, r2);
}

static void sums(int v, const sv_in *in, sbn_shape sh, double *s1, double *s2, int64_t *acc1, int64_t *acc2)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    const int kind = v & SV_KIND;
    /* NHWC with narrow rows: split samples (below). */
    const int T = n * C * S >= SBN_OMP_MIN_WORK ? omp_get_max_threads() : 1;
    const int split = T > 1 && n >= T && C * sbn_esize(sh.dt) < SBN_ROW_SPLIT_BYTES * T && n * C <= SBN_PART_MAX;
    /* REPRODUCIBLE, rounded (moments.h): S == 1 batches of one block per channel round
     * their blocks directly (s1_deposit); the rest accumulate, then round. */
    const int direct = acc1 && s1 && S == 1 && n <= SBN_XB && !split;
    if (acc1 && s1 && !direct) {
        memset(acc1, 0, (size_t)(C * sbx_words(SBX_LINEAR)) * sizeof *acc1);
        memset(acc2, 0, (size_t)(C * sbx_words(SBX_QUADRATIC)) * sizeof *acc2);
        sums(v, in, sh, NULL, NULL, acc1, acc2);
        for (int64_t c = 0; c < C; c++) {
            s1[c] = sbx_round(acc1 + c * sbx_words(SBX_LINEAR), SBX_LINEAR);
            s2[c] = sbx_round(acc2 + c * sbx_words(SBX_QUADRATIC), SBX_QUADRATIC);
        }
        return;
    }
    if (!acc1)
        for (int64_t c = 0; c < C; c++)
            s1[c] = 0, s2[c] = 0;

    /* FAST with S == 1: add each sample's row into the channel totals directly (a
     * vector loop over channels); the same additions, in the same sample order, as
     * the general path below with its one-element partials 0 + v. */
    if (!acc1 && S == 1) {
#pragma omp parallel if (n * C >= SBN_OMP_MIN_WORK)
        {
            int64_t t0, t1;
            thread_channels(C, SBN_LANES, &t0, &t1);
            /* Four rows per sweep: each channel's total stays in a register across
             * them (the same additions in the same order, a quarter of the loads and
             * stores of the totals). */
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
#define SBN_ROWS4(V) add_rows(V, 4, in, i * C, C, t0, t1, s1, s2)
                SV_DISPATCH(v, SBN_ROWS4)
#undef SBN_ROWS4
            }
            for (; i < n; i++) {
#define SBN_ROWS1(V) add_rows(V, 1, in, i * C, C, t0, t1, s1, s2)
                SV_DISPATCH(v, SBN_ROWS1)
#undef SBN_ROWS1
            }
        }
        return;
    }

    /* S == 1: NCHW and NHWC are the same memory, and a one-element partial is the
     * same value either way; the NHWC path vectorizes over channels. */
    if (sh.layout == SYNCBN_NCHW && S > 1) {
        nchw_sums(v, in, sh, s1, s2, acc1, acc2);
        return;
    }

    /* NHWC with narrow rows: split channels and each thread would own a slice of
     * every row narrower than a few cache lines, and the adjacent-line prefetcher
     * pulls the neighbour's slice too (twice the DRAM traffic at 2 threads). Split
     * SAMPLES instead: each per-sample partial is still computed by one thread in
     * the same order, stored, and combined per channel in sample order afterwards,
     * so every sum is the same as with the channel split. */
    if (split) {
        double part[2 * SBN_PART_MAX]; /* [2][n][C]: p1 then p2 */
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            nhwc_partials(v, in, i * S * C, S, C, 0, C, part + i * C, part + (n + i) * C);
        if (acc1) {
            for (int64_t c = 0; c < C; c += 8)
                for (int64_t i = 0; i < n; i += SBN_XB)
                    deposit_block(XS_BUF, XS_BUF, part + i * C + c, part + (n + i) * C + c, NULL, NULL, NULL,
                                  C, n - i < SBN_XB ? n - i : SBN_XB, C - c < 8 ? C - c : 8,
                                  acc1 + c * sbx_words(SBX_LINEAR), acc2 + c * sbx_words(SBX_QUADRATIC), i);
            return;
        }
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < n; i++)
                s1[c] += part[i * C + c], s2[c] += part[(n + i) * C + c];
        return;
    }

    if (acc1) {
        /* REPRODUCIBLE: blocks of K samples x nc channels of partials, each deposited
         * exactly as a whole (see deposit_block). S > 1 keeps FAST's channel chunks (a
         * narrower chunk would read each row more than once) with fewer samples per
         * block; each partial there covers S elements anyway. */
#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
        {
            int64_t t0, t1;
            thread_channels(C, SBN_LANES, &t0, &t1);
            double b1[SBN_XBUF], b2[SBN_XBUF]; /* partials, or (S == 1) packed rows as floats */
            if (S == 1) {
                s1_work w;
                const int64_t W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
                for (int64_t c0 = t0; c0 < t1; c0 += SBN_S1_CW) {
                    const int64_t nc = (t1 - c0 < SBN_S1_CW ? t1 - c0 : SBN_S1_CW) / 8 * 8;
                    for (int64_t i0 = 0; i0 < n && nc; i0 += SBN_XB) {
                        const int64_t K = n - i0 < SBN_XB ? n - i0 : SBN_XB;
#define SBN_S1(V) \
    s1_chunk_v(V, in, C, i0, K, c0, nc, &w, acc1 + c0 * W1, acc2 + c0 * W2, direct ? s1 + c0 : NULL, direct ? s2 + c0 : NULL)
                        SV_DISPATCH(v, SBN_S1)
#undef SBN_S1
                        if ((i0 + K) / SBN_RENORM_EVERY != i0 / SBN_RENORM_EVERY)
                            for (int64_t j = c0; j < c0 + nc; j++) {
                                sbx_normalize(acc1 + j * W1, SBX_LINEAR);
                                sbx_normalize(acc2 + j * W2, SBX_QUADRATIC);
                            }
                    }
                    if (nc < SBN_S1_CW)
                        break; /* the rest of this thread's channels, fewer than 8: below */
                }
            }
            const int64_t cstep = S == 1 ? SBN_XC : SBN_CBLOCK;
            for (int64_t c0 = S == 1 ? t0 + (t1 - t0) / 8 * 8 : t0; c0 < t1; c0 += cstep) {
                const int64_t c1 = c0 + cstep < t1 ? c0 + cstep : t1, nc = c1 - c0;
                const int64_t kmax = S == 1 || nc * SBN_XB <= SBN_XBUF ? SBN_XB : SBN_XBUF / nc;
                int64_t *a1 = acc1 + c0 * sbx_words(SBX_LINEAR), *a2 = acc2 + c0 * sbx_words(SBX_QUADRATIC);
                for (int64_t i0 = 0; i0 < n; i0 += kmax) {
                    const int64_t K = n - i0 < kmax ? n - i0 : kmax;
                    if (S == 1) { /* fewer than 8 channels: packed, then the exact blocks */
                        float *xb = (float *)b1, *gb = (float *)b2;
                        if (direct) /* the whole batch in one block: zeroed here, rounded below */
                            for (int64_t j = 0; j < nc; j++) {
                                sbx_zero(a1 + j * sbx_words(SBX_LINEAR), SBX_LINEAR);
                                sbx_zero(a2 + j * sbx_words(SBX_QUADRATIC), SBX_QUADRATIC);
                            }
#define SBN_PACK(V) pack_rows_v(V, in, C, i0, K, c0, nc, xb, gb)
                        SV_DISPATCH(v, SBN_PACK)
#undef SBN_PACK
                        deposit_block(kind ? XS_DY : XS_X, kind ? XS_DYXM : XS_XX, NULL, NULL, xb, gb,
                                      kind ? in->mean + c0 : NULL, SBN_XC, K, nc, a1, a2, i0);
                        if (direct)
                            for (int64_t j = 0; j < nc; j++) {
                                s1[c0 + j] = sbx_round(a1 + j * sbx_words(SBX_LINEAR), SBX_LINEAR);
                                s2[c0 + j] = sbx_round(a2 + j * sbx_words(SBX_QUADRATIC), SBX_QUADRATIC);
                            }
                        continue;
                    }
                    for (int64_t k = 0; k < K; k++)
                        nhwc_partials(v, in, (i0 + k) * S * C, S, C, c0, c1, b1 + k * nc, b2 + k * nc);
                    deposit_block(XS_BUF, XS_BUF, b1, b2, NULL, NULL, NULL, nc, K, nc, a1, a2, i0);
                }
            }
        }
        return;
    }

#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
    {
        int64_t t0, t1;
        thread_channels(C, SBN_LANES, &t0, &t1);
        double p1[SBN_CBLOCK], p2[SBN_CBLOCK];
        for (int64_t c0 = t0; c0 < t1; c0 += SBN_CBLOCK) {
            int64_t c1 = c0 + SBN_CBLOCK < t1 ? c0 + SBN_CBLOCK : t1;
            for (int64_t i = 0; i < n; i++) {
                nhwc_partials(v, in, i * S * C, S, C, c0, c1, p1, p2);
                for (int64_t c = c0; c < c1; c++)
                    s1[c] += p1[c - c0], s2[c] += p2[c - c0];
            }
        }
    }
}

void sbn_forward_sums(const void *x, sbn_shape sh, double *s1, double *s2, int64_t *acc1, int64_t *acc2)
{
    const sv_in in = {.x = x};
    sums(sh.dt == SYNCBN_BF16 ? SV_BF16 : 0, &in, sh, s1, s2, acc1, acc2);
}

void sbn_backward_sums(const void *x, const void *dy, const uint8_t *mask, const double *mean, sbn_shape sh,
                       double *s1, double *s2, int64_t *acc1, int64_t *acc2)
{
    const sv_in in = {.x = x, .dy = dy, .mask = mask, .mean = mean};
    sums(SV_KIND | (sh.dt == SYNCBN_BF16 ? SV_BF16 : 0) | (mask ? SV_RELU : 0), &in, sh, s1, s2, acc1, acc2);
}
