/*
 * moments.c - local BN kernels: per-channel sums, normalization, input gradient.
 *
 * Memory-bound by design: each kernel streams its inputs once. Inner loops keep
 * SBN_LANES independent double accumulators as GNU vectors of 8 doubles (one AVX-512
 * register), so nothing is reassociated (no reassociating compiler flags needed), and the lanes are
 * combined in a fixed order; vector bodies and scalar tails round identically. Large
 * outputs are written with streaming stores. None of this changes a result bit; see
 * moments.h for the reduction order and examples/bench.c to measure (issue 5).
 */
#include "moments.h"

#include <omp.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define SBN_LANES 16
#define SBN_CBLOCK 256              /* NHWC channel sub-block held in registers/L1 */
#define SBN_OMP_MIN_WORK (1 << 15)  /* below this many elements, stay on one thread */
#define SBN_RENORM_EVERY (1 << 29)  /* deposits between exactsum normalizations */
#define SBN_ROW_SPLIT_BYTES 256     /* NHWC: below this many bytes of a row per thread, split samples */
#define SBN_PART_MAX 4096           /* ... if n*C partials fit on the stack (64 KiB) */

/* ---- vector helpers ----
 * GNU vector types (not intrinsics): the compiler emits AVX-512, AVX2 or SSE as the
 * target allows, and each lane of a vector is an ordinary IEEE double operation, so
 * results are the same bits as the scalar loops they replace (no reassociation, and
 * -ffp-contract=off keeps a*b+c as two roundings). */
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors only cross static, inlined calls */
typedef double sbn_v8d __attribute__((vector_size(64)));
typedef float sbn_v8f __attribute__((vector_size(32)));

/* 8 floats at p (any alignment), widened exactly to double. With AVX-512 one
 * vcvtps2pd ymm->zmm; the generic conversion would be split into 128-bit halves and
 * re-inserted (GCC 12 prefers 256-bit vectors on this CPU), saturating port 5. */
static inline sbn_v8d load8(const float *p)
{
#ifdef __AVX512F__
    return (sbn_v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#else
    sbn_v8f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, sbn_v8d);
#endif
}

/* ---- per-sample partials of one (sample, channel) row, NCHW ---- */

typedef double sbn_v4d __attribute__((vector_size(32)));
typedef uint64_t sbn_v8u __attribute__((vector_size(64)));

/* The first k floats at p (0 < k < 8), widened to double, zeros after: one masked
 * load with AVX-512VL, else through a zeroed buffer (the same values either way). */
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define SBN_HAVE_MASKED 1
static inline sbn_v8d load8_first(const float *p, int64_t k)
{
    return (sbn_v8d)_mm512_cvtps_pd(_mm256_maskz_loadu_ps((__mmask8)((1u << k) - 1), p));
}
#else
#define SBN_HAVE_MASKED 0
static inline sbn_v8d load8_first(const float *p, int64_t k)
{
    float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(t, p, (size_t)k * sizeof *t);
    return load8(t);
}
#endif

/* *v with lanes k..7 set to +0 (0 <= k <= 8). (Pointer arguments: GCC notes a psABI
 * change for 64-byte vectors passed by value where AVX-512 is off.) */
static inline sbn_v8d keep_first(const sbn_v8d *v, int64_t k)
{
    const sbn_v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return (sbn_v8d)((sbn_v8u)*v & (sbn_v8u)(lane < (uint64_t)k)); /* all ones where lane < k */
}

/* The 16 lanes (a[0] = lanes 0..7, a[1] = lanes 8..15) summed as a fixed tree:
 * lane j + lane j+8, then j + j+4, then j + j+2, then 0 + 1. */
static inline __attribute__((always_inline)) double lanes16(const sbn_v8d *a)
{
    sbn_v8d v = a[0] + a[1];
    sbn_v4d lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    sbn_v4d w = lo + hi;
    double w0 = w[0] + w[2], w1 = w[1] + w[3];
    return w0 + w1;
}

/* p1 = sum x, p2 = sum x^2 (kind 0) or p1 = sum dy, p2 = sum dy*(x - m) (kind 1) over
 * each of nr contiguous rows of S floats (rows xr[r], gr[r]; m[r] their channels'
 * means). Lane j of a row's 16 accumulators takes positions s = j (mod 16), the last
 * S mod 16 positions as one masked step (a masked-off position adds +0, which changes
 * no lane: its loads are zero, and for dy*(x-m) the factor x-m is zeroed as well, so
 * that a non-finite mean cannot make it NaN); the lanes are then summed as the fixed
 * tree of lanes16. Every operation is a vector one, so a short row (S = 196: 12 full
 * steps, one 4-wide step, a tree of 5 additions) costs little beyond its loads.
 * nr = 4 runs four independent chains, which hides the latency of the additions of
 * long rows; each row still gets exactly its own operations. kind and nr (1 or 4) are
 * compile-time constants at every call. */
