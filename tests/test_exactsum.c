/*
 * test_exactsum.c - Check suite for the exact accumulator (src/exactsum.c), run at
 * 1..4 MPI ranks.
 *
 * Every expected value comes from an INDEPENDENT reference, never from the code under
 * test: (a) __int128 sums of integers times 2^k, converted by the compiler's
 * (correctly rounded) __int128 -> double conversion; (b) a test-local two's-complement
 * big integer fed through frexp, converted by the hardware uint64 -> double conversion
 * with a sticky bit; (c) hand-written literals for ties, windows and specials.
 *
 * `test_exactsum --bench` prints ns/deposit for sbx_add and sbx_add_floats instead.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "exactsum.h"
#include "exactref.h"

#include <check.h>
#include <float.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_rank = 0, g_size = 1;

/* Formats beyond the library's two, to reach the edges of the double range. */
#define FMT_WIDE ((sbx_format){.lsb_exp = -64, .ndigits = 40})   /* [2^-64, 2^1184) */
#define FMT_SUB ((sbx_format){.lsb_exp = -1088, .ndigits = 8})   /* subnormals */
#define FMT_SUBR ((sbx_format){.lsb_exp = -1056, .ndigits = 4})  /* rounds subnormals */
#define FMT_TINY ((sbx_format){.lsb_exp = 0, .ndigits = 2})      /* [1, 2^32) */
#define MAXW 67

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_next(uint64_t *s) /* splitmix64 */
{
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}
static int64_t rng_range(uint64_t *s, int64_t lo, int64_t hi) /* [lo, hi] */
{
    return lo + (int64_t)(rng_next(s) % (uint64_t)(hi - lo + 1));
}
static uint64_t dbits(double x)
{
    uint64_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}
#define ASSERT_SAME(got, want)                                                            \
    ck_assert_msg(dbits(got) == dbits(want), "got %a (%.17g), want %a (%.17g)", (got), (got), \
                  (want), (want))

/* Random double m * 2^q with m < 2^53, q in [qlo, qhi], random sign: a multiple of
 * 2^qlo, below 2^(qhi + 53). */
static double rand_dyadic(uint64_t *s, int qlo, int qhi)
{
    int bits = (int)rng_range(s, 1, 53);
    uint64_t m = rng_next(s) >> (64 - bits);
    double x = ldexp((double)m, (int)rng_range(s, qlo, qhi));
    return (rng_next(s) & 1) ? -x : x;
}

static double sum_with(sbx_format f, const double *v, int64_t n)
{
    int64_t acc[MAXW];
    sbx_zero(acc, f);
    for (int64_t i = 0; i < n; i++) sbx_add(acc, f, v[i]);
    return sbx_round(acc, f);
}

static void shuffle(double *v, int64_t n, uint64_t *s)
{
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = rng_range(s, 0, i);
        double t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

/* The reference big integer: tests/exactref.h. */

static double ref_sum(const double *v, int64_t n)
{
    ref_t r;
    memset(&r, 0, sizeof r);
    for (int64_t i = 0; i < n; i++) ref_add(&r, v[i]);
    return ref_round(&r);
}

/* r += v * 2^exp2 for an __int128 v, through the magnitude's two 64-bit halves. */
static void ref_add_i128(ref_t *r, __int128 v, int exp2)
{
    unsigned __int128 m = (unsigned __int128)v;
    int neg = v < 0;
    if (neg) m = -m;
    ref_add_int(r, (uint64_t)m, neg, exp2 - REF_LSB);
    ref_add_int(r, (uint64_t)(m >> 64), neg, exp2 + 64 - REF_LSB);
}

/* Random __int128 of 1..128 significant bits (the sign included in the count). */
static __int128 rand_i128(uint64_t *s, int maxbits)
{
    int bits = (int)rng_range(s, 1, maxbits);
    unsigned __int128 m = ((unsigned __int128)rng_next(s) << 64) | rng_next(s);
    m >>= 128 - bits;
    switch (rng_next(s) % 4) { /* long runs of ones and zeros: carries across digits */
    case 0: m = bits >= 128 ? ~(unsigned __int128)0 : (((unsigned __int128)1 << bits) - 1); break;
    case 1: m = (unsigned __int128)1 << (bits - 1); break;
    default: break;
    }
    return (__int128)m; /* bits == 128: may be negative (INT128_MIN included) */
}

/* ---------------------------------------------------------------- local tests */

START_TEST(test_zero_and_simple)
{
    int64_t acc[MAXW];
    sbx_zero(acc, SBX_LINEAR);
    ASSERT_SAME(sbx_round(acc, SBX_LINEAR), 0.0);
    sbx_add(acc, SBX_LINEAR, -0.0);
    ASSERT_SAME(sbx_round(acc, SBX_LINEAR), 0.0);
    sbx_add(acc, SBX_LINEAR, 1.5);
    sbx_add(acc, SBX_LINEAR, -2.25);
    ASSERT_SAME(sbx_round(acc, SBX_LINEAR), -0.75);
    sbx_add(acc, SBX_LINEAR, 0.75);
    ASSERT_SAME(sbx_round(acc, SBX_LINEAR), 0.0); /* exact zero is +0 */
    for (int i = 0; i < 10; i++) sbx_add(acc, SBX_LINEAR, 0.1);
    ASSERT_SAME(sbx_round(acc, SBX_LINEAR), 0x1.0000000000000p0); /* 10 * fl(0.1) rounds to 1 */
    for (int i = 0; i < SBX_SPECIALS; i++) ck_assert_int_eq(acc[SBX_LINEAR.ndigits + i], 0);
}
END_TEST

/* Integers times 2^k with k in [kmin, kmin + 60]: the exact sum in units of 2^kmin fits
 * an __int128; converting that is correctly rounded and scaling by 2^kmin is exact. */
static void check_int128(sbx_format f, int kmin, uint64_t seed, int n)
{
    uint64_t s = seed;
    double *v = malloc(sizeof(double) * (size_t)n);
    __int128 S = 0;
    for (int i = 0; i < n; i++) {
        int64_t a = (int64_t)(rng_next(&s) >> 11) - (INT64_C(1) << 52); /* |a| <= 2^52 */
        int k = (int)rng_range(&s, 0, 60);
        if (i % 7 == 0) k = 0; /* plenty of low-order bits */
        v[i] = ldexp((double)a, kmin + k);
        S += (__int128)a * ((__int128)1 << k);
    }
    double want = (double)S * ldexp(1.0, kmin);
    ASSERT_SAME(sum_with(f, v, n), want);
    ASSERT_SAME(ref_sum(v, n), want); /* the two references agree */
    free(v);
}

START_TEST(test_exact_int128)
{
    for (int rep = 0; rep < 20; rep++) {
        check_int128(SBX_LINEAR, -160, 100 + rep, 1 + rep * 200);
        check_int128(SBX_LINEAR, -10, 200 + rep, 1 + rep * 200);
        check_int128(SBX_QUADRATIC, -320, 300 + rep, 1 + rep * 200);
        check_int128(FMT_WIDE, 900, 400 + rep, 1 + rep * 200);
    }
}
END_TEST

/* Wide dynamic range (the whole window at once) against the big-integer reference. */
START_TEST(test_exact_bigint)
{
    struct {
        sbx_format f;
        int qlo, qhi;
    } cases[] = {
        {SBX_LINEAR, -160, 192 - 53},
        {SBX_QUADRATIC, -320, 352 - 53},
        {FMT_WIDE, -64, 1023 - 52},
    };
    uint64_t s = 7;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int rep = 0; rep < 30; rep++) {
            int n = 1 + (int)rng_range(&s, 0, 3000);
            double *v = malloc(sizeof(double) * (size_t)n);
            for (int i = 0; i < n; i++) v[i] = rand_dyadic(&s, cases[c].qlo, cases[c].qhi);
            /* Cancel most large terms so the result lands anywhere in the window. */
            if (rep % 2)
                for (int i = 1; i < n; i += 2)
                    if (rng_next(&s) % 8) v[i] = -v[i - 1];
            ASSERT_SAME(sum_with(cases[c].f, v, n), ref_sum(v, n));
            free(v);
        }
}
END_TEST

