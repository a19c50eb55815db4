/*
 * test_moments.c - Check suite for the sum kernels of src/moments.c, called directly
 * (the layer tests reach them only through syncbn_forward/backward, which never pass
 * a non-finite mean and round everything through the allreduce).
 *
 * References are computed here, independently of the kernels: long double sums of the
 * terms (FAST, within a bound on the rounding of double sums), exact integer totals
 * for integer-valued data (both modes, compared bit for bit), and the IEEE rules for
 * infinities, and for the exact S == 1 blocks a big integer (tests/exactref.h)
 * holding each channel's exact sum. Every case runs at 1 and 2 OpenMP threads, whose results must be the
 * same bits.
 */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv, strdup */
#include "exactref.h"
#include "exactsum.h"
#include "moments.h"
#include "simd.h"
#include "testutil.h"

#include <check.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double *s1, *s2; /* FAST */
    double *r1, *r2; /* REPRODUCIBLE, rounded */
} sums_out;

/* Both modes of one kernel call (kind 0: forward sums, 1: backward) at `threads`. */
/* A mask buffer as the layer allocates it (layer.c, mask_reserve): whole 64-bit words
 * and one spare word, since readers may load up to two bytes past the last element's
 * byte (sums.c, sv_mask16). */
static size_t mask_bytes(int64_t E) { return ((size_t)(E / 64) + 2) * sizeof(uint64_t); }

static sums_out run(int kind, const float *x, const float *dy, const double *mean, sbn_shape sh, int threads)
{
    const int64_t C = sh.C, W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
    sums_out o = {malloc(C * sizeof(double)), malloc(C * sizeof(double)), malloc(C * sizeof(double)),
                  malloc(C * sizeof(double))};
    int64_t *a1 = malloc(C * W1 * sizeof *a1), *a2 = malloc(C * W2 * sizeof *a2);
    ck_assert(o.s1 && o.s2 && o.r1 && o.r2 && a1 && a2);
    for (int64_t c = 0; c < C; c++)
        sbx_zero(a1 + c * W1, SBX_LINEAR), sbx_zero(a2 + c * W2, SBX_QUADRATIC);
    omp_set_num_threads(threads);
    if (kind == 0) {
        sbn_forward_sums(x, sh, o.s1, o.s2, NULL, NULL);
        sbn_forward_sums(x, sh, NULL, NULL, a1, a2);
    } else {
        sbn_backward_sums(x, dy, NULL, mean, sh, o.s1, o.s2, NULL, NULL);
        sbn_backward_sums(x, dy, NULL, mean, sh, NULL, NULL, a1, a2);
    }
    for (int64_t c = 0; c < C; c++)
        o.r1[c] = sbx_round(a1 + c * W1, SBX_LINEAR), o.r2[c] = sbx_round(a2 + c * W2, SBX_QUADRATIC);
    free(a1), free(a2);
    return o;
}

static void out_free(sums_out o) { free(o.s1), free(o.s2), free(o.r1), free(o.r2); }

static int same_bits(const double *a, const double *b, int64_t n) { return !memcmp(a, b, n * sizeof *a); }

static int64_t at(sbn_shape sh, int64_t i, int64_t c, int64_t s) /* element index */
{
    return sh.layout == SYNCBN_NCHW ? (i * sh.C + c) * sh.S + s : (i * sh.S + s) * sh.C + c;
}

/* Shapes around the vector widths (8, 16 lanes), the 4 KiB row switch (1024) and
 * the channel blocks, both layouts, both kinds; two data sets: integers in [-64, 64]
 * (every sum exact, so both modes must give the exact total) and uniform floats
 * (FAST within the double rounding bound; REPRODUCIBLE within one rounding of the
 * FAST sum's error). */
