/*
 * test_moments.c - Check suite for the sum kernels of src/moments.c, called directly
 * (the layer tests reach them only through syncbn_forward/backward, which never pass
 * a non-finite mean and round everything through the allreduce).
 *
 * References are computed here, independently of the kernels: long double sums of the
 * terms (FAST, within a bound on the rounding of double sums), exact integer totals
 * for integer-valued data (both modes, compared bit for bit), and the IEEE rules for
 * infinities. Every case runs at 1 and 2 OpenMP threads, whose results must be the
 * same bits.
 */
#include "exactsum.h"
#include "moments.h"
#include "testutil.h"

#include <check.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double *s1, *s2; /* FAST */
    double *r1, *r2; /* REPRODUCIBLE, rounded */
} sums_out;

/* Both modes of one kernel call (kind 0: forward sums, 1: backward) at `threads`. */
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

static Suite *moments_suite(void)
{
    Suite *s = suite_create("moments");
    TCase *tc = tcase_create("sums");
    tcase_add_test(tc, sums_match_reference);
    tcase_add_test(tc, nonfinite_mean_masked_positions);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, moments_suite); }