/* sbx_add_scaled against the big-integer reference, word for word: random 128-bit
 * values of either sign at every offset of the window (mixed with sbx_add deposits),
 * then the edge of the window, the specials, and agreement with sbx_add. */
START_TEST(test_add_scaled)
{
    const sbx_format fmts[] = {SBX_LINEAR, SBX_QUADRATIC, FMT_WIDE, FMT_TINY};
    uint64_t s = 4242;
    for (size_t c = 0; c < sizeof fmts / sizeof fmts[0]; c++) {
        const sbx_format f = fmts[c];
        const int W = 32 * (f.ndigits - 1);
        for (int rep = 0; rep < 200; rep++) {
            int64_t acc[MAXW], want[MAXW];
            ref_t r;
            memset(&r, 0, sizeof r);
            sbx_zero(acc, f);
            int n = 1 + (int)rng_range(&s, 0, 40);
            for (int i = 0; i < n; i++) {
                __int128 v = rand_i128(&s, W < 128 ? W : 128);
                unsigned __int128 m = v < 0 ? -(unsigned __int128)v : (unsigned __int128)v;
                int len = 0;
                while (len < 128 && (m >> len)) len++;
                int e = f.lsb_exp + (int)rng_range(&s, 0, W - len); /* fits the window */
                if (rng_next(&s) % 4 == 0) /* the lowest digits, every bit offset */
                    e = f.lsb_exp + (int)rng_range(&s, 0, W - len < 31 ? W - len : 31);
                sbx_add_scaled(acc, f, v, e);
                ref_add_i128(&r, v, e);
                if (i % 3 == 0 && W >= 53) { /* interleave ordinary deposits */
                    int qhi = f.lsb_exp + W - 53 - 2 < 1023 - 52 ? f.lsb_exp + W - 53 - 2 : 1023 - 52;
                    double x = rand_dyadic(&s, f.lsb_exp, qhi);
                    sbx_add(acc, f, x);
                    ref_add(&r, x);
                }
            }
            sbx_normalize(acc, f);
            ref_words(&r, f, want);
            for (int i = 0; i < f.ndigits; i++)
                ck_assert_msg(acc[i] == want[i], "fmt %zu rep %d digit %d: %lld != %lld", c, rep, i,
                              (long long)acc[i], (long long)want[i]);
            for (int i = 0; i < SBX_SPECIALS; i++) ck_assert_int_eq(acc[f.ndigits + i], 0);
        }
    }

    /* The window's edge: magnitudes below 2^W (in lsb units) fit, 2^W and above count
     * as +-Inf, as sbx_add counts a double of 2^(lsb + W). */
    const sbx_format f = SBX_LINEAR;
    const int W = 32 * (f.ndigits - 1);
    int64_t acc[MAXW], ref[MAXW];
    __int128 top = ((__int128)1 << 100) - 1;
    sbx_zero(acc, f);
    sbx_add_scaled(acc, f, top, f.lsb_exp + W - 100);  /* all ones up to the last bit */
    sbx_add_scaled(acc, f, -top, f.lsb_exp + W - 100); /* and back to zero, exactly */
    sbx_add_scaled(acc, f, 0, f.lsb_exp + 100000);     /* zero: nothing, wherever */
    sbx_normalize(acc, f);
    for (int i = 0; i < (int)sbx_words(f); i++) ck_assert_int_eq(acc[i], 0);
    sbx_add_scaled(acc, f, top + 1, f.lsb_exp + W - 100);
    sbx_add_scaled(acc, f, -(top + 1), f.lsb_exp + W - 100);
    sbx_add_scaled(acc, f, -(top + 1), f.lsb_exp + W - 100);
    sbx_add_scaled(acc, f, 1, f.lsb_exp + W);
    sbx_add_scaled(acc, f, -(__int128)((~(unsigned __int128)0) >> 1) - 1, f.lsb_exp); /* INT128_MIN: fits */
    sbx_zero(ref, f);
    sbx_add(ref, f, ldexp(1.0, f.lsb_exp + W));
    sbx_add(ref, f, -ldexp(1.0, f.lsb_exp + W));
    sbx_add(ref, f, -ldexp(1.0, f.lsb_exp + W));
    sbx_add(ref, f, ldexp(1.0, f.lsb_exp + W));
    sbx_add(ref, f, -ldexp(1.0, f.lsb_exp + 127));
    sbx_normalize(acc, f);
    sbx_normalize(ref, f);
    for (int i = 0; i < (int)sbx_words(f); i++) ck_assert_int_eq(acc[i], ref[i]);
    ck_assert_int_eq(acc[f.ndigits + 1], 2); /* +Inf */
    ck_assert_int_eq(acc[f.ndigits + 2], 2); /* -Inf */

    /* Same words as sbx_add for every double that needs no rounding. */
    for (int rep = 0; rep < 2000; rep++) {
        int64_t a[MAXW], b[MAXW];
        sbx_zero(a, f), sbx_zero(b, f);
        int64_t m = (int64_t)(rng_next(&s) >> 11) - (INT64_C(1) << 52);
        int e = f.lsb_exp + (int)rng_range(&s, 0, W + 10);
        sbx_add_scaled(a, f, m, e);
        sbx_add(b, f, ldexp((double)m, e));
        sbx_normalize(a, f), sbx_normalize(b, f);
        ck_assert_msg(!memcmp(a, b, sizeof(int64_t) * (size_t)sbx_words(f)), "m %lld e %d", (long long)m, e);
    }
}
END_TEST

START_TEST(test_cancellation)
{
    double a[] = {1e300, 1.0, -1e300};
    ASSERT_SAME(sum_with(FMT_WIDE, a, 3), 1.0);
    double b[] = {1e300, 0x1p-60, -1e300};
    ASSERT_SAME(sum_with(FMT_WIDE, b, 3), 0x1p-60);
    double c[] = {1e300, 1e300, 3.5, -1e300, -1e300, -3.0};
    ASSERT_SAME(sum_with(FMT_WIDE, c, 6), 0.5);
    double d[] = {0x1p190, 0x1p-160, -0x1p190};
    ASSERT_SAME(sum_with(SBX_LINEAR, d, 3), 0x1p-160);
    double e[] = {0x1p350, -0x1p-320, -0x1p350};
    ASSERT_SAME(sum_with(SBX_QUADRATIC, e, 3), -0x1p-320);

    /* Many tiny values between huge ones that cancel. */
    uint64_t s = 11;
    int n = 5001;
    double *v = malloc(sizeof(double) * (size_t)n);
    v[0] = 1e300;
    for (int i = 1; i < n - 1; i++) v[i] = rand_dyadic(&s, -64, -20);
    v[n - 1] = -1e300;
    double want = ref_sum(v + 1, n - 2);
    ck_assert(want != 0);
    ASSERT_SAME(sum_with(FMT_WIDE, v, n), want);
    shuffle(v, n, &s);
    ASSERT_SAME(sum_with(FMT_WIDE, v, n), want);
    free(v);
}
END_TEST

/* Exactly halfway cases round to even, in both directions and both signs; one bit of
 * sticky far below decides otherwise. */