START_TEST(sums_match_reference)
{
    const int64_t Ss[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 49, 196, 1023, 1024, 1025, 3136};
    const int64_t Cs[] = {1, 3, 8, 17, 65}, ns[] = {1, 3};
    uint64_t key = 7;
    int cases = 0;
    for (size_t is = 0; is < sizeof Ss / sizeof *Ss; is++)
        for (size_t ic = 0; ic < sizeof Cs / sizeof *Cs; ic++)
            for (size_t in = 0; in < sizeof ns / sizeof *ns; in++)
                for (int lay = 0; lay < 2; lay++)
                    for (int integer = 0; integer < 2; integer++) {
                        sbn_shape sh = {.n = ns[in], .C = Cs[ic], .S = Ss[is],
                                        .layout = lay ? SYNCBN_NHWC : SYNCBN_NCHW};
                        const int64_t E = sh.n * sh.C * sh.S;
                        float *x = malloc(E * sizeof *x), *dy = malloc(E * sizeof *dy);
                        double *mean = malloc(sh.C * sizeof *mean);
                        for (int64_t e = 0; e < E; e++) {
                            x[e] = integer ? (float)((int64_t)(tu_hash(key++) % 129) - 64)
                                           : (float)(tu_uniform(key++) * 4 - 1);
                            dy[e] = integer ? (float)((int64_t)(tu_hash(key++) % 129) - 64)
                                            : (float)(tu_uniform(key++) * 2 - 1);
                        }
                        for (int64_t c = 0; c < sh.C; c++)
                            mean[c] = integer ? (double)((int64_t)(tu_hash(key++) % 9) - 4) : 0.25 * (double)c - 0.5;
                        for (int kind = 0; kind < 2; kind++) {
                            sums_out o1 = run(kind, x, dy, mean, sh, 1), o2 = run(kind, x, dy, mean, sh, 2);
                            ck_assert_msg(same_bits(o1.s1, o2.s1, sh.C) && same_bits(o1.s2, o2.s2, sh.C) &&
                                              same_bits(o1.r1, o2.r1, sh.C) && same_bits(o1.r2, o2.r2, sh.C),
                                          "1 vs 2 threads differ: n=%lld C=%lld S=%lld layout=%d kind=%d",
                                          (long long)sh.n, (long long)sh.C, (long long)sh.S, lay, kind);
                            for (int64_t c = 0; c < sh.C; c++) {
                                long double t1 = 0, t2 = 0, a1 = 0, a2 = 0;
                                for (int64_t i = 0; i < sh.n; i++)
                                    for (int64_t s = 0; s < sh.S; s++) {
                                        const int64_t e = at(sh, i, c, s);
                                        const long double u = kind ? dy[e] : x[e];
                                        const long double v = kind ? (long double)dy[e] * ((long double)x[e] - mean[c])
                                                                   : (long double)x[e] * x[e];
                                        t1 += u, t2 += v, a1 += fabsl(u), a2 += fabsl(v);
                                    }
                                if (integer) { /* every partial sum is an integer below 2^53: exact */
                                    ck_assert(o1.s1[c] == (double)t1 && o1.s2[c] == (double)t2);
                                    ck_assert(o1.r1[c] == (double)t1 && o1.r2[c] == (double)t2);
                                } else {
                                    /* A term dy*(x - m) is rounded twice, a sum of E terms E - 1
                                     * times in any order, REPRODUCIBLE's exact total once more:
                                     * |error| <= (E + 3) u sum|terms|, u = 2^-53. */
                                    const long double b1 = (E + 3) * 0x1p-53L * a1, b2 = (E + 3) * 0x1p-53L * a2;
                                    ck_assert_msg(fabsl(o1.s1[c] - t1) <= b1 && fabsl(o1.s2[c] - t2) <= b2,
                                                  "FAST off the reference: S=%lld c=%lld", (long long)sh.S,
                                                  (long long)c);
                                    ck_assert(fabsl(o1.r1[c] - t1) <= b1 && fabsl(o1.r2[c] - t2) <= b2);
                                }
                            }
                            out_free(o1), out_free(o2);
                            cases++;
                        }
                        free(x), free(dy), free(mean);
                    }
    ck_assert_int_eq(cases, 17 * 5 * 2 * 2 * 2 * 2);
}
END_TEST

/* A mean of +Inf: every term dy*(x - m) with dy > 0 is -Inf, so the sum is -Inf. The
 * positions a masked vector step leaves unused must add nothing, not 0*(0 - Inf) =
 * NaN. (The layer never passes such a mean - its forward reports ENONFINITE first -
 * but the kernel's contract is the sum of the terms.) */
START_TEST(nonfinite_mean_masked_positions)
{
    const int64_t Ss[] = {3, 9, 17, 196};
    for (size_t is = 0; is < sizeof Ss / sizeof *Ss; is++)
        for (int lay = 0; lay < 2; lay++) {
            sbn_shape sh = {.n = 2, .C = 2, .S = Ss[is], .layout = lay ? SYNCBN_NHWC : SYNCBN_NCHW};
            const int64_t E = sh.n * sh.C * sh.S;
            float *x = malloc(E * sizeof *x), *dy = malloc(E * sizeof *dy);
            for (int64_t e = 0; e < E; e++)
                x[e] = (float)(e % 5) - 2, dy[e] = 1 + (float)(e % 3);
            const double mean[2] = {INFINITY, -INFINITY};
            for (int threads = 1; threads <= 2; threads++) {
                sums_out o = run(1, x, dy, mean, sh, threads);
                ck_assert_msg(o.s2[0] == -INFINITY && o.s2[1] == INFINITY,
                              "FAST S=%lld layout=%d: got %g %g, want -inf inf", (long long)sh.S, lay, o.s2[0],
                              o.s2[1]);
                ck_assert_msg(o.r2[0] == -INFINITY && o.r2[1] == INFINITY,
                              "REPRODUCIBLE S=%lld layout=%d: got %g %g, want -inf inf", (long long)sh.S, lay,
                              o.r2[0], o.r2[1]);
                out_free(o);
            }
            free(x), free(dy);
        }
}
END_TEST

/* ---- the documented FAST order, for every element type and the ReLU mask ----
 * The reference below is scalar double code written from the order in moments.h
 * and sums.c, not from the kernels: a per-sample partial of an NCHW row (S > 1) is
 * 16 lane sums (lane j: positions s = j mod 16 in increasing s, from +0) combined
 * as the tree of sbn_lanes16 ((j + j+8), then (j + j+4), then (0 + 2) + (1 + 3));
 * an NHWC partial (and any S == 1 one) is the plain sum over s in order, from +0;
 * a channel's total adds the partials in sample order, from +0. FAST must give its
 * bits exactly; REPRODUCIBLE (which rounds the exact sum of the same partials) must
 * lie within one rounding of it. Data span 2^-20..2^20, so any other order would
 * change bits. */

typedef struct {
    int64_t n, C, S;
    int layout, off; /* off: element offset of the tensors (bfloat16: 2-byte aligned) */
} typed_case;

static double elem(int bf16, const void *p, int64_t e)
{
    if (!bf16)
        return ((const float *)p)[e];
    return tu_bf16_value(((const uint16_t *)p)[e]);
}