static inline __attribute__((always_inline)) void rows_partials(int kind, int nr, const float *const *xr,
                                                                const float *const *gr, const double *m,
                                                                int64_t S, double *p1, double *p2)
{
    sbn_v8d a[4][2], b[4][2], mv[4];
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++) {
        a[r][0] = a[r][1] = b[r][0] = b[r][1] = mv[r] = (sbn_v8d){0};
        if (kind)
            mv[r] = (sbn_v8d){m[r], m[r], m[r], m[r], m[r], m[r], m[r], m[r]};
    }
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            if (kind == 0) {
                sbn_v8d u = load8(xr[r] + s), w = load8(xr[r] + s + 8);
                a[r][0] += u, a[r][1] += w;
                b[r][0] += u * u, b[r][1] += w * w; /* exact: a float squared fits in a double */
            } else {
                sbn_v8d g = load8(gr[r] + s), h = load8(gr[r] + s + 8);
                a[r][0] += g, a[r][1] += h;
                b[r][0] += g * (load8(xr[r] + s) - mv[r]), b[r][1] += h * (load8(xr[r] + s + 8) - mv[r]);
            }
        }
    }
    const int64_t t = S - s; /* 0 <= t < 16 positions left */
    if (t) {
        const int64_t t0 = t < 8 ? t : 8, t1 = t - t0; /* into lanes 0..7, then 8..15 */
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const float *xs = xr[r] + s;
            sbn_v8d u = t0 == 8 ? load8(xs) : load8_first(xs, t0);
            sbn_v8d w = t1 ? load8_first(xs + 8, t1) : (sbn_v8d){0};
            if (kind == 0) {
                a[r][0] += u, a[r][1] += w;
                b[r][0] += u * u, b[r][1] += w * w;
            } else {
                const float *gs = gr[r] + s;
                sbn_v8d g = t0 == 8 ? load8(gs) : load8_first(gs, t0);
                sbn_v8d h = t1 ? load8_first(gs + 8, t1) : (sbn_v8d){0};
                a[r][0] += g, a[r][1] += h;
                const sbn_v8d du = u - mv[r], dw = w - mv[r];
                b[r][0] += g * keep_first(&du, t0), b[r][1] += h * keep_first(&dw, t1);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        p1[r] = lanes16(a[r]), p2[r] = lanes16(b[r]);
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
#define SBN_XC 32                 /* S == 1: channels per block (SBN_XB x SBN_XC floats per buffer) */
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

static inline double dbl_of_bits(uint64_t b)
{
    double d;
    memcpy(&d, &b, sizeof d);
    return d;
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

/* Pass 1 step: the largest magnitude and the smallest nonzero magnitude (minus one, so
 * that a zero wraps to the top) of each lane, on the bit patterns (NaN > Inf > finite). */
static inline __attribute__((always_inline)) void track(sbn_v8d v, sbn_v8u *mx, sbn_v8u *mn)
{
    const uint64_t big = INT64_MAX;
    const sbn_v8u absmask = {big, big, big, big, big, big, big, big}, one = absmask & 1;
    sbn_v8u b = (sbn_v8u)v & absmask, bm = b - one;
#ifdef __AVX512F__ /* GCC 12 emits compare + blend for the generic form */
    *mx = (sbn_v8u)_mm512_max_epu64((__m512i)b, (__m512i)*mx);
    *mn = (sbn_v8u)_mm512_min_epu64((__m512i)bm, (__m512i)*mn);
#else
    sbn_v8u gt = (sbn_v8u)(b > *mx), lt = (sbn_v8u)(bm < *mn);
    *mx = (b & gt) | (*mx & ~gt);
    *mn = (bm & lt) | (*mn & ~lt);
#endif
}

/* Per-lane plan of one sum from pass 1 (see above): e0 = log2 u0, e1 = log2 u1, the
 * extraction constants sigma, and whether the lane is taken at all. Returns 1 if every
 * taken lane needs one level only. */
typedef struct {
    double s0[32];
    int32_t E0[32], E1[32];
    int ok[32];
} xplan;

static inline __attribute__((always_inline)) int plan_lanes(int nv, const sbn_v8u *mx, const sbn_v8u *mn,
                                                            int mbits, sbx_format f, xplan *pl)
{
    const int B = SBN_XB_BITS;
    int one_level = 1;
    for (int q = 0; q < nv; q++)
        for (int j = 0; j < 8; j++) {
            const int l = 8 * q + j;
            int32_t eb = (int32_t)(mx[q][j] >> 52), e = (eb ? eb : 1) - 1022; /* every |v| < 2^e */
            int32_t e1 = e + 2 * B - 103 > f.lsb_exp ? e + 2 * B - 103 : f.lsb_exp, e0 = e1 + 52 - B;
            int32_t lo = e0; /* every value is a multiple of 2^lo; all zero: of anything */
            if (mn[q][j] != ~UINT64_C(0)) {
                int32_t ebm = (int32_t)((mn[q][j] + 1) >> 52);
                lo = (ebm ? ebm : 1) - 1023 - mbits;
            }
            pl->ok[l] = eb != 0x7FF && lo >= e1 && e + B <= f.lsb_exp + 32 * (f.ndigits - 1);
            if (!pl->ok[l]) e1 = f.lsb_exp, e0 = e1 + 52 - B; /* keeps sigma finite; totals discarded */
            else if (lo < e0) one_level = 0;
            pl->E0[l] = e0, pl->E1[l] = e1;
            pl->s0[l] = dbl_of_bits((uint64_t)(e0 + 52 + 1023) << 52 | UINT64_C(1) << 51);
        }
    return one_level;
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
    const int B = SBN_XB_BITS;
    const int64_t W = sbx_words(f);
    for (int q = 0; q < nv; q++)
        for (int j = 0; j < 8; j++) {
            const int l = 8 * q + j;
            int64_t *a = acc + l * W;
            if (pl->ok[l]) {
                __int128 v = (__int128)scaled_int(T0[q][j], pl->E0[l]) * ((__int128)1 << (52 - B)) +
                             scaled_int(T1[q][j], pl->E1[l]);
                sbx_add_scaled(a, f, v, pl->E1[l]);
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

/* Both sums of an S == 1 block of 16 channels (nv must be 2) at once (kind 0: x and
 * x^2; kind 1: dy and dy*(x-m)),
 * sharing the loads and, for x^2, pass 1: squaring is exact and monotonic in |x|, so
 * the extreme magnitudes of x^2 are the squares of those of x. */
typedef uint32_t sbn_v16u __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) void xblock_pair(int kind, int nv, const float *x, const float *dy,
                                                              const double *m, int64_t ld, int64_t K,
                                                              int64_t *acc1, int64_t *acc2)
{
    const int sa = kind ? XS_DY : XS_X, sb = kind ? XS_DYXM : XS_XX;
    sbn_v8u mxa[2], mna[2], mxb[2] = {{0}}, mnb[2];
    for (int q = 0; q < nv; q++)
        mnb[q] = ~(sbn_v8u){0};
    /* Pass 1 of the linear sum on the float bit patterns themselves, 16 lanes a vector
     * and no conversion (widening to double is exact and keeps the order). */
    const float *fa = kind ? dy : x;
    sbn_v16u fmx = {0}, fmn = ~(sbn_v16u){0};
    for (int64_t k = 0; k < K; k++) {
        sbn_v16u b;
        memcpy(&b, fa + k * ld, sizeof b);
        b &= 0x7FFFFFFFu;
#ifdef __AVX512F__
        fmx = (sbn_v16u)_mm512_max_epu32((__m512i)b, (__m512i)fmx);
        fmn = (sbn_v16u)_mm512_min_epu32((__m512i)(b - 1u), (__m512i)fmn);
#else
        sbn_v16u gt = (sbn_v16u)(b > fmx), bm = b - 1u, lt = (sbn_v16u)(bm < fmn);
        fmx = (b & gt) | (fmx & ~gt);
        fmn = (bm & lt) | (fmn & ~lt);
#endif
        if (kind)
            for (int q = 0; q < nv; q++)
                track(xs_load(sb, NULL, x, dy, m, k * ld + 8 * q, 8 * q), &mxb[q], &mnb[q]);
    }
    for (int l = 0; l < 16; l++) {
        /* element by value: clang refuses the address of a vector element */
        float hi, lo;
        const uint32_t bh = fmx[l], bl = fmn[l] + 1u;
        memcpy(&hi, &bh, sizeof hi), memcpy(&lo, &bl, sizeof lo);
        double dh = hi, dl = lo;
        uint64_t uh, ul;
        memcpy(&uh, &dh, sizeof uh), memcpy(&ul, &dl, sizeof ul);
        mxa[l / 8][l % 8] = uh;
        mna[l / 8][l % 8] = fmn[l] == ~0u ? ~UINT64_C(0) : ul - 1;
    }
    if (!kind)
        for (int q = 0; q < nv; q++)
            for (int j = 0; j < 8; j++) {
                double hi = dbl_of_bits(mxa[q][j]), lo = dbl_of_bits(mna[q][j] + 1);
                uint64_t bh, bl;
                hi *= hi, lo *= lo; /* NaN and Inf stay NaN and Inf */
                memcpy(&bh, &hi, sizeof bh), memcpy(&bl, &lo, sizeof bl);
                mxb[q][j] = bh;
                mnb[q][j] = mna[q][j] == ~UINT64_C(0) ? mna[q][j] : bl - 1;
            }
    xplan pa, pb;
    const int onea = plan_lanes(nv, mxa, mna, xs_mbits(sa), SBX_LINEAR, &pa);
    const int oneb = plan_lanes(nv, mxb, mnb, xs_mbits(sb), SBX_QUADRATIC, &pb);
    sbn_v8d Sa[4], Sb[4], Ta0[4] = {{0}}, Ta1[4] = {{0}}, Tb0[4] = {{0}}, Tb1[4] = {{0}};
    memcpy(Sa, pa.s0, (size_t)nv * sizeof Sa[0]);
    memcpy(Sb, pb.s0, (size_t)nv * sizeof Sb[0]);
    /* The common case (one level for the linear sum, two for the quadratic one) gets its
     * own loop; the others share a generic one. */
#define SBN_XPAIR_LOOP(ONEA, ONEB)                                                                    \
    for (int64_t k = 0; k < K; k++)                                                                \
        for (int q = 0; q < nv; q++) {                                                             \
            const int64_t o = k * ld + 8 * q;                                                      \
            extract(xs_load(sa, NULL, x, dy, m, o, 8 * q), Sa[q], ONEA, &Ta0[q], &Ta1[q]);         \
            extract(xs_load(sb, NULL, x, dy, m, o, 8 * q), Sb[q], ONEB, &Tb0[q], &Tb1[q]);         \
        }
    if (onea && !oneb) {
        SBN_XPAIR_LOOP(1, 0)
    } else {
        SBN_XPAIR_LOOP(onea, oneb)
    }
#undef SBN_XPAIR_LOOP
    deposit_lanes(sa, nv, Ta0, Ta1, &pa, NULL, x, dy, m, ld, K, SBX_LINEAR, acc1);
    deposit_lanes(sb, nv, Tb0, Tb1, &pb, NULL, x, dy, m, ld, K, SBX_QUADRATIC, acc2);
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
    int64_t j = 0;
    if (src1 != XS_BUF) { /* S == 1: both sums in one pass over the rows */
        const int kind = src1 == XS_DY;
        for (; j + 16 <= nc; j += 16) /* 16 lanes: the 12 vectors of sums and constants stay in registers */
            if (kind)
                xblock_pair(1, 2, x + j, dy + j, m + j, ld, K, acc1 + j * W1, acc2 + j * W2);
            else
                xblock_pair(0, 2, x + j, NULL, NULL, ld, K, acc1 + j * W1, acc2 + j * W2);
    }
    xblock_any(src1, p1 ? p1 + j : NULL, x ? x + j : NULL, dy ? dy + j : NULL, m ? m + j : NULL, ld, K, nc - j,
               SBX_LINEAR, acc1 + j * W1);
    xblock_any(src2, p2 ? p2 + j : NULL, x ? x + j : NULL, dy ? dy + j : NULL, m ? m + j : NULL, ld, K, nc - j,
               SBX_QUADRATIC, acc2 + j * W2);
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

/* NHWC partials of nq*8 channels starting at c0 of one sample, held in registers
 * across all S positions (one pass over the sample's rows). Each channel's partial is
 * summed over s in order, exactly as the scalar loop below. kind and nq are
 * compile-time constants at every call, so the arrays live in vector registers. */
static inline __attribute__((always_inline)) void nhwc_block(int kind, int nq, const float *x, const float *dy,
                                                             const double *mean, int64_t S, int64_t C,
                                                             int64_t c0, double *p1, double *p2)
{
    sbn_v8d P1[8], P2[8], M[8];
    for (int q = 0; q < nq; q++) {
        P1[q] = (sbn_v8d){0}, P2[q] = (sbn_v8d){0};
        if (kind)
            memcpy(&M[q], mean + c0 + 8 * q, sizeof M[q]);
    }
    for (int64_t s = 0; s < S; s++) {
        const float *xs = x + s * C + c0;
        if (kind == 0) {
            for (int q = 0; q < nq; q++) {
                sbn_v8d v = load8(xs + 8 * q);
                P1[q] += v, P2[q] += v * v;
            }
        } else {
            const float *gs = dy + s * C + c0;
            for (int q = 0; q < nq; q++) {
                sbn_v8d g = load8(gs + 8 * q);
                P1[q] += g, P2[q] += g * (load8(xs + 8 * q) - M[q]);
            }
        }
    }
    for (int q = 0; q < nq; q++) {
        memcpy(p1 + 8 * q, &P1[q], sizeof P1[q]);
        memcpy(p2 + 8 * q, &P2[q], sizeof P2[q]);
    }
}

/* NHWC partials of channels [c0, c1) of one sample: the S positions are summed in
 * order, one channel per vector lane. kind 0: (x, x^2); kind 1: (dy, dy*(x-m)).
 * Blocks of 64, then 32, 16, 8 channels in registers; a scalar tail for the rest. */
static void nhwc_partials(int kind, const float *x, const float *dy, const double *mean, int64_t S,
                          int64_t C, int64_t c0, int64_t c1, double *p1, double *p2)
{
    int64_t c = c0;
#define SBN_NHWC_BLOCK(nq)                                                                                    \
    for (; c + 8 * (nq) <= c1; c += 8 * (nq)) {                                                           \
        if (kind == 0)                                                                                    \
            nhwc_block(0, nq, x, dy, mean, S, C, c, p1 + (c - c0), p2 + (c - c0));                        \
        else                                                                                              \
            nhwc_block(1, nq, x, dy, mean, S, C, c, p1 + (c - c0), p2 + (c - c0));                        \
    }
    SBN_NHWC_BLOCK(8)
    SBN_NHWC_BLOCK(4)
    SBN_NHWC_BLOCK(2)
    SBN_NHWC_BLOCK(1)
#undef SBN_NHWC_BLOCK
    for (; c < c1; c++) {
        double t1 = 0, t2 = 0;
        for (int64_t s = 0; s < S; s++) {
            if (kind == 0) {
                double v = x[s * C + c];
                t1 += v, t2 += v * v;
            } else {
                double g = dy[s * C + c];
                t1 += g, t2 += g * ((double)x[s * C + c] - mean[c]);
            }
        }
        p1[c - c0] = t1, p2[c - c0] = t2;
    }
}

/* NCHW sums. Each thread owns a range of channels and reads its rows in memory
 * order: for each sample, the run of its channels' rows, a block of SBN_NCHW_CW
 * channels at a time (rows_partials). (A walk down one channel would jump C*S
 * floats from row to row.) Rows of at least SBN_NCHW_MULTI_S floats (4 KiB) go four
 * at once, as four independent chains of additions; shorter rows one at a time, so
 * that the reads stay in address order within each page, which the hardware
 * prefetcher follows (four interleaved short rows measured 1.1-1.15x slower on
 * (32,256,14,14), and one long row at a time 1.12-1.15x slower on 56x56). The
 * partials of SBN_NCHW_K samples go to a buffer, and each channel's are then
 * combined in sample order, by adding (FAST:
 * the same additions, in the same order, as one partial at a time) or as exact
 * blocks (REPRODUCIBLE: the same accumulated integer). Owning channels, a thread
 * never waits for another. */
#define SBN_NCHW_CW 64                      /* channels per block */
#define SBN_NCHW_MULTI_S 1024                /* rows this long: four at once */
#define SBN_NCHW_K (SBN_XBUF / SBN_NCHW_CW) /* samples per block */
_Static_assert(SBN_NCHW_K <= SBN_XB, "an NCHW block is one exact deposit");

static void nchw_sums(int kind, const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                      double *s2, int64_t *acc1, int64_t *acc2)
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
                    const int64_t row0 = (i0 + k) * C + c0; /* row of channel c0 */
                    double *o1 = q1 + k * nc, *o2 = q2 + k * nc;
                    for (int64_t j = 0; j < nc;) {
                        const int nr = S >= SBN_NCHW_MULTI_S && nc - j >= 4 ? 4 : 1;
                        const float *xr[4], *gr[4] = {NULL, NULL, NULL, NULL};
                        for (int r = 0; r < nr; r++) {
                            xr[r] = x + (row0 + j + r) * S;
                            if (kind)
                                gr[r] = dy + (row0 + j + r) * S;
                        }
                        const double *m = kind ? mean + c0 + j : NULL;
                        if (nr == 4 && kind == 0)
                            rows_partials(0, 4, xr, gr, m, S, o1 + j, o2 + j);
                        else if (nr == 4)
                            rows_partials(1, 4, xr, gr, m, S, o1 + j, o2 + j);
                        else if (kind == 0)
                            rows_partials(0, 1, xr, gr, m, S, o1 + j, o2 + j);
                        else
                            rows_partials(1, 1, xr, gr, m, S, o1 + j, o2 + j);
                        j += nr;
                    }
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

/* FAST, S == 1: adds R consecutive rows [R][C] (samples in order) into the totals of
 * channels [t0, t1). The one-element partial of each sample is 0 + term (adding +0
 * matters only for the sign of a zero). kind and R (1 or 4) are compile-time
 * constants at every call. */
static inline __attribute__((always_inline)) void add_rows(int kind, int R, const float *x, const float *dy,
                                                           const double *mean, int64_t C, int64_t t0,
                                                           int64_t t1, double *s1, double *s2)
{
    for (int64_t c = t0; c < t1; c++) {
        double a = s1[c], b = s2[c];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            if (kind == 0) {
                const double v = x[r * C + c];
                a += 0.0 + v, b += 0.0 + v * v;
            } else {
                const double g = dy[r * C + c];
                a += 0.0 + g, b += 0.0 + g * ((double)x[r * C + c] - mean[c]);
            }
        }
        s1[c] = a, s2[c] = b;
    }
}

static void sums(int kind, const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                 double *s2, int64_t *acc1, int64_t *acc2)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
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
            for (; i + 4 <= n; i += 4)
                if (kind == 0)
                    add_rows(0, 4, x + i * C, NULL, NULL, C, t0, t1, s1, s2);
                else
                    add_rows(1, 4, x + i * C, dy + i * C, mean, C, t0, t1, s1, s2);
            for (; i < n; i++)
                if (kind == 0)
                    add_rows(0, 1, x + i * C, NULL, NULL, C, t0, t1, s1, s2);
                else
                    add_rows(1, 1, x + i * C, dy + i * C, mean, C, t0, t1, s1, s2);
        }
        return;
    }

    /* S == 1: NCHW and NHWC are the same memory, and a one-element partial is the
     * same value either way; the NHWC path vectorizes over channels. */
    if (sh.layout == SYNCBN_NCHW && S > 1) {
        nchw_sums(kind, x, dy, mean, sh, s1, s2, acc1, acc2);
        return;
    }

    /* NHWC with narrow rows: split channels and each thread would own a slice of
     * every row narrower than a few cache lines, and the adjacent-line prefetcher
     * pulls the neighbour's slice too (twice the DRAM traffic at 2 threads). Split
     * SAMPLES instead: each per-sample partial is still computed by one thread in
     * the same order, stored, and combined per channel in sample order afterwards,
     * so every sum is the same as with the channel split. */
    const int T = n * C * S >= SBN_OMP_MIN_WORK ? omp_get_max_threads() : 1;
    if (T > 1 && n >= T && C * (int64_t)sizeof(float) < SBN_ROW_SPLIT_BYTES * T && n * C <= SBN_PART_MAX) {
        double part[2 * SBN_PART_MAX]; /* [2][n][C]: p1 then p2 */
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const int64_t off = i * S * C;
            nhwc_partials(kind, x + off, kind ? dy + off : NULL, mean, S, C, 0, C, part + i * C,
                          part + (n + i) * C);
        }
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
            const int64_t cstep = S == 1 ? SBN_XC : SBN_CBLOCK;
            for (int64_t c0 = t0; c0 < t1; c0 += cstep) {
                const int64_t c1 = c0 + cstep < t1 ? c0 + cstep : t1, nc = c1 - c0;
                const int64_t kmax = S == 1 || nc * SBN_XB <= SBN_XBUF ? SBN_XB : SBN_XBUF / nc;
                int64_t *a1 = acc1 + c0 * sbx_words(SBX_LINEAR), *a2 = acc2 + c0 * sbx_words(SBX_QUADRATIC);
                for (int64_t i0 = 0; i0 < n; i0 += kmax) {
                    const int64_t K = n - i0 < kmax ? n - i0 : kmax;
                    if (S == 1) {
                        /* The partials are the elements' terms themselves. The block's
                         * rows are first packed contiguously: read in place, rows C
                         * floats apart would alias in the L1 sets (C is often a power
                         * of two) and be fetched from L2 on each pass. */
                        float *xb = (float *)b1, *gb = (float *)b2;
                        for (int64_t k = 0; k < K; k++) {
                            const float *xr = x + (i0 + k) * C + c0, *gr = kind ? dy + (i0 + k) * C + c0 : NULL;
                            if (nc == SBN_XC) { /* constant size: inlined, no libc call per row */
                                memcpy(xb + k * SBN_XC, xr, SBN_XC * sizeof *xb);
                                if (kind)
                                    memcpy(gb + k * SBN_XC, gr, SBN_XC * sizeof *gb);
                            } else {
                                memcpy(xb + k * SBN_XC, xr, (size_t)nc * sizeof *xb);
                                if (kind)
                                    memcpy(gb + k * SBN_XC, gr, (size_t)nc * sizeof *gb);
                            }
                        }
                        deposit_block(kind ? XS_DY : XS_X, kind ? XS_DYXM : XS_XX, NULL, NULL, xb, gb,
                                      kind ? mean + c0 : NULL, SBN_XC, K, nc, a1, a2, i0);
                        continue;
                    }
                    for (int64_t k = 0; k < K; k++) {
                        const int64_t off = (i0 + k) * S * C;
                        nhwc_partials(kind, x + off, kind ? dy + off : NULL, mean, S, C, c0, c1, b1 + k * nc,
                                      b2 + k * nc);
                    }
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
                const int64_t off = i * S * C;
                nhwc_partials(kind, x + off, kind ? dy + off : NULL, mean, S, C, c0, c1, p1, p2);
                for (int64_t c = c0; c < c1; c++)
                    s1[c] += p1[c - c0], s2[c] += p2[c - c0];
            }
        }
    }
}

void sbn_forward_sums(const float *x, sbn_shape sh, double *s1, double *s2, int64_t *acc1, int64_t *acc2)
{
    sums(0, x, NULL, NULL, sh, s1, s2, acc1, acc2);
}

void sbn_backward_sums(const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                       double *s2, int64_t *acc1, int64_t *acc2)
{
    sums(1, x, dy, mean, sh, s1, s2, acc1, acc2);
}

/* ---- elementwise ----
 * Vector bodies compute every element with the same double operations, in the same
 * order, as the scalar steps, so the output bits depend neither on where a vector
 * boundary falls nor on the alignment of any buffer.
 *
 * Alignment. Users pass buffers at any 4-byte alignment (malloc, numpy, tensor
 * slices), and x, dy and the output may each be aligned differently. Loads are
 * unaligned vector loads wherever they fall. Large outputs are written with streaming
 * stores, and a streaming store that fills only part of a cache line, or a line
 * written partly by streaming and partly by ordinary stores, costs a partial write
 * to memory (measured 2-3x slower on narrow NHWC rows). So streaming stores are used
 * for whole 64-byte lines of the output only, located on the output's own address
 * grid, never on the row grid; the partial lines at either end of a span go through
 * ordinary stores. NHWC spans run over a thread's whole share of the tensor, with the
 * channel index wrapping, so only its two ends can be partial lines. */

/* 8 consecutive doubles at p (any alignment). */
static inline sbn_v8d loadd8(const double *p)
{
    sbn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline sbn_v8d bcast8(double v) { return (sbn_v8d){v, v, v, v, v, v, v, v}; }

/* Outputs at least this large are written with non-temporal (streaming) stores: they
 * cannot stay in cache anyway, and streaming skips the read-for-ownership of every
 * destination line, so a pass moves 8 instead of 12 bytes per element of y (12 instead
 * of 16 for dx). Only the store instruction differs; the values are the same. */
#define SBN_NT_MIN_BYTES ((int64_t)16 << 20)
#define SBN_LINE_FLOATS 16 /* one 64-byte cache line */

#ifdef __AVX512F__
#define SBN_HAVE_NT 1
/* Stores 8 doubles rounded to float (to nearest, as a C cast): streaming (p must be
 * 32-byte aligned) or not. A pointer argument: GCC notes a psABI change for 64-byte
 * vectors passed by value. */
static inline void put8(float *p, const sbn_v8d *v, int nt)
{
    const __m256 f = _mm512_cvtpd_ps((__m512d)*v);
    if (nt)
        _mm256_stream_ps(p, f);
    else
        _mm256_storeu_ps(p, f);
}
#else
#define SBN_HAVE_NT 0
static inline void put8(float *p, const sbn_v8d *v, int nt)
{
    (void)nt;
    sbn_v8f f = __builtin_convertvector(*v, sbn_v8f);
    memcpy(p, &f, sizeof f);
}
#endif

/* Streaming stores are weakly ordered: each thread fences its own before the
 * region's closing barrier, so the data are visible to whoever reads them next. */
static inline void nt_fence(int nt)
{
#if SBN_HAVE_NT
    if (nt)
        _mm_sfence();
#else
    (void)nt;
#endif
}

/* The first k < 8 outputs of v stored to p as one masked vector step (load8_first
 * reads the matching inputs; masked-off lanes compute on zeros and are neither
 * stored nor seen). Without AVX-512VL the callers take scalar steps instead
 * (SBN_HAVE_MASKED = 0). */
#if SBN_HAVE_MASKED
static inline void put8_first(float *p, const sbn_v8d *v, int64_t k)
{
    _mm256_mask_storeu_ps(p, (__mmask8)((1u << k) - 1), _mm512_cvtpd_ps((__m512d)*v));
}
#else
static inline void put8_first(float *p, const sbn_v8d *v, int64_t k) { (void)p, (void)v, (void)k; }
#endif

void sbn_coef_wrap(double *a, int64_t C)
{
    for (int64_t j = 0; j < SBN_COEF_PAD; j++)
        a[C + j] = a[j % C];
}

/* The two elementwise passes, one body each (op is a compile-time constant):
 *   EW_NORM  out = (x - m) * k + a                  (y; a is the shift)
 *   EW_DX    out = k * (dy - a - (x - m) * b)       (dx)
 * with the per-channel coefficients m, k, a, b. */
enum { EW_NORM, EW_DX };

typedef struct {
    float *out;
    const float *x, *dy;
    const double *m, *k, *a, *b; /* [C + SBN_COEF_PAD] each (b unused by EW_NORM) */
    int64_t C;
} ew_args;

/* Coefficients of 8 consecutive outputs as vectors: the same channel in every lane
 * (NCHW: one row), or channels c .. c+7 (NHWC; the pad makes the wrap past C - 1 a
 * plain load). */
typedef struct {
    sbn_v8d m, k, a, b;
} ew_coef;

static inline __attribute__((always_inline)) void ew_coef_row(int op, const ew_args *e, int64_t c, ew_coef *q)
{
    q->m = bcast8(e->m[c]), q->k = bcast8(e->k[c]), q->a = bcast8(e->a[c]);
    q->b = op == EW_DX ? bcast8(e->b[c]) : (sbn_v8d){0};
}

static inline __attribute__((always_inline)) void ew_coef_lanes(int op, const ew_args *e, int64_t c, ew_coef *q)
{
    q->m = loadd8(e->m + c), q->k = loadd8(e->k + c), q->a = loadd8(e->a + c);
    q->b = op == EW_DX ? loadd8(e->b + c) : (sbn_v8d){0};
}

/* Outputs f .. f+7 (first t of them when t < 8: masked loads and store). */
static inline __attribute__((always_inline)) void ew_vec(int op, const ew_args *e, int64_t f, const ew_coef *q,
                                                          int64_t t, int nt)
{
    const sbn_v8d x = t == 8 ? load8(e->x + f) : load8_first(e->x + f, t);
    sbn_v8d v;
    if (op == EW_NORM) {
        v = (x - q->m) * q->k + q->a;
    } else {
        const sbn_v8d g = t == 8 ? load8(e->dy + f) : load8_first(e->dy + f, t);
        v = q->k * (g - q->a - (x - q->m) * q->b);
    }
    if (t == 8)
        put8(e->out + f, &v, nt);
    else
        put8_first(e->out + f, &v, t);
}

static inline __attribute__((always_inline)) void ew_scalar(int op, const ew_args *e, int64_t f, int64_t c)
{
    const double x = e->x[f];
    if (op == EW_NORM)
        e->out[f] = (float)((x - e->m[c]) * e->k[c] + e->a[c]);
    else
        e->out[f] = (float)(e->k[c] * ((double)e->dy[f] - e->a[c] - (x - e->m[c]) * e->b[c]));
}

/* Outputs [f0, f1). lanes == 0: all of channel c (an NCHW row). lanes == 1: channel
 * c at f0, advancing with f and wrapping at C (NHWC). Streaming stores for the whole
 * cache lines of out only, when nt. Returns the channel after f1 (lanes == 1). */
static inline __attribute__((always_inline)) int64_t ew_span(int op, int lanes, const ew_args *args, int64_t f0,
                                                             int64_t f1, int64_t c, int nt)
{
    /* A local copy: the compiler then knows the output stores cannot change the
     * pointers, and keeps them in registers instead of reloading them every step. */
    const ew_args local = *args, *e = &local;
    const int64_t C = e->C;
    ew_coef q;
    if (!lanes)
        ew_coef_row(op, e, c, &q);
    /* [f0, h): ordinary stores up to the first line boundary of out; [h, g): whole
     * lines; [g, f1): the rest. */
    int64_t h = f0, g = f0;
    if (nt) {
        h = f0 + (int64_t)(((64 - ((uintptr_t)(e->out + f0) & 63)) & 63) / sizeof(float));
        h = h < f1 ? h : f1;
        g = h + (f1 - h) / SBN_LINE_FLOATS * SBN_LINE_FLOATS;
    }
    int64_t f = f0;
    for (int part = 0; part < 3; part++) {
        const int64_t end = part == 0 ? h : part == 1 ? g : f1;
        const int stream = part == 1;
        for (; f + 8 <= end; f += 8) {
            if (lanes)
                ew_coef_lanes(op, e, c, &q);
            ew_vec(op, e, f, &q, 8, stream);
            if (lanes)
                c = C >= 8 ? (c + 8 >= C ? c + 8 - C : c + 8) : (c + 8) % C;
        }
        if (SBN_HAVE_MASKED && f < end) {
            if (lanes)
                ew_coef_lanes(op, e, c, &q);
            ew_vec(op, e, f, &q, end - f, 0);
            if (lanes)
                c = (c + (end - f)) % C;
            f = end;
        }
        for (; f < end; f++) {
            ew_scalar(op, e, f, c);
            if (lanes && ++c == C)
                c = 0;
        }
    }
    return c;
}

/* This thread's share [*r0, *r1) of R rows, contiguous (as a static schedule). */
static void thread_rows(int64_t R, int64_t *r0, int64_t *r1)
{
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    *r0 = R / T * t + (t < R % T ? t : R % T);
    *r1 = *r0 + R / T + (t < R % T);
}

/* Whether a pass writes its output with streaming stores (see SBN_NT_MIN_BYTES). */
static int ew_streams(sbn_shape sh)
{
    return SBN_HAVE_NT && sh.n * sh.C * sh.S * (int64_t)sizeof(float) >= SBN_NT_MIN_BYTES;
}

/* This thread's share of a pass. Called inside the parallel region of each public
 * function, so that the region's outlined body sees op as a constant. */
static inline __attribute__((always_inline)) void ew_share(int op, const ew_args *e, sbn_shape sh, int nt)
{
    int64_t r0, r1;
    if (sh.layout == SYNCBN_NCHW && sh.S > 1) { /* S == 1: same memory as NHWC */
        thread_rows(sh.n * sh.C, &r0, &r1);
        for (int64_t r = r0; r < r1; r++)
            ew_span(op, 0, e, r * sh.S, (r + 1) * sh.S, r % sh.C, nt);
    } else {
        thread_rows(sh.n * sh.S, &r0, &r1);
        ew_span(op, 1, e, r0 * sh.C, r1 * sh.C, 0, nt);
    }
    nt_fence(nt);
}

void sbn_normalize(float *y, const float *x, const double *mean, const double *scale, const double *shift,
                   sbn_shape sh)
{
    const ew_args e = {.out = y, .x = x, .m = mean, .k = scale, .a = shift, .C = sh.C};
    const int nt = ew_streams(sh);
#pragma omp parallel if (sh.n * sh.C * sh.S >= SBN_OMP_MIN_WORK)
    ew_share(EW_NORM, &e, sh, nt);
}

void sbn_backward_dx(float *dx, const float *x, const float *dy, const double *mean, const double *k,
                     const double *a, const double *b, sbn_shape sh)
{
    const ew_args e = {.out = dx, .x = x, .dy = dy, .m = mean, .k = k, .a = a, .b = b, .C = sh.C};
    const int nt = ew_streams(sh);
#pragma omp parallel if (sh.n * sh.C * sh.S >= SBN_OMP_MIN_WORK)
    ew_share(EW_DX, &e, sh, nt);
}