START_TEST(test_ties)
{
    sbx_format f = SBX_LINEAR;
    struct {
        double a, b, c, want;
    } t[] = {
        {1.0, 0x1p-53, 0, 1.0},                                      /* tie, even below */
        {1.0, 0x1p-53, 0x1p-150, 0x1.0000000000001p0},               /* above the tie */
        {1.0, 0x1p-53, -0x1p-150, 1.0},                              /* below the tie */
        {0x1.0000000000001p0, 0x1p-53, 0, 0x1.0000000000002p0},      /* tie, odd: up */
        {1.0, 0x1.8p-52, 0, 0x1.0000000000002p0},                    /* 1.5 ulp: up to even */
        {-1.0, -0x1p-53, 0, -1.0},                                   /* negative tie */
        {-0x1.0000000000001p0, -0x1p-53, 0, -0x1.0000000000002p0},   /* negative, odd */
        {-1.0, -0x1p-53, -0x1p-160, -0x1.0000000000001p0},           /* lsb as sticky */
        {0x1p100, 0x1p47, 0, 0x1p100},                               /* tie at a digit edge */
        {0x1p100, 0x1p47, 0x1p-100, 0x1.0000000000001p100},
        {0x1p100, 0x1.8p48, 0, 0x1.0000000000002p100},
        {0x1p100, -0x1p46, 0, 0x1p100},                              /* tie below 2^100 */
        {0x1p100, -0x1p46, -0x1p-160, 0x1.fffffffffffffp99},
        {0x1p64, 0x1p11, 0, 0x1p64},                                 /* round bit = bit 32k-1 */
        {0x1p64, 0x1p11, 0x1p-31, 0x1.0000000000001p64},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        double v[3] = {t[i].a, t[i].b, t[i].c};
        ASSERT_SAME(sum_with(f, v, 3), t[i].want);
        double w[3] = {t[i].c, t[i].b, t[i].a};
        ASSERT_SAME(sum_with(f, w, 3), t[i].want);
        ASSERT_SAME(ref_sum(v, 3), t[i].want); /* sanity of the reference */
    }
    /* Random ties: x (53 bits) plus half its ulp, with or without a low sticky. */
    uint64_t s = 5;
    for (int r = 0; r < 2000; r++) {
        double x = rand_dyadic(&s, -100, 100);
        if (x == 0) continue;
        int ex;
        frexp(x, &ex);
        double half = copysign(ldexp(1.0, ex - 54), x); /* half an ulp of x */
        double sticky = (r & 1) ? copysign(0x1p-160, (r & 2) ? x : -x) : 0;
        double v[3] = {x, half, sticky};
        double want = ref_sum(v, 3);
        ASSERT_SAME(sum_with(f, v, 3), want);
        /* Independent check of the tie rule itself. */
        if (sticky == 0) {
            uint64_t b = dbits(x);
            ASSERT_SAME(want, (b & 1) ? nextafter(x, 2 * x) : x);
        }
    }
}
END_TEST

START_TEST(test_subnormal_results)
{
    sbx_format f = FMT_SUB;
    double a[] = {0x1p-1000, 0x1p-1074, -0x1p-1000};
    ASSERT_SAME(sum_with(f, a, 3), 0x1p-1074);
    double b[] = {0x1.0000000000001p-1022, -0x1p-1022};
    ASSERT_SAME(sum_with(f, b, 2), 0x1p-1074);
    double c[] = {-0x1p-1022, 0x1p-1074};
    ASSERT_SAME(sum_with(f, c, 2), -0x0.fffffffffffffp-1022);
    double d[] = {0x0.fffffffffffffp-1022, 0x1p-1074};
    ASSERT_SAME(sum_with(f, d, 2), 0x1p-1022); /* subnormal + subnormal = normal */

    /* Random denormal inputs (and some normals): multiples of 2^-1074, exact sums. */
    uint64_t s = 17;
    for (int rep = 0; rep < 50; rep++) {
        int n = 1 + (int)rng_range(&s, 0, 1000);
        double *v = malloc(sizeof(double) * (size_t)n);
        __int128 S = 0;
        for (int i = 0; i < n; i++) {
            int64_t m = (int64_t)(rng_next(&s) >> (rep % 2 ? 12 : 40));
            if (rng_next(&s) & 1) m = -m;
            int k = (rep % 3 == 0) ? (int)rng_range(&s, 0, 40) : 0;
            v[i] = ldexp((double)m, -1074 + k); /* denormal when k == 0 and |m| < 2^52 */
            S += (__int128)m * ((__int128)1 << k);
        }
        ASSERT_SAME(sum_with(f, v, n), (double)S * 0x1p-1074);
        free(v);
    }
}
END_TEST

START_TEST(test_overflow)
{
    sbx_format f = FMT_WIDE;
    double a[] = {DBL_MAX, DBL_MAX};
    ASSERT_SAME(sum_with(f, a, 2), INFINITY);
    double b[] = {-DBL_MAX, -DBL_MAX};
    ASSERT_SAME(sum_with(f, b, 2), -INFINITY);
    double c[] = {DBL_MAX, 0x1p970}; /* exactly half an ulp, DBL_MAX odd: up to Inf */
    ASSERT_SAME(sum_with(f, c, 2), INFINITY);
    double d[] = {DBL_MAX, 0x1.fffffffffffffp969}; /* just below half an ulp */
    ASSERT_SAME(sum_with(f, d, 2), DBL_MAX);
    double e[] = {-DBL_MAX, -0x1p970, 0x1p-64};
    ASSERT_SAME(sum_with(f, e, 3), -DBL_MAX);
    double g[] = {DBL_MAX, DBL_MAX, -DBL_MAX}; /* overflowing intermediate is harmless */
    ASSERT_SAME(sum_with(f, g, 3), DBL_MAX);
    double h[] = {0x1p1023, 0x1p1023, 0x1p1023, -0x1p1023, -0x1p1023, 0x1p-60};
    ASSERT_SAME(sum_with(f, h, 6), 0x1p1023);
    int64_t acc[MAXW];
    sbx_zero(acc, f);
    for (int i = 0; i < 1000; i++) sbx_add(acc, f, DBL_MAX);
    ASSERT_SAME(sbx_round(acc, f), INFINITY);
    for (int i = 0; i < 1000; i++) sbx_add(acc, f, -DBL_MAX);
    ASSERT_SAME(sbx_round(acc, f), 0.0);
    for (int i = 0; i < 3; i++) ck_assert_int_eq(acc[f.ndigits + i], 0); /* not specials */
}
END_TEST

START_TEST(test_specials)
{
    sbx_format f = SBX_LINEAR;
    int nd = f.ndigits;
    int64_t acc[MAXW];
    sbx_zero(acc, f);
    sbx_add(acc, f, 1.0);
    sbx_add(acc, f, INFINITY);
    ASSERT_SAME(sbx_round(acc, f), INFINITY);
    sbx_add(acc, f, INFINITY);
    ck_assert_int_eq(acc[nd + 1], 2);
    sbx_add(acc, f, -INFINITY);
    ck_assert_int_eq(acc[nd + 2], 1);
    ck_assert(isnan(sbx_round(acc, f)));

    sbx_zero(acc, f);
    sbx_add(acc, f, -INFINITY);
    ASSERT_SAME(sbx_round(acc, f), -INFINITY);
    sbx_add(acc, f, NAN);
    sbx_add(acc, f, -NAN);
    ck_assert_int_eq(acc[nd], 2);
    ck_assert(isnan(sbx_round(acc, f)));

    /* Out of window: rounded magnitude >= 2^192 for SBX_LINEAR counts as +-Inf. */
    sbx_zero(acc, f);
    sbx_add(acc, f, 0x1.fffffffffffffp191);
    ASSERT_SAME(sbx_round(acc, f), 0x1.fffffffffffffp191);
    sbx_add(acc, f, -0x1.fffffffffffffp191);
    sbx_add(acc, f, 0x1p192);
    ck_assert_int_eq(acc[nd + 1], 1);
    ASSERT_SAME(sbx_round(acc, f), INFINITY);
    sbx_zero(acc, f);
    sbx_add(acc, f, -1e300);
    sbx_add(acc, f, -DBL_MAX);
    ck_assert_int_eq(acc[nd + 2], 2);
    ASSERT_SAME(sbx_round(acc, f), -INFINITY);
    float big[2] = {0x1p127f, -0x1.fffffep127f}; /* all floats are in SBX_LINEAR's window */
    sbx_zero(acc, f);
    sbx_add_floats(acc, f, big, 2);
    ASSERT_SAME(sbx_round(acc, f), -0x1.fffffcp126);

    /* Special counts travel through sbx_merge. */
    int64_t b[MAXW];
    sbx_zero(acc, f);
    sbx_zero(b, f);
    sbx_add(acc, f, INFINITY);
    sbx_add(b, f, 2.0);
    sbx_merge(acc, b, f);
    ck_assert_int_eq(acc[nd + 1], 1);
    ASSERT_SAME(sbx_round(acc, f), INFINITY);
    sbx_zero(b, f);
    sbx_add(b, f, -INFINITY);
    sbx_add(b, f, NAN);
    sbx_merge(acc, b, f);
    ck_assert_int_eq(acc[nd + 0], 1);
    ck_assert_int_eq(acc[nd + 1], 1);
    ck_assert_int_eq(acc[nd + 2], 1);
    ck_assert(isnan(sbx_round(acc, f)));

    /* Rounding pushes a value out of the window: 2^32 - 0.5 -> 2^32 (tie to even). */
    sbx_format t = FMT_TINY;
    sbx_zero(acc, t);
    sbx_add(acc, t, 4294967294.5); /* -> 4294967294, fits */
    ASSERT_SAME(sbx_round(acc, t), 4294967294.0);
    sbx_add(acc, t, -4294967295.5); /* -> -4294967296, out */
    ck_assert_int_eq(acc[t.ndigits + 2], 1);
    ck_assert_int_eq(acc[t.ndigits + 1], 0);
    ASSERT_SAME(sbx_round(acc, t), -INFINITY);
}
END_TEST