/* Term of element e of channel c: x, x^2 (kind 0: which = 0, 1) or g, g*(x - m). */
static double term(int kind, int which, int bf16, const void *x, const void *dy, const uint8_t *mask,
                   const double *mean, int64_t c, int64_t e)
{
    const double u = elem(bf16, x, e);
    if (!kind)
        return which ? u * u : u;
    const double g = mask && !((mask[e >> 3] >> (e & 7)) & 1) ? 0.0 : elem(bf16, dy, e);
    return which ? g * (u - mean[c]) : g;
}

static double partial_ref(int kind, int which, int bf16, const void *x, const void *dy, const uint8_t *mask,
                          const double *mean, sbn_shape sh, int64_t i, int64_t c)
{
    if (sh.layout == SYNCBN_NHWC || sh.S == 1) {
        double p = 0;
        for (int64_t s = 0; s < sh.S; s++)
            p += term(kind, which, bf16, x, dy, mask, mean, c, at(sh, i, c, s));
        return p;
    }
    double L[16] = {0};
    for (int64_t s = 0; s < sh.S; s++)
        L[s % 16] += term(kind, which, bf16, x, dy, mask, mean, c, at(sh, i, c, s));
    double v[8], w[4];
    for (int j = 0; j < 8; j++)
        v[j] = L[j] + L[j + 8];
    for (int j = 0; j < 4; j++)
        w[j] = v[j] + v[j + 4];
    return (w[0] + w[2]) + (w[1] + w[3]);
}

/* Both modes of a typed call at `threads`: FAST into s1, s2; REPRODUCIBLE into the
 * zeroed accumulators a1, a2. */
static void run_both(int kind, const void *x, const void *dy, const uint8_t *mask, const double *mean,
                     sbn_shape sh, int threads, double *s1, double *s2, int64_t *a1, int64_t *a2)
{
    omp_set_num_threads(threads);
    if (kind) {
        sbn_backward_sums(x, dy, mask, mean, sh, s1, s2, NULL, NULL);
        sbn_backward_sums(x, dy, mask, mean, sh, NULL, NULL, a1, a2);
    } else {
        sbn_forward_sums(x, sh, s1, s2, NULL, NULL);
        sbn_forward_sums(x, sh, NULL, NULL, a1, a2);
    }
}

/* Element e of x and dy: fx and fg, as floats or as bfloat16 (their top 16 bits). */
static void put_pair(int bf16, void *x, void *dy, int64_t e, float fx, float fg)
{
    uint32_t bx, bg;
    memcpy(&bx, &fx, 4), memcpy(&bg, &fg, 4);
    if (bf16)
        ((uint16_t *)x)[e] = (uint16_t)(bx >> 16), ((uint16_t *)dy)[e] = (uint16_t)(bg >> 16);
    else
        ((float *)x)[e] = fx, ((float *)dy)[e] = fg;
}

START_TEST(sums_fast_order_every_type)
{
    /* Small shapes stay on one thread; the large ones take each threaded path:
     * NCHW short and long rows, NHWC wide rows (channel split), NHWC narrow rows
     * (sample split), S == 1 (FAST row adds, REPRODUCIBLE packed blocks). */
    const typed_case cases[] = {
        {3, 5, 1, SYNCBN_NCHW, 0},    {2, 3, 17, SYNCBN_NCHW, 1},   {2, 17, 9, SYNCBN_NHWC, 1},
        {3, 7, 49, SYNCBN_NCHW, 0},   {2, 65, 31, SYNCBN_NHWC, 0},  {4, 9, 196, SYNCBN_NCHW, 1},
        {5, 40, 196, SYNCBN_NCHW, 1}, {2, 20, 1030, SYNCBN_NCHW, 0}, {3, 300, 49, SYNCBN_NHWC, 1},
        {32, 16, 80, SYNCBN_NHWC, 0}, {200, 190, 1, SYNCBN_NHWC, 1}, {260, 130, 1, SYNCBN_NCHW, 0},
    };
    uint64_t key = 99;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++)
        for (int bf16 = 0; bf16 < 2; bf16++) {
            const typed_case tc = cases[ci];
            sbn_shape sh = {.n = tc.n, .C = tc.C, .S = tc.S, .layout = tc.layout,
                            .dt = bf16 ? SYNCBN_BF16 : SYNCBN_F32};
            const int64_t E = sh.n * sh.C * sh.S, es = bf16 ? 2 : 4, W1 = sbx_words(SBX_LINEAR),
                          W2 = sbx_words(SBX_QUADRATIC);
            char *xbuf = malloc((E + 1) * es), *dybuf = malloc((E + 1) * es);
            uint8_t *mask = malloc(mask_bytes(E));
            double *mean = malloc(sh.C * sizeof *mean);
            ck_assert(xbuf && dybuf && mask && mean);
            void *x = xbuf + tc.off * es, *dy = dybuf + tc.off * es;
            for (int64_t e = 0; e < E; e++) {
                /* sign, exponent in [-20, 20], 8 or 24 significant bits */
                const uint64_t hx = tu_hash(key++), hg = tu_hash(key++);
                const float fx = (float)ldexp((double)(hx >> 40) / (1 << 24) + 1, (int)(hx % 41) - 20) *
                                 (hx & 4096 ? -1 : 1);
                const float fg = (float)ldexp((double)(hg >> 40) / (1 << 24) + 1, (int)(hg % 41) - 20) *
                                 (hg & 4096 ? -1 : 1);
                put_pair(bf16, x, dy, e, fx, fg);
            }
            for (int64_t b = 0; b < E / 8 + 2; b++)
                mask[b] = (uint8_t)tu_hash(key++);
            for (int64_t c = 0; c < sh.C; c++)
                mean[c] = ldexp((double)(tu_hash(key++) % 1000) - 500, -6);
            for (int variant = 0; variant < 3; variant++) { /* forward; backward; backward with the mask */
                const int kind = variant > 0;
                const uint8_t *mk = variant == 2 ? mask : NULL;
                double *ref1 = calloc(sh.C, sizeof(double)), *ref2 = calloc(sh.C, sizeof(double)),
                       *abs1 = calloc(sh.C, sizeof(double)), *abs2 = calloc(sh.C, sizeof(double));
                for (int64_t c = 0; c < sh.C; c++)
                    for (int64_t i = 0; i < sh.n; i++) {
                        const double p1 = partial_ref(kind, 0, bf16, x, dy, mk, mean, sh, i, c);
                        const double p2 = partial_ref(kind, 1, bf16, x, dy, mk, mean, sh, i, c);
                        ref1[c] += p1, ref2[c] += p2, abs1[c] += fabs(p1), abs2[c] += fabs(p2);
                    }
                for (int threads = 1; threads <= 2; threads++) {
                    double *s1 = malloc(sh.C * sizeof(double)), *s2 = malloc(sh.C * sizeof(double));
                    int64_t *a1 = calloc(sh.C * W1, sizeof *a1), *a2 = calloc(sh.C * W2, sizeof *a2);
                    run_both(kind, x, dy, mk, mean, sh, threads, s1, s2, a1, a2);
                    for (int64_t c = 0; c < sh.C; c++) {
                        ck_assert_msg(same_bits(s1 + c, ref1 + c, 1) && same_bits(s2 + c, ref2 + c, 1),
                                      "FAST order: case %zu bf16=%d variant=%d threads=%d c=%lld: %a %a want %a %a",
                                      ci, bf16, variant, threads, (long long)c, s1[c], s2[c], ref1[c], ref2[c]);
                        /* the exact sum of the partials, rounded once, against their
                         * FAST sum: both within n - 1 roundings of the exact one */
                        const double r1 = sbx_round(a1 + c * W1, SBX_LINEAR), r2 = sbx_round(a2 + c * W2, SBX_QUADRATIC);
                        ck_assert_msg(fabs(r1 - ref1[c]) <= (sh.n + 1) * 0x1p-52 * abs1[c] &&
                                          fabs(r2 - ref2[c]) <= (sh.n + 1) * 0x1p-52 * abs2[c],
                                      "REPRODUCIBLE: case %zu bf16=%d variant=%d c=%lld", ci, bf16, variant,
                                      (long long)c);
                    }
                    free(s1), free(s2), free(a1), free(a2);
                }
                free(ref1), free(ref2), free(abs1), free(abs2);
            }
            free(xbuf), free(dybuf), free(mask), free(mean);
        }
}
END_TEST

/* ---- REPRODUCIBLE, S == 1: every exact path against an independent big integer ----
 * The S == 1 sums deposit a chunk of channels block by block: a lane whose block
 * passes the plan as one exact integer (one or two extraction levels), the others'
 * terms one by one (sums.c). Whichever way, the normalized accumulator must hold the
 * exact sum of the terms (tests/exactref.h, which shares no code with the library)
 * and count each NaN, +Inf and -Inf term. Channels are adversarial by pattern:
 * ordinary data, massive cancellation (+-2^100 pairs around a tiny rest), both edges
 * of the float range together (denormals next to 2^127: the block takes the
 * fallback), sums that land exactly on a tie between two doubles (and a bit below
 * one that breaks it), NaN, +Inf, both infinities, signed zeros, the limit of one
 * extraction level (24-bit values spread over 2^-21 .. 2^0, and over 2^-40 .. 2^40),
 * denormals alone, a constant; and, against the backward's one checked pass (whose
 * plan is guessed from the first rows), a large value late in the block, a small one
 * late in the block, and zeros in the first rows, so that the guess misses and the
 * chunk is summed again (the test requires that both a miss and a hit happened).
 * Shapes cross the chunk width (256 channels),
 * the block length (256 samples), and leave a tail of fewer than 8 channels; 1 and
 * 2 threads, f32 and bf16, forward, backward, and backward through the ReLU mask. */
enum { ADV_PATTERNS = 16 };

static float adv_value(int pattern, int64_t i, int64_t n, uint64_t h)
{
    const float sgn = h & 1 ? -1.0f : 1.0f;
    const float mant = (float)(1 + (double)(h >> 40) / (1 << 24)); /* 24 bits in [1, 2) */
    switch (pattern) {
    case 0: return (float)tu_normal(h);
    case 1: return i == n - 1 ? 0x1.8p-130f : (i & 1 ? -0x1.000002p100f : 0x1.000002p100f);
    case 2: return i % 3 == 0 ? 0x1p-149f * (float)(h % 7) : i % 3 == 1 ? sgn * 0x1.fffffep127f : sgn * 0x1p-126f;
    case 3: return i == 0 ? 1.0f : i == 1 ? 0x1p-53f : 0.0f;
    case 4: return i == 0 ? 1.0f : i == 1 ? 0x1p-53f : i == 2 ? 0x1p-90f : 0.0f;
    case 5: return i == n / 2 ? NAN : (float)tu_normal(h);
    case 6: return i == n / 3 ? INFINITY : (float)tu_normal(h);
    case 7: return i == n / 3 ? INFINITY : i == n / 2 ? -INFINITY : 1.0f;
    case 8: return h & 2 ? -0.0f : 0.0f;
    case 9: return sgn * ldexpf(mant, -(int)(h % 22));
    case 10: return sgn * ldexpf(mant, (int)(h % 81) - 40);
    case 11: return sgn * 0x1p-149f * (float)(h % 1000);
    case 12: return 0.75f;
    case 13: return i == n - 3 ? 0x1.234568p20f : 0x1p-10f * (float)tu_normal(h);
    case 14: return i == n - 5 ? sgn * ldexpf(mant, -29) : (float)tu_normal(h);
    default: return i < 32 ? 0.0f : (float)tu_normal(h);
    }
}