/* Deposits are rounded to a multiple of 2^lsb_exp, to nearest, ties to even. */
START_TEST(test_deposit_rounding)
{
    sbx_format f = SBX_LINEAR; /* unit u = 2^-160 */
    struct {
        double in, want;
    } t[] = {
        {0x1p-161, 0},                       /* 0.5 u -> 0 (even) */
        {0x1.0000000000001p-161, 0x1p-160},  /* just above half */
        {0x1.8p-161, 0x1p-160},              /* 0.75 u */
        {0x1.8p-160, 0x1p-159},              /* 1.5 u -> 2 u */
        {0x1.4p-159, 0x1p-159},              /* 2.5 u -> 2 u */
        {0x1.cp-159, 0x1p-158},              /* 3.5 u -> 4 u */
        {-0x1.8p-160, -0x1p-159},
        {-0x1.4p-159, -0x1p-159},
        {0x1p-200, 0},
        {0x1p-1074, 0},                      /* denormals vanish in this window */
        {-0x0.fffffffffffffp-1022, 0},
        {0x1.0000000000001p-108, 0x1.0000000000001p-108}, /* ulp = u: exact */
        {0x1.0000000000001p-109, 0x1p-109},  /* 53-bit value, half u below: tie */
        {0x1.0000000000003p-109, 0x1.0000000000004p-109},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        ASSERT_SAME(sum_with(f, &t[i].in, 1), t[i].want);
        double pair[2] = {t[i].in, 1.0}; /* rounding is per deposit, not of the sum */
        double w[2] = {t[i].want, 1.0};
        ASSERT_SAME(sum_with(f, pair, 2), ref_sum(w, 2));
    }
    /* Denormal inputs in a window that ends above 2^-1074: u = 2^-1056. */
    sbx_format g = FMT_SUBR;
    struct {
        double in, want;
    } d[] = {
        {0x1p-1057, 0}, {0x1.8p-1057, 0x1p-1056}, {0x1.8p-1056, 0x1p-1055},
        {0x1p-1074, 0}, {-0x1.4p-1055, -0x1p-1055}, {0x1.000008p-1050, 0x1p-1050},
    };
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) ASSERT_SAME(sum_with(g, &d[i].in, 1), d[i].want);
    /* Many sub-unit deposits do not add up: rounding is a function of the value. */
    int64_t acc[MAXW];
    sbx_zero(acc, f);
    for (int i = 0; i < 1000; i++) sbx_add(acc, f, 0x1p-161);
    ASSERT_SAME(sbx_round(acc, f), 0.0);
}
END_TEST

START_TEST(test_float_denormals)
{
    uint64_t s = 23;
    for (int rep = 0; rep < 50; rep++) {
        int n = 1 + (int)rng_range(&s, 0, 2000);
        float *v = malloc(sizeof(float) * (size_t)n);
        __int128 S = 0;
        for (int i = 0; i < n; i++) {
            int32_t m = (int32_t)(rng_next(&s) >> 41); /* < 2^23: denormal */
            int k = (rep % 2) ? (int)rng_range(&s, 0, 60) : 0;
            if (rng_next(&s) & 1) m = -m;
            v[i] = (float)ldexp((double)m, -149 + k);
            S += (__int128)m * ((__int128)1 << k);
        }
        double want = (double)S * 0x1p-149;
        int64_t a[MAXW], b[MAXW];
        sbx_zero(a, SBX_LINEAR);
        sbx_zero(b, SBX_LINEAR);
        sbx_add_floats(a, SBX_LINEAR, v, n);
        for (int i = 0; i < n; i++) sbx_add(b, SBX_LINEAR, v[i]);
        ASSERT_SAME(sbx_round(a, SBX_LINEAR), want);
        ASSERT_SAME(sbx_round(b, SBX_LINEAR), want);
        free(v);
    }
}
END_TEST

/* Mixed magnitudes, including values that get rounded on deposit. */
static double mixed_value(uint64_t *s)
{
    switch (rng_next(s) % 4) {
    case 0: return rand_dyadic(s, -220, 100);
    case 1: return (double)(float)rand_dyadic(s, -149, 60);
    case 2: return (double)rng_range(s, -1000, 1000) * 0.1;
    default: return ldexp((double)(rng_next(s) >> 11), (int)rng_range(s, -170, 80)) * ((rng_next(s) & 1) ? 1 : -1);
    }
}

START_TEST(test_order_independence)
{
    sbx_format fs[2] = {SBX_LINEAR, SBX_QUADRATIC};
    uint64_t s = 31;
    for (int fi = 0; fi < 2; fi++) {
        sbx_format f = fs[fi];
        int64_t w = sbx_words(f);
        int n = 20000;
        double *v = malloc(sizeof(double) * (size_t)n);
        for (int i = 0; i < n; i++) v[i] = mixed_value(&s);
        int64_t base[MAXW];
        sbx_zero(base, f);
        for (int i = 0; i < n; i++) sbx_add(base, f, v[i]);
        sbx_normalize(base, f);
        double want = sbx_round(base, f);
        for (int rep = 0; rep < 6; rep++) {
            shuffle(v, n, &s);
            int k = 1 + rep; /* regroup into k accumulators, merged in scrambled order */
            int64_t(*accs)[MAXW] = malloc(sizeof *accs * (size_t)k);
            for (int j = 0; j < k; j++) sbx_zero(accs[j], f);
            for (int i = 0; i < n; i++) sbx_add(accs[rng_range(&s, 0, k - 1)], f, v[i]);
            for (int j = k - 1; j > 0; j--) {
                sbx_normalize(accs[j], f);
                sbx_normalize(accs[j - 1], f);
                sbx_merge(accs[j - 1], accs[j], f);
            }
            sbx_normalize(accs[0], f);
            ck_assert(memcmp(accs[0], base, sizeof(int64_t) * (size_t)w) == 0);
            ASSERT_SAME(sbx_round(accs[0], f), want);
            free(accs);
        }
        free(v);
    }
}
END_TEST