START_TEST(sums_s1_exact_adversarial)
{
    const struct { int64_t n, C; int layout; } cases[] = {
        {256, 264, SYNCBN_NCHW}, {300, 45, SYNCBN_NHWC}, {5, 24, SYNCBN_NCHW}, {513, 16, SYNCBN_NHWC},
    };
    const sbx_format F[2] = {SBX_LINEAR, SBX_QUADRATIC};
    uint64_t key = 7, checked0, missed0, checked1, missed1;
    sbn_s1_counts(&checked0, &missed0);
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++)
        for (int bf16 = 0; bf16 < 2; bf16++) {
            const sbn_shape sh = {.n = cases[ci].n, .C = cases[ci].C, .S = 1, .layout = cases[ci].layout,
                                  .dt = bf16 ? SYNCBN_BF16 : SYNCBN_F32};
            const int64_t n = sh.n, C = sh.C, E = n * C, es = bf16 ? 2 : 4;
            const int64_t W[2] = {sbx_words(SBX_LINEAR), sbx_words(SBX_QUADRATIC)};
            char *x = malloc(E * es), *dy = malloc(E * es);
            uint8_t *mask = malloc(mask_bytes(E));
            double *mean = malloc(C * sizeof *mean);
            ck_assert(x && dy && mask && mean);
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < C; c++) {
                    const float fx = adv_value((int)(c % ADV_PATTERNS), i, n, tu_hash(key++));
                    const float fg = adv_value((int)((c / ADV_PATTERNS + c) % ADV_PATTERNS), i, n, tu_hash(key++));
                    put_pair(bf16, x, dy, at(sh, i, c, 0), fx, fg);
                }
            for (int64_t b = 0; b < E / 8 + 2; b++)
                mask[b] = (uint8_t)tu_hash(key++);
            for (int64_t c = 0; c < C; c++) /* x - m rounds (1/3), cancels (2^100), or is exact */
                mean[c] = c % 3 == 0 ? 1.0 / 3 : c % 3 == 1 ? 0x1p100 : 0.0;
            for (int variant = 0; variant < 3; variant++) {
                const int kind = variant > 0;
                const uint8_t *mk = variant == 2 ? mask : NULL;
                /* the reference: each channel's terms, exactly; non-finite ones counted */
                ref_t *ref = calloc(2 * C, sizeof *ref);
                int64_t *spec = calloc(2 * C * SBX_SPECIALS, sizeof *spec);
                ck_assert(ref && spec);
                for (int64_t c = 0; c < C; c++)
                    for (int64_t i = 0; i < n; i++)
                        for (int q = 0; q < 2; q++) {
                            const double t = term(kind, q, bf16, x, dy, mk, mean, c, at(sh, i, c, 0));
                            if (isfinite(t))
                                ref_add(&ref[q * C + c], t);
                            else
                                spec[(q * C + c) * SBX_SPECIALS + (isnan(t) ? 0 : t > 0 ? 1 : 2)]++;
                        }
                for (int threads = 1; threads <= 2; threads++) {
                    int64_t *a[2] = {calloc(C * W[0], sizeof(int64_t)), calloc(C * W[1], sizeof(int64_t))};
                    ck_assert(a[0] && a[1]);
                    omp_set_num_threads(threads);
                    if (kind)
                        sbn_backward_sums(x, dy, mk, mean, sh, NULL, NULL, a[0], a[1]);
                    else
                        sbn_forward_sums(x, sh, NULL, NULL, a[0], a[1]);
                    /* the rounded mode (one rank), its scratch accumulators full of garbage */
                    double *r[2] = {malloc(C * sizeof(double)), malloc(C * sizeof(double))};
                    int64_t *scratch[2] = {malloc(C * W[0] * sizeof(int64_t)), malloc(C * W[1] * sizeof(int64_t))};
                    ck_assert(r[0] && r[1] && scratch[0] && scratch[1]);
                    memset(scratch[0], 0x5A, C * W[0] * sizeof(int64_t));
                    memset(scratch[1], 0xA5, C * W[1] * sizeof(int64_t));
                    if (kind)
                        sbn_backward_sums(x, dy, mk, mean, sh, r[0], r[1], scratch[0], scratch[1]);
                    else
                        sbn_forward_sums(x, sh, r[0], r[1], scratch[0], scratch[1]);
                    for (int q = 0; q < 2; q++)
                        for (int64_t c = 0; c < C; c++) {
                            int64_t *acc = a[q] + c * W[q], want[64];
                            sbx_normalize(acc, F[q]);
                            ref_words(&ref[q * C + c], F[q], want);
                            const int64_t *sp = spec + (q * C + c) * SBX_SPECIALS;
                            ck_assert_msg(!memcmp(acc, want, F[q].ndigits * sizeof *acc) &&
                                              !memcmp(acc + F[q].ndigits, sp, SBX_SPECIALS * sizeof *acc),
                                          "S == 1 exact: case %zu bf16=%d variant=%d threads=%d sum %d channel "
                                          "%lld (pattern %lld)",
                                          ci, bf16, variant, threads, q, (long long)c, (long long)(c % ADV_PATTERNS));
                            /* rounded: the reference's own rounding where it applies (a
                             * normal or zero result, no special term), else sbx_round's */
                            double expect = sbx_round(acc, F[q]);
                            if (!sp[0] && !sp[1] && !sp[2]) {
                                const double rr = ref_round_any(&ref[q * C + c]);
                                if (rr == 0 || fabs(rr) >= DBL_MIN)
                                    expect = rr;
                            }
                            ck_assert_msg(same_bits(&r[q][c], &expect, 1),
                                          "S == 1 rounded: case %zu bf16=%d variant=%d threads=%d sum %d channel "
                                          "%lld (pattern %lld): %a, want %a",
                                          ci, bf16, variant, threads, q, (long long)c, (long long)(c % ADV_PATTERNS),
                                          r[q][c], expect);
                        }
                    free(a[0]), free(a[1]), free(r[0]), free(r[1]), free(scratch[0]), free(scratch[1]);
                }
                free(ref), free(spec);
            }
            free(x), free(dy), free(mask), free(mean);
        }
    sbn_s1_counts(&checked1, &missed1);
    ck_assert_msg(missed1 > missed0 && checked1 - checked0 > missed1 - missed0,
                  "the checked pass: %llu lane sums, %llu missed (both kinds wanted)",
                  (unsigned long long)(checked1 - checked0), (unsigned long long)(missed1 - missed0));
}
END_TEST