START_TEST(test_add_floats_equals_add)
{
    sbx_format fs[] = {SBX_LINEAR, SBX_QUADRATIC, {.lsb_exp = -128, .ndigits = 6},
                       {.lsb_exp = -192, .ndigits = 4}, FMT_TINY};
    uint64_t s = 41;
    int n = 50000;
    float *v = malloc(sizeof(float) * (size_t)n);
    for (size_t fi = 0; fi < sizeof fs / sizeof fs[0]; fi++) {
        for (int i = 0; i < n; i++) {
            uint32_t b = (uint32_t)rng_next(&s); /* every class: NaN, Inf, denormal, ... */
            if (i % 3 == 0) b = (b & 0x807FFFFFu) | ((uint32_t)rng_range(&s, 90, 160) << 23);
            memcpy(&v[i], &b, sizeof b);
        }
        sbx_format f = fs[fi];
        int64_t a[MAXW], b[MAXW];
        sbx_zero(a, f);
        sbx_zero(b, f);
        sbx_add_floats(a, f, v, n);
        for (int i = 0; i < n; i++) sbx_add(b, f, (double)v[i]);
        sbx_normalize(a, f);
        sbx_normalize(b, f);
        ck_assert_msg(memcmp(a, b, sizeof(int64_t) * (size_t)sbx_words(f)) == 0, "format %zu", fi);
        ck_assert_int_gt(a[f.ndigits] + a[f.ndigits + 1] + a[f.ndigits + 2], 0);
        /* Short arrays (direct path) and odd lengths, appended piecewise. */
        int64_t lens[] = {0, 1, 7, 1000, 2047, 2048, 2049, 4097};
        int64_t off = 0;
        sbx_zero(a, f);
        sbx_zero(b, f);
        for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++) {
            sbx_add_floats(a, f, v + off, lens[j]);
            for (int64_t i = off; i < off + lens[j]; i++) sbx_add(b, f, (double)v[i]);
            off += lens[j];
        }
        sbx_normalize(a, f);
        sbx_normalize(b, f);
        ck_assert_msg(memcmp(a, b, sizeof(int64_t) * (size_t)sbx_words(f)) == 0, "format %zu (pieces)", fi);
    }
    free(v);
}
END_TEST

/* Long runs of the largest floats of one exponent: a per-exponent bin grows far past
 * 2^32 before it is folded into the digits. Exact expected values by construction. */
START_TEST(test_add_floats_large_bins)
{
    sbx_format f = SBX_LINEAR;
    int n = 1 << 20;
    float *v = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) v[i] = 0x1.fffffep127f;
    int64_t a[MAXW];
    sbx_zero(a, f);
    sbx_add_floats(a, f, v, n);
    ASSERT_SAME(sbx_round(a, f), 0x1.fffffep147); /* 2^20 * (2^24 - 1) * 2^104 */
    for (int i = 0; i < n; i++) v[i] = (i % 3 == 0) ? -0x1.fffffep127f : 0x1.fffffep-126f;
    sbx_add_floats(a, f, v, n);
    /* 349526 negatives cancel part of the first run; 699050 small positives remain. */
    double want[3] = {0x1.fffffep147, -349526.0 * 0x1.fffffep127, 699050.0 * 0x1.fffffep-126};
    ASSERT_SAME(sbx_round(a, f), ref_sum(want, 3));
    for (int i = 0; i < n; i++) v[i] = -0x1p-149f; /* denormal bin */
    sbx_zero(a, f);
    sbx_add_floats(a, f, v, n);
    ASSERT_SAME(sbx_round(a, f), -0x1p-129);
    free(v);
}
END_TEST

/* 2^30 deposits of a value whose middle digit is 0xFFFFFFFF, normalize, 2^30 more
 * of its negative: the documented limit must hold exactly. It is a local property
 * and takes seconds, so only the 1-rank run does it (other ranks would spin in MPI).
 * SYNCBN_TEST_QUICK=1 (for valgrind-style runs) shrinks it to 2^20 + 2^20 deposits. */
START_TEST(test_normalize_contract)
{
    if (g_size != 1) return;
    const char *quick = getenv("SYNCBN_TEST_QUICK");
    int lg = (quick && *quick && strcmp(quick, "0") != 0) ? 20 : 30;
    sbx_format f = SBX_LINEAR;
    double x = 0x1.fffffffffffffp-60; /* (2^53-1) * 2^-112: digits 1..3, digit 2 all ones */
    int64_t a[MAXW];
    sbx_zero(a, f);
    const int64_t N = INT64_C(1) << lg;
    for (int64_t i = 0; i < N; i++) sbx_add(a, f, x);
    ck_assert_int_eq(a[2], N * (int64_t)UINT32_MAX);
    ASSERT_SAME(sbx_round(a, f), ldexp(x, lg));
    sbx_normalize(a, f);
    ASSERT_SAME(sbx_round(a, f), ldexp(x, lg));
    for (int64_t i = 0; i < N; i++) sbx_add(a, f, -x);
    ck_assert_int_eq(a[f.ndigits], 0);
    ASSERT_SAME(sbx_round(a, f), 0.0);
    sbx_normalize(a, f);
    for (int i = 0; i < f.ndigits; i++) ck_assert_int_eq(a[i], 0);
}
END_TEST

/* sbx_round on hand-made words (the layout is part of the contract): sparse random
 * digits with patterns that put round and sticky bits at and across digit edges,
 * unnormalized words included, against the big-integer reference. */
START_TEST(test_round_random_words)
{
    sbx_format fs[3] = {SBX_LINEAR, SBX_QUADRATIC, FMT_WIDE};
    const uint32_t pat[6] = {0, 1, 0x80000000u, 0xFFFFFFFFu, 0x7FFFFFFFu, 0x00200000u};
    uint64_t s = 61;
    for (int fi = 0; fi < 3; fi++) {
        sbx_format f = fs[fi];
        for (int rep = 0; rep < 20000; rep++) {
            int64_t a[MAXW];
            sbx_zero(a, f);
            ref_t r;
            memset(&r, 0, sizeof r);
            int top = (int)rng_range(&s, 0, f.ndigits - 1), nz = (int)rng_range(&s, 1, 5);
            for (int j = 0; j < nz; j++) {
                int i = (int)rng_range(&s, top > 3 ? top - 3 : 0, top);
                if (rng_next(&s) % 4 == 0) i = (int)rng_range(&s, 0, top);
                int64_t w = (rng_next(&s) & 1) ? (int64_t)pat[rng_next(&s) % 6] : (int64_t)(uint32_t)rng_next(&s);
                if (rep % 3 == 0) w = (int64_t)(rng_next(&s) >> 4) - (INT64_C(1) << 59); /* unnormalized */
                if (i == f.ndigits - 1 && (rng_next(&s) & 1)) w = -w;
                a[i] += w;
                ref_add_int(&r, w < 0 ? 0 - (uint64_t)w : (uint64_t)w, w < 0, f.lsb_exp + 32 * i - REF_LSB);
            }
            ASSERT_SAME(sbx_round(a, f), ref_round(&r));
        }
    }
}
END_TEST

START_TEST(test_round_unnormalized_const)
{
    uint64_t s = 53;
    sbx_format f = SBX_QUADRATIC;
    int64_t a[MAXW], c[MAXW];
    sbx_zero(a, f);
    for (int i = 0; i < 5000; i++) sbx_add(a, f, -fabs(mixed_value(&s)));
    memcpy(c, a, sizeof a);
    double r1 = sbx_round(a, f);
    ck_assert(memcmp(a, c, sizeof a) == 0); /* const: untouched */
    sbx_normalize(a, f);
    ck_assert_int_lt(a[f.ndigits - 1], 0); /* the sign lives in the top digit */
    for (int i = 0; i < f.ndigits - 1; i++) ck_assert(a[i] >= 0 && a[i] <= (int64_t)UINT32_MAX);
    ASSERT_SAME(sbx_round(a, f), r1);
    ck_assert(r1 < 0);
}
END_TEST

/* ---------------------------------------------------------------- MPI tests */

/* The global multiset is the same on every rank; each element goes to one rank, by a
 * rule that depends on the rank count; with 3+ ranks the last rank gets nothing. */
static int owner_of(uint64_t i, int size)
{
    if (size == 1) return 0;
    int usable = size >= 3 ? size - 1 : size;
    uint64_t h = i * UINT64_C(0x9E3779B97F4A7C15) + (uint64_t)size * 1000003u;
    h ^= h >> 29;
    return (int)(h % (uint64_t)usable);
}

START_TEST(test_mpi_allreduce)
{
    enum { NACC = 3 };
    sbx_format fs[2] = {SBX_LINEAR, SBX_QUADRATIC};
    for (int fi = 0; fi < 2; fi++) {
        sbx_format f = fs[fi];
        int64_t w = sbx_words(f);
        int64_t accs[NACC * MAXW];
        for (int c = 0; c < NACC; c++) sbx_zero(accs + c * w, f);
        double want[NACC];
        for (int c = 0; c < NACC; c++) {
            int n = 3000 + 1000 * c;
            double *v = malloc(sizeof(double) * (size_t)n);
            uint64_t s = 1000 + (uint64_t)c; /* same on every rank */
            int qlo = f.lsb_exp, qhi = f.lsb_exp + 32 * (f.ndigits - 1) - 53;
            for (int i = 0; i < n; i++) v[i] = rand_dyadic(&s, qlo, qhi);
            if (c == 1) /* heavy cancellation, result small */
                for (int i = 1; i < n; i += 2) v[i] = -v[i - 1] * (i % 10 == 1 ? 1 + 0x1p-52 : 1);
            if (c == 2) /* negative total: signed top digits summed over ranks */
                for (int i = 0; i < n; i++) v[i] = -fabs(v[i]);
            want[c] = ref_sum(v, n);
            /* My share (owner is by index), deposited in a rank-dependent order. */
            uint64_t ps = 77 + (uint64_t)g_rank;
            int64_t *idx = malloc(sizeof(int64_t) * (size_t)n);
            int m = 0;
            for (int i = 0; i < n; i++)
                if (owner_of((uint64_t)i, g_size) == g_rank) idx[m++] = i;
            for (int i = m - 1; i > 0; i--) {
                int64_t j = rng_range(&ps, 0, i), t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
            }
            for (int i = 0; i < m; i++) sbx_add(accs + c * w, f, v[idx[i]]);
            free(idx);
            free(v);
        }
        ck_assert_int_eq(sbx_allreduce(accs, NACC, f, MPI_COMM_WORLD), MPI_SUCCESS);
        for (int c = 0; c < NACC; c++) {
            ASSERT_SAME(sbx_round(accs + c * w, f), want[c]);
            for (int i = 0; i < f.ndigits - 1; i++)
                ck_assert(accs[c * w + i] >= 0 && accs[c * w + i] <= (int64_t)UINT32_MAX);
        }
        ck_assert(want[1] != 0 && fabs(want[1]) < fabs(want[0]));
        ck_assert(want[2] < 0);
    }
}
END_TEST

/* Every rank deposits values with all-ones digits: the summed low digits approach
 * P * 2^32 and must carry correctly. Plus specials summed over ranks. */
START_TEST(test_mpi_carries_and_specials)
{
    sbx_format f = SBX_LINEAR;
    int64_t w = sbx_words(f);
    int64_t accs[2 * MAXW];
    sbx_zero(accs, f);
    sbx_zero(accs + w, f);
    double x = 0x1.fffffffffffffp-60;
    for (int i = 0; i < 1000; i++) sbx_add(accs, f, x);
    sbx_add(accs, f, 0x1p-160);
    if (g_rank == 0) sbx_add(accs + w, f, INFINITY);
    if (g_rank == g_size - 1) sbx_add(accs + w, f, -INFINITY);
    sbx_add(accs + w, f, 1.0);
    ck_assert_int_eq(sbx_allreduce(accs, 2, f, MPI_COMM_WORLD), MPI_SUCCESS);
    /* Independent reference: the same multiset through the big integer. */
    ref_t r;
    memset(&r, 0, sizeof r);
    for (int p = 0; p < g_size; p++) {
        for (int i = 0; i < 1000; i++) ref_add(&r, x);
        ref_add(&r, 0x1p-160);
    }
    ASSERT_SAME(sbx_round(accs, f), ref_round(&r));
    ck_assert_int_eq(accs[w + f.ndigits + 1], 1);
    ck_assert_int_eq(accs[w + f.ndigits + 2], 1);
    ck_assert(isnan(sbx_round(accs + w, f)));
    /* count = 0 is a valid (empty) collective. */
    ck_assert_int_eq(sbx_allreduce(accs, 0, f, MPI_COMM_WORLD), MPI_SUCCESS);
}
END_TEST

/* ------------------------------------------------------------ the wire format */

/* Merges R packed elements three ways (left to right, right to left, as a balanced
 * tree: the shapes MPI's reduction algorithms take) and a fourth in a random order;
 * all four must be the same words. Returns the merged element in out. */