/* The S == 1 checked pass sums the linear term plainly (one double accumulator, no
 * plan) and certifies it afterwards from the tracked extremes (sums.c, s1_verify).
 * Here each channel is 255 terms of 1.5 and one (1 + 2^-23) 2^-k, the same k for a
 * group of 8 channels (the unit that is summed again), k = 16 .. 23: the plain sum is
 * exact up to k = 21 (bits from 2^8 down to 2^(-k-23)), rounds from k = 22 on; the
 * one-level grid of the deposit is 2^-42, so the check must certify k <= 19 only and
 * send the other lanes to be summed again. A check loosened by one binade, or a lost
 * re-sum, puts a truncated or rounded sum in the accumulator words. */
START_TEST(sums_s1_plain_sum_boundary)
{
    const sbn_shape sh = {.n = 256, .C = 64, .S = 1, .layout = SYNCBN_NCHW, .dt = SYNCBN_F32};
    const int64_t n = sh.n, C = sh.C, W[2] = {sbx_words(SBX_LINEAR), sbx_words(SBX_QUADRATIC)};
    const sbx_format F[2] = {SBX_LINEAR, SBX_QUADRATIC};
    float *x = malloc(n * C * sizeof *x), *dy = malloc(n * C * sizeof *dy);
    double mean[64] = {0};
    ck_assert(x && dy);
    for (int64_t c = 0; c < C; c++) /* the small term after the rows that guess, or among them */
        for (int64_t i = 0; i < n; i++) {
            const int64_t row = c % 8 < 4 ? 200 : 3;
            const float v = i == row ? (c & 1 ? -1.0f : 1.0f) * ldexpf(1 + 0x1p-23f, -(int)(16 + c / 8)) : 1.5f;
            x[at(sh, i, c, 0)] = v, dy[at(sh, i, c, 0)] = v;
        }
    uint64_t checked0, missed0, checked1, missed1;
    sbn_s1_counts(&checked0, &missed0);
    for (int kind = 0; kind < 2; kind++) {
        int64_t *a[2] = {calloc(C * W[0], sizeof(int64_t)), calloc(C * W[1], sizeof(int64_t))};
        int64_t *b[2] = {malloc(C * W[0] * sizeof(int64_t)), malloc(C * W[1] * sizeof(int64_t))};
        double r[2][64];
        ck_assert(a[0] && a[1] && b[0] && b[1]);
        omp_set_num_threads(1);
        if (kind) {
            sbn_backward_sums(x, dy, NULL, mean, sh, NULL, NULL, a[0], a[1]);
            sbn_backward_sums(x, dy, NULL, mean, sh, r[0], r[1], b[0], b[1]);
        } else {
            sbn_forward_sums(x, sh, NULL, NULL, a[0], a[1]);
            sbn_forward_sums(x, sh, r[0], r[1], b[0], b[1]);
        }
        for (int q = 0; q < 2; q++)
            for (int64_t c = 0; c < C; c++) {
                ref_t ref = {0};
                int64_t want[64];
                for (int64_t i = 0; i < n; i++)
                    ref_add(&ref, term(kind, q, 0, x, dy, NULL, mean, c, at(sh, i, c, 0)));
                const double rr = ref_round_any(&ref);
                ck_assert_msg(same_bits(&r[q][c], &rr, 1), "rounded: kind %d sum %d channel %lld: %a, want %a", kind,
                              q, (long long)c, r[q][c], rr);
                sbx_normalize(a[q] + c * W[q], F[q]);
                ref_words(&ref, F[q], want);
                ck_assert_msg(!memcmp(a[q] + c * W[q], want, F[q].ndigits * sizeof *want),
                              "words: kind %d sum %d channel %lld", kind, q, (long long)c);
            }
        free(a[0]), free(a[1]), free(b[0]), free(b[1]);
    }
    sbn_s1_counts(&checked1, &missed1);
    ck_assert_msg(missed1 - missed0 >= 4 * 32 && checked1 - checked0 > missed1 - missed0,
                  "%llu lane sums checked, %llu not certified",
                  (unsigned long long)(checked1 - checked0), (unsigned long long)(missed1 - missed0));
    free(x), free(dy);
}
END_TEST