static void wire_merge_all(const int64_t *el, int R, uint64_t seed, int64_t *out)
{
    enum { E = SBX_WIRE_WORDS };
    int one = 1;
    int64_t *t = malloc(sizeof(int64_t) * (size_t)(R * E));
    int64_t a[E], b[E], r[E];
    memcpy(a, el, sizeof a);
    for (int i = 1; i < R; i++) sbx_wire_op((void *)(el + i * E), a, &one, NULL);
    memcpy(b, el + (R - 1) * E, sizeof b);
    for (int i = R - 2; i >= 0; i--) sbx_wire_op((void *)(el + i * E), b, &one, NULL);
    memcpy(t, el, sizeof(int64_t) * (size_t)(R * E));
    for (int w = 1; w < R; w *= 2) /* tree: t[i] += t[i + w] */
        for (int i = 0; i + w < R; i += 2 * w) sbx_wire_op(t + (i + w) * E, t + i * E, &one, NULL);
    int *perm = malloc(sizeof(int) * (size_t)R);
    for (int i = 0; i < R; i++) perm[i] = i;
    for (int i = R - 1; i > 0; i--) {
        int j = (int)rng_range(&seed, 0, i), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
    memcpy(r, el + perm[0] * E, sizeof r);
    for (int i = 1; i < R; i++) sbx_wire_op((void *)(el + perm[i] * E), r, &one, NULL);
    ck_assert_msg(memcmp(a, b, sizeof a) == 0 && memcmp(a, t, sizeof a) == 0 && memcmp(a, r, sizeof a) == 0,
                  "merge order changed the element");
    memcpy(out, a, sizeof a);
    free(t), free(perm);
}

/* R accumulators (normalized): packs them, merges, and checks that the merged element
 * holds exactly their sum (the normalized words of sbx_merge over all of them), or is
 * SBX_WIRE_OVER when want_over. Returns the rounded sum. */
static double wire_check(const int64_t *accs, int R, sbx_format f, int want_over, uint64_t seed)
{
    const int64_t w = sbx_words(f);
    int64_t *el = malloc(sizeof(int64_t) * (size_t)(R * SBX_WIRE_WORDS));
    int64_t full[MAXW], got[MAXW], m[SBX_WIRE_WORDS];
    sbx_zero(full, f);
    int over = 0;
    for (int i = 0; i < R; i++) {
        over |= sbx_wire_pack(el + i * SBX_WIRE_WORDS, accs + i * w, f) != 0;
        sbx_merge(full, accs + i * w, f);
    }
    wire_merge_all(el, R, seed, m);
    const int rc = sbx_wire_unpack(got, m, f);
    if (over) ck_assert_int_eq(m[0], SBX_WIRE_OVER); /* one rank over: all over */
    ck_assert_msg((rc != 0) == (want_over != 0), "element %s, want %s", rc ? "over" : "exact",
                  want_over ? "over" : "exact");
    free(el);
    if (rc) return NAN;
    sbx_normalize(got, f);
    for (int k = 0; k < SBX_SPECIALS; k++) full[f.ndigits + k] = 0; /* counters travel apart */
    for (int i = 0; i < w; i++) ck_assert_msg(got[i] == full[i], "word %d: %lld, want %lld", i, (long long)got[i],
                                              (long long)full[i]);
    return sbx_round(got, f);
}

/* Single values anywhere in the windows, the edges included: every double spans 53
 * bits, so it always fits one element, and the element is its exact value. */
START_TEST(test_wire_roundtrip)
{
    sbx_format fs[2] = {SBX_LINEAR, SBX_QUADRATIC};
    uint64_t s = 71;
    for (int fi = 0; fi < 2; fi++) {
        sbx_format f = fs[fi];
        const int top = f.lsb_exp + 32 * (f.ndigits - 1); /* deposits stay below 2^top */
        const double edges[] = {ldexp(1, f.lsb_exp), -ldexp(1, f.lsb_exp), ldexp(3, f.lsb_exp),
                                ldexp(1, top - 1), -ldexp(1, top - 1), ldexp(0x1.fffffffffffffp0, top - 1),
                                -ldexp(0x1.fffffffffffffp0, top - 1), 1.0, -1.0, 0.0};
        for (int k = 0; k < 10 + 2000; k++) {
            double v = k < 10 ? edges[k] : rand_dyadic(&s, f.lsb_exp, top - 53);
            int64_t acc[MAXW];
            sbx_zero(acc, f);
            sbx_add(acc, f, v);
            sbx_normalize(acc, f);
            ASSERT_SAME(wire_check(acc, 1, f, 0, 1), v == 0 ? 0.0 : v);
        }
        /* A sum near the top whose carries reach the top digit: still exact. */
        int64_t acc[MAXW];
        sbx_zero(acc, f);
        for (int i = 0; i < 1000; i++) sbx_add(acc, f, ldexp(0x1.fffffffffffffp0, top - 1));
        sbx_normalize(acc, f);
        wire_check(acc, 1, f, 0, 2);
    }
}
END_TEST

/* Thousands of ranks each send values whose 62-bit digits are all ones, so that the
 * merged digits carry into the same digit again and again; some ranks negative. */
START_TEST(test_wire_many_ranks_carry)
{
    enum { R = 4096 };
    sbx_format f = SBX_LINEAR;
    const int64_t w = sbx_words(f);
    int64_t *accs = malloc(sizeof(int64_t) * (size_t)(R * w));
    ref_t ref;
    memset(&ref, 0, sizeof ref);
    for (int r = 0; r < R; r++) {
        int64_t *a = accs + r * w;
        sbx_zero(a, f);
        /* (2^124 - 1) 2^(lsb + 62): two full 62-bit digits, then a 2^-1 .. -ish tail. */
        __int128 v = ((__int128)1 << 124) - 1;
        if (r % 7 == 3) v = -v;
        sbx_add_scaled(a, f, v, f.lsb_exp + 62);
        ref_add_i128(&ref, v, f.lsb_exp + 62);
        sbx_add_scaled(a, f, ((__int128)1 << 62) - 1, f.lsb_exp);
        ref_add_i128(&ref, ((__int128)1 << 62) - 1, f.lsb_exp);
        sbx_normalize(a, f);
    }
    ASSERT_SAME(wire_check(accs, R, f, 0, 3), ref_round(&ref));
    free(accs);
}
END_TEST

/* Massive cancellation across ranks: +X and -X on different ranks, the small rest on
 * others. Exact while the data's bits fit one element; over (and then the caller's
 * fallback) when they do not - never a wrong answer. */
START_TEST(test_wire_cancellation)
{
    sbx_format f = SBX_LINEAR;
    const int64_t w = sbx_words(f);
    int64_t accs[6 * MAXW];
    for (int big = 0; big < 2; big++) {
        const double X = ldexp(0x1.23456789abcdfp0, big ? 150 : 60), t = ldexp(1, -100);
        const double v[6] = {X, t, -X, 3 * t, X / 2, -X / 2};
        for (int r = 0; r < 6; r++) {
            sbx_zero(accs + r * w, f);
            sbx_add(accs + r * w, f, v[r]);
            sbx_normalize(accs + r * w, f);
        }
        /* 2^-100 .. 2^61: 161 bits, fits; 2^-100 .. 2^151: 251 bits, over. */
        double got = wire_check(accs, 6, f, big, 4);
        if (!big) ASSERT_SAME(got, 4 * t);
    }
    /* One rank alone whose value spans too much: over, whatever the others send. */
    int64_t a[2 * MAXW];
    sbx_zero(a, f), sbx_zero(a + w, f);
    sbx_add(a, f, ldexp(1, 150)), sbx_add(a, f, ldexp(1, -150));
    sbx_normalize(a, f);
    sbx_add(a + w, f, 1.0);
    sbx_normalize(a + w, f);
    wire_check(a, 2, f, 1, 5);
}
END_TEST

/* Sums that land exactly on a tie between two doubles, the halves on different
 * ranks: ties to even; and a sticky bit far below on yet another rank breaks the tie. */
START_TEST(test_wire_ties)
{
    sbx_format f = SBX_QUADRATIC;
    const int64_t w = sbx_words(f);
    int64_t accs[4 * MAXW];
    const double cases[3][4] = {{1.0, 0x1p-54, 0x1p-54, 0},                      /* 1 + 2^-53: to 1 */
                                {1.0 + 0x1p-52, 0x1p-54, 0x1p-54, 0},            /* to 1 + 2^-51 */
                                {1.0, 0x1p-54, 0x1p-54, 0x1p-150}};              /* above the tie */
    const double want[3] = {1.0, 1.0 + 0x1p-51, 1.0 + 0x1p-52};
    for (int c = 0; c < 3; c++) {
        for (int r = 0; r < 4; r++) {
            sbx_zero(accs + r * w, f);
            sbx_add(accs + r * w, f, cases[c][r]);
            sbx_normalize(accs + r * w, f);
        }
        ASSERT_SAME(wire_check(accs, 4, f, 0, 6), want[c]);
        for (int r = 0; r < 4; r++) { /* and negated */
            int64_t *a = accs + r * w;
            sbx_zero(a, f);
            sbx_add(a, f, -cases[c][r]);
            sbx_normalize(a, f);
        }
        ASSERT_SAME(wire_check(accs, 4, f, 0, 7), -want[c]);
    }
}
END_TEST

/* Random multisets over random numbers of ranks, spans on both sides of the limit:
 * whatever the verdict, it is the same for every merge order, and an exact element
 * is the exact sum (wire_check). */
START_TEST(test_wire_random)
{
    sbx_format fs[2] = {SBX_LINEAR, SBX_QUADRATIC};
    uint64_t s = 99;
    int exact = 0, over = 0;
    for (int it = 0; it < 400; it++) {
        sbx_format f = fs[it % 2];
        const int64_t w = sbx_words(f);
        const int R = (int)rng_range(&s, 1, 40);
        const int top = f.lsb_exp + 32 * (f.ndigits - 1) - 53;
        const int qlo = (int)rng_range(&s, f.lsb_exp, top), qhi = (int)rng_range(&s, qlo, top);
        int64_t *accs = malloc(sizeof(int64_t) * (size_t)(R * w));
        for (int r = 0; r < R; r++) {
            int64_t *a = accs + r * w;
            sbx_zero(a, f);
            const int n = (int)rng_range(&s, 0, 5);
            for (int i = 0; i < n; i++) sbx_add(a, f, rand_dyadic(&s, qlo, qhi));
            sbx_normalize(a, f);
        }
        /* The verdict is checked for order independence inside; count both kinds. */
        int64_t *el = malloc(sizeof(int64_t) * (size_t)(R * SBX_WIRE_WORDS)), m[SBX_WIRE_WORDS];
        for (int r = 0; r < R; r++) sbx_wire_pack(el + r * SBX_WIRE_WORDS, accs + r * w, f);
        wire_merge_all(el, R, s, m);
        const int is_over = m[0] == SBX_WIRE_OVER;
        wire_check(accs, R, f, is_over, s);
        exact += !is_over, over += is_over;
        free(el), free(accs);
    }
    ck_assert_msg(exact > 50 && over > 50, "both verdicts reached: %d exact, %d over", exact, over);
}
END_TEST

/* The element type and merge through a real MPI_Allreduce: each rank's accumulators
 * packed, combined by the user-defined op, against sbx_allreduce of the same ones. */
START_TEST(test_mpi_wire)
{
    enum { NACC = 4 };
    sbx_format f = SBX_QUADRATIC;
    const int64_t w = sbx_words(f);
    int64_t accs[NACC * MAXW], el[NACC * SBX_WIRE_WORDS];
    for (int c = 0; c < NACC; c++) {
        int64_t *a = accs + c * w;
        sbx_zero(a, f);
        uint64_t s = 500 + 31 * (uint64_t)g_rank + (uint64_t)c;
        for (int i = 0; i < 300; i++)
            sbx_add(a, f, c == 3 && g_rank == 0 ? ldexp(1, 300) : rand_dyadic(&s, -90 + 10 * c, 20));
        if (c == 2) sbx_add(a, f, g_rank % 2 ? -1e20 : 1e20); /* cancels at even P */
        sbx_normalize(a, f);
        sbx_wire_pack(el + c * SBX_WIRE_WORDS, a, f);
    }
    MPI_Datatype t;
    MPI_Op op;
    ck_assert_int_eq(MPI_Type_contiguous(SBX_WIRE_WORDS, MPI_INT64_T, &t), MPI_SUCCESS);
    ck_assert_int_eq(MPI_Type_commit(&t), MPI_SUCCESS);
    ck_assert_int_eq(MPI_Op_create(sbx_wire_op, 1, &op), MPI_SUCCESS);
    ck_assert_int_eq(MPI_Allreduce(MPI_IN_PLACE, el, NACC, t, op, MPI_COMM_WORLD), MPI_SUCCESS);
    MPI_Op_free(&op);
    MPI_Type_free(&t);
    ck_assert_int_eq(sbx_allreduce(accs, NACC, f, MPI_COMM_WORLD), MPI_SUCCESS);
    for (int c = 0; c < NACC; c++) {
        int64_t got[MAXW];
        const int rc = sbx_wire_unpack(got, el + c * SBX_WIRE_WORDS, f);
        if (c == 3 && g_size > 1) { /* 2^300 on rank 0 and 2^-90.. elsewhere: 390+ bits */
            ck_assert_int_eq(rc, -1);
            continue;
        }
        ck_assert_int_eq(rc, 0);
        ASSERT_SAME(sbx_round(got, f), sbx_round(accs + c * w, f));
    }
}
END_TEST

/* ---------------------------------------------------------------- bench + main */

/* Thread CPU time, not wall time: the bench is often run on a shared, oversubscribed
 * machine, and time spent descheduled is not the deposit's cost. */
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median over 9 runs of 10 passes over 2^20 values roughly like activations (floats)
 * and squared activations (doubles), all into ONE accumulator (the worst case: every
 * deposit depends on the previous one through memory). */
static int bench(void)
{
    enum { N = 1 << 20, REPS = 10, RUNS = 9, KINDS = 3 };
    double *d = malloc(sizeof(double) * N);
    float *fl = malloc(sizeof(float) * N);
    uint64_t s = 99;
    for (int i = 0; i < N; i++) {
        double u = ((double)(rng_next(&s) >> 11) + 0.5) * 0x1p-53;
        double g = sqrt(-2 * log(u)) * cos(6.283185307179586 * (double)(rng_next(&s) >> 11) * 0x1p-53);
        fl[i] = (float)g;
        d[i] = g * (double)fl[i] * 0.5;
    }
    sbx_format f = SBX_LINEAR;
    int64_t acc[MAXW];
    double t[KINDS][RUNS], keep = 0;
    for (int run = 0; run < RUNS; run++) {
        sbx_zero(acc, f);
        double t0 = now_s();
        for (int r = 0; r < REPS; r++) {
            for (int i = 0; i < N; i++) sbx_add(acc, f, d[i]);
            sbx_normalize(acc, f);
        }
        double t1 = now_s();
        for (int r = 0; r < REPS; r++) {
            sbx_add_floats(acc, f, fl, N);
            sbx_normalize(acc, f);
        }
        double t2 = now_s();
        for (int r = 0; r < REPS; r++) {
            for (int i = 0; i < N; i += 1024) sbx_add_floats(acc, f, fl + i, 1024);
            sbx_normalize(acc, f);
        }
        double t3 = now_s();
        keep += sbx_round(acc, f);
        t[0][run] = (t1 - t0) / ((double)N * REPS) * 1e9;
        t[1][run] = (t2 - t1) / ((double)N * REPS) * 1e9;
        t[2][run] = (t3 - t2) / ((double)N * REPS) * 1e9;
    }
    const char *name[KINDS] = {"sbx_add (double)", "sbx_add_floats, n = 2^20 (bins)",
                               "sbx_add_floats, n = 1024 (direct)"};
    for (int k = 0; k < KINDS; k++) {
        qsort(t[k], RUNS, sizeof(double), cmp_double);
        printf("%-36s median %6.2f ns/deposit (min %.2f, max %.2f)\n", name[k], t[k][RUNS / 2],
               t[k][0], t[k][RUNS - 1]);
    }
    printf("(checksum %g)\n", keep);
    free(d);
    free(fl);
    return 0;
}

static Suite *exactsum_suite(void)
{
    Suite *s = suite_create("exactsum");
    TCase *tl = tcase_create("local");
    tcase_set_timeout(tl, 120);
    tcase_add_test(tl, test_zero_and_simple);
    tcase_add_test(tl, test_exact_int128);
    tcase_add_test(tl, test_exact_bigint);
    tcase_add_test(tl, test_add_scaled);
    tcase_add_test(tl, test_cancellation);
    tcase_add_test(tl, test_ties);
    tcase_add_test(tl, test_subnormal_results);
    tcase_add_test(tl, test_overflow);
    tcase_add_test(tl, test_specials);
    tcase_add_test(tl, test_deposit_rounding);
    tcase_add_test(tl, test_float_denormals);
    tcase_add_test(tl, test_order_independence);
    tcase_add_test(tl, test_add_floats_equals_add);
    tcase_add_test(tl, test_add_floats_large_bins);
    tcase_add_test(tl, test_round_unnormalized_const);
    tcase_add_test(tl, test_round_random_words);
    tcase_add_test(tl, test_normalize_contract);
    tcase_add_test(tl, test_wire_roundtrip);
    tcase_add_test(tl, test_wire_many_ranks_carry);
    tcase_add_test(tl, test_wire_cancellation);
    tcase_add_test(tl, test_wire_ties);
    tcase_add_test(tl, test_wire_random);
    suite_add_tcase(s, tl);
    TCase *tm = tcase_create("mpi");
    tcase_set_timeout(tm, 120);
    tcase_add_test(tm, test_mpi_allreduce);
    tcase_add_test(tm, test_mpi_carries_and_specials);
    tcase_add_test(tm, test_mpi_wire);
    suite_add_tcase(s, tm);
    return s;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        if (g_rank == 0) bench();
        MPI_Finalize();
        return 0;
    }
    SRunner *sr = srunner_create(exactsum_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, g_rank == 0 ? CK_NORMAL : CK_SILENT);
    int failed = srunner_ntests_failed(sr), any = 0;
    srunner_free(sr);
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (failed) fprintf(stderr, "rank %d: %d test(s) failed\n", g_rank, failed);
    MPI_Finalize();
    return any ? 1 : 0;
}