/* bfloat16 sums against exact integer totals: small integers (exact in 8 bits), so
 * every partial and total is exact in both modes, bit for bit, masked or not. */
START_TEST(sums_bf16_exact_integers)
{
    const typed_case cases[] = {{3, 17, 196, SYNCBN_NCHW, 1}, {3, 17, 196, SYNCBN_NHWC, 1},
                                {64, 80, 1, SYNCBN_NHWC, 1},  {4, 24, 1031, SYNCBN_NCHW, 0},
                                {40, 8, 100, SYNCBN_NHWC, 0}};
    uint64_t key = 5;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const typed_case tc = cases[ci];
        sbn_shape sh = {.n = tc.n, .C = tc.C, .S = tc.S, .layout = tc.layout, .dt = SYNCBN_BF16};
        const int64_t E = sh.n * sh.C * sh.S, W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
        uint16_t *xbuf = malloc((E + 1) * 2), *dybuf = malloc((E + 1) * 2), *x = xbuf + tc.off, *dy = dybuf + tc.off;
        int64_t *xi = malloc(E * sizeof *xi), *gi = malloc(E * sizeof *gi);
        uint8_t *mask = malloc(mask_bytes(E));
        double mean[128];
        for (int64_t e = 0; e < E; e++) {
            xi[e] = (int64_t)(tu_hash(key++) % 255) - 127, gi[e] = (int64_t)(tu_hash(key++) % 255) - 127;
            const float fx = (float)xi[e], fg = (float)gi[e];
            uint32_t b;
            memcpy(&b, &fx, 4), x[e] = (uint16_t)(b >> 16);
            memcpy(&b, &fg, 4), dy[e] = (uint16_t)(b >> 16);
        }
        for (int64_t b = 0; b < E / 8 + 2; b++)
            mask[b] = (uint8_t)tu_hash(key++);
        for (int64_t c = 0; c < sh.C; c++)
            mean[c] = (double)((int64_t)(tu_hash(key++) % 9) - 4);
        for (int variant = 0; variant < 3; variant++)
            for (int threads = 1; threads <= 2; threads++) {
                const int kind = variant > 0;
                const uint8_t *mk = variant == 2 ? mask : NULL;
                double s1[128], s2[128];
                int64_t *a1 = calloc(sh.C * W1, sizeof *a1), *a2 = calloc(sh.C * W2, sizeof *a2);
                run_both(kind, x, dy, mk, mean, sh, threads, s1, s2, a1, a2);
                for (int64_t c = 0; c < sh.C; c++) {
                    int64_t t1 = 0, t2 = 0;
                    for (int64_t i = 0; i < sh.n; i++)
                        for (int64_t s = 0; s < sh.S; s++) {
                            const int64_t e = at(sh, i, c, s);
                            const int64_t g = mk && !((mk[e >> 3] >> (e & 7)) & 1) ? 0 : gi[e];
                            t1 += kind ? g : xi[e];
                            t2 += kind ? g * (xi[e] - (int64_t)mean[c]) : xi[e] * xi[e];
                        }
                    ck_assert_msg(s1[c] == (double)t1 && s2[c] == (double)t2 &&
                                      sbx_round(a1 + c * W1, SBX_LINEAR) == (double)t1 &&
                                      sbx_round(a2 + c * W2, SBX_QUADRATIC) == (double)t2,
                                  "bf16 exact: case %zu variant %d threads %d c %lld", ci, variant, threads,
                                  (long long)c);
                }
                free(a1), free(a2);
            }
        free(xbuf), free(dybuf), free(xi), free(gi), free(mask);
    }
}
END_TEST

/* ---- rounding double -> bfloat16 (simd.h) ----
 * Reference: tu_bf16_round (testutil.c), exact distances, ties to even. */
static uint16_t upper_bits(float f)
{
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    ck_assert_msg((b & 0xFFFF) == 0, "low half not zero: %08x", b);
    return (uint16_t)(b >> 16);
}

/* d as the value under test in lane `lane` of a vector whose other lanes hold
 * `fill` (so that a lane needing the general way shares a vector with fast ones). */
static void check_rounding(double d, double fill, int lane)
{
    sbn_v8d v = sbn_bcast8(fill);
    v[lane] = d;
    const sbn_v8f r = sbn_round8(SYNCBN_BF16, &v);
    for (int j = 0; j < 8; j++) {
        const double in = j == lane ? d : fill;
        const float got8 = r[j], got1 = sbn_round1(SYNCBN_BF16, in);
        if (isnan(in)) { /* every NaN becomes the canonical quiet NaN */
            ck_assert_msg(upper_bits(got8) == 0x7FC0 && upper_bits(got1) == 0x7FC0, "NaN %a: vector %04x scalar %04x",
                          in, upper_bits(got8), upper_bits(got1));
            continue;
        }
        const uint16_t want = tu_bf16_round(in);
        ck_assert_msg(upper_bits(got8) == want && upper_bits(got1) == want,
                      "round(%a): vector %04x scalar %04x want %04x", in, upper_bits(got8), upper_bits(got1), want);
    }
}

START_TEST(bf16_rounding_exact)
{
    uint64_t seed = 12345;
    int lane = 0;
    /* Around every bfloat16 step of many binades: the value, the tie, a double ulp
     * either side of the tie, across the subnormal, normal and overflow ranges. */
    const int exps[] = {-149, -140, -134, -133, -127, -126, -125, -60, -1, 0, 1, 30, 126, 127};
    for (size_t ei = 0; ei < sizeof exps / sizeof exps[0]; ei++)
        for (int m = 0; m < 256; m += 7) {
            const double base = ldexp(1.0 + m / 128.0, exps[ei]), half = ldexp(1, exps[ei] - 8);
            const double cases[] = {base, base + half, nextafter(base + half, 0), nextafter(base + half, INFINITY),
                                    base - half, ldexp(m, -141), ldexp(m + 0.5, -133)};
            for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
                check_rounding(cases[k], 1.5, lane++ & 7);
                check_rounding(-cases[k], ldexp(1, -130), lane++ & 7);
            }
        }
    const double special[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, -NAN, DBL_MAX, 1e-300, -1e-300, FLT_MAX,
                              ldexp(2 - ldexp(1, -8), 127), nextafter(ldexp(2 - ldexp(1, -8), 127), 0),
                              ldexp(1, -126), nextafter(ldexp(1, -126), 0), ldexp(1, -134), ldexp(1, -135),
                              nextafter(ldexp(1, -134), 1)};
    for (size_t k = 0; k < sizeof special / sizeof special[0]; k++)
        for (int l = 0; l < 8; l++)
            check_rounding(special[k], -3.25, l);
    /* NaNs of every sign and payload, from float (e.g. a 0xFF poison pattern) and
     * double: an integer carry through a full payload would make -0 or +0. */
    const uint64_t nans[] = {0x7FF8000000000000u, 0xFFF8000000000000u, 0x7FFFFFFFFFFFFFFFu, 0xFFFFFFFFFFFFFFFFu,
                             0x7FF0000000000001u, 0x7FFFFFFFE0000000u, 0xFFFFFFFFE0000000u, 0x7FF7FFFFFFFFFFFFu};
    for (size_t k = 0; k < sizeof nans / sizeof nans[0]; k++) {
        double d;
        memcpy(&d, &nans[k], sizeof d);
        for (int l = 0; l < 8; l++)
            check_rounding(d, 1.5, l);
    }
    /* Random doubles over the whole useful exponent range. */
    for (int k = 0; k < 200000; k++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        const uint64_t mant = seed >> 12;
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        const int e = (int)(seed >> 33) % 300 - 160;
        double d;
        const uint64_t bits = (uint64_t)(e + 1023) << 52 | mant | (seed & 1) << 63;
        memcpy(&d, &bits, sizeof d);
        check_rounding(d, k & 1 ? 0.75 : ldexp(1, -140), k & 7);
    }
}
END_TEST

/* OMP_WAIT_POLICY is read as the OpenMP runtimes read it: "passive" in any case,
 * blanks around it ignored; anything else (or nothing) is not passive. The kernels
 * then split from 2^20 elements instead of 2^15 (moments.h). */
START_TEST(omp_wait_policy_parsed)
{
    static const struct {
        const char *value;
        int passive;
    } cases[] = {{"passive", 1}, {"PASSIVE", 1}, {" Passive\t", 1}, {"\tpassive \n", 1}, {"active", 0},
                 {"passiv", 0},  {"passives", 0}, {"passive x", 0},  {"", 0},              {"  ", 0}};
    const size_t ncases = sizeof cases / sizeof cases[0];
    const char *saved = getenv("OMP_WAIT_POLICY");
    char *keep = saved ? strdup(saved) : NULL;
    size_t bad = ncases; /* the first case parsed wrongly, if any */
    int got = 0;
    for (size_t k = 0; k < ncases && bad == ncases; k++) {
        setenv("OMP_WAIT_POLICY", cases[k].value, 1);
        if ((got = sbn_passive_wait()) != cases[k].passive)
            bad = k;
    }
    unsetenv("OMP_WAIT_POLICY");
    const int unset = sbn_passive_wait();
    /* The threshold is read once per source file (this file has its own cache): in
     * its first call, here with the variable unset. */
    const int64_t first = sbn_omp_min_work();
    setenv("OMP_WAIT_POLICY", "passive", 1);
    const int64_t later = sbn_omp_min_work();
    if (keep) /* restored before any assertion can end the test */
        setenv("OMP_WAIT_POLICY", keep, 1);
    else
        unsetenv("OMP_WAIT_POLICY");
    free(keep);
    ck_assert_msg(bad == ncases, "OMP_WAIT_POLICY=\"%s\": passive %d, expected %d", bad < ncases ? cases[bad].value : "",
                  got, bad < ncases ? cases[bad].passive : 0);
    ck_assert_int_eq(unset, 0);
    ck_assert_int_eq(first, (int64_t)1 << 15);
    ck_assert_int_eq(later, (int64_t)1 << 15);
}
END_TEST

static Suite *moments_suite(void)
{
    Suite *s = suite_create("moments");
    TCase *tc = tcase_create("sums");
    tcase_add_test(tc, sums_match_reference);
    tcase_add_test(tc, nonfinite_mean_masked_positions);
    tcase_add_test(tc, sums_fast_order_every_type);
    tcase_add_test(tc, sums_bf16_exact_integers);
    tcase_add_test(tc, sums_s1_exact_adversarial);
    tcase_add_test(tc, sums_s1_plain_sum_boundary);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(s, tc);
    TCase *tr = tcase_create("rounding");
    tcase_add_test(tr, bf16_rounding_exact);
    tcase_add_test(tr, omp_wait_policy_parsed);
    suite_add_tcase(s, tr);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, moments_suite); }
