/*
 * test_reproducible.c - SYNCBN_REPRODUCIBLE's contract, checked bit for bit.
 *
 * In every run at P ranks, each rank first computes the whole global batch alone on
 * MPI_COMM_SELF with one OpenMP thread: that is the 1-rank answer. Then the batch is
 * split over the P ranks in several ways (even, uneven, empty ranks, all on one rank)
 * and run at 1 and 2 threads; y, dx, dweight, dbias, running_mean and running_var
 * must equal the 1-rank answer byte for byte (memcmp). Running this program at
 * P = 1..4 therefore proves equality across rank counts, splits and thread counts.
 *
 * The data include a large offset (1000 + N(0,1)) and a channel whose values span
 * 1e-3 .. 1e17 and cancel across samples: there plain double sums depend on the
 * grouping, and the test also asserts that SYNCBN_FAST does differ somewhere (at
 * P >= 2), so that the equality seen in reproducible mode is not vacuous.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "syncbn.h"
#include "testutil.h"

typedef struct {
    int64_t B, C, S;
    syncbn_layout layout;
} shape;

/* Global element (sample i, channel c, position s) of step `step`. Channel 0 is the
 * cancelling one: samples 3k and 3k+2 hold +B_k and -B_k at position 0 (B_k between
 * 1e16 and 9e16, so the rounding grid changes from pair to pair) and tiny values
 * elsewhere; samples 3k+1, between them, hold 1000 * N(0,1). The B_k cancel exactly,
 * so the mean is made of the 1000s - and how much of them survives next to a B_k
 * depends on how a plain double sum groups the samples. Other
 * channels: 1000 + N(0,1) scaled by a per-channel power of ten. */
static float value(int step, int64_t i, int64_t c, int64_t s, uint64_t salt)
{
    uint64_t key = salt ^ ((((uint64_t)step * 7919u + (uint64_t)i) * 104729u + (uint64_t)c) * 1299709u + (uint64_t)s);
    double z = tu_normal(key);
    if (c == 0 && i % 3 == 1)
        return (float)(1000 * z);
    if (c == 0)
        return s == 0 ? (float)((i % 3 ? -1e16 : 1e16) * (1 + 8 * tu_uniform((uint64_t)(i / 3)))) : (float)(1e-3 * z);
    return (float)(pow(10.0, (double)(c % 7) - 3) * (1000 + z));
}

static int64_t at(shape sh, int64_t i, int64_t c, int64_t s)
{
    return sh.layout == SYNCBN_NCHW ? (i * sh.C + c) * sh.S + s : (i * sh.S + s) * sh.C + c;
}

static void fill(shape sh, int step, int64_t lo, int64_t n, float *x, float *dy)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < sh.C; c++)
            for (int64_t s = 0; s < sh.S; s++) {
                x[at(sh, i, c, s)] = value(step, lo + i, c, s, 0);
                dy[at(sh, i, c, s)] = (float)tu_normal(0xabcdefULL << 40 ^ (uint64_t)at(sh, lo + i, c, s) ^
                                                       (uint64_t)step << 32);
            }
}

/* Everything a run produces, for one rank's slice [lo, lo+n). */
typedef struct {
    float *y, *dx;     /* [steps][n*C*S] */
    float *dw, *db;    /* [steps][C] */
    float *rm, *rv;    /* [C] after the last step */
} outputs;

enum { STEPS = 2 };

static void outputs_alloc(outputs *o, int64_t len, int64_t C)
{
    o->y = calloc((size_t)(STEPS * len + 1), sizeof(float));
    o->dx = calloc((size_t)(STEPS * len + 1), sizeof(float));
    o->dw = calloc((size_t)(STEPS * C), sizeof(float));
    o->db = calloc((size_t)(STEPS * C), sizeof(float));
    o->rm = calloc((size_t)C, sizeof(float));
    o->rv = calloc((size_t)C, sizeof(float));
}

static void outputs_free(outputs *o) { free(o->y), free(o->dx), free(o->dw), free(o->db), free(o->rm), free(o->rv); }

/* Trains STEPS steps on samples [lo, lo+n) of the global batch over comm. */
static void run(shape sh, syncbn_reduction red, MPI_Comm comm, int64_t lo, int64_t n, outputs *o)
{
    syncbn_config cfg = syncbn_config_default(sh.C);
    cfg.layout = sh.layout, cfg.reduction = red;
    syncbn_layer *l;
    int rc = syncbn_create(&cfg, comm, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create: %s", syncbn_strerror(rc));
    if (rc != SYNCBN_OK)
        return;
    for (int64_t c = 0; c < sh.C; c++)
        syncbn_weight(l)[c] = (float)(0.5 + tu_uniform((uint64_t)c)), syncbn_bias(l)[c] = (float)c / 8;
    const int64_t len = n * sh.C * sh.S;
    float *x = malloc(sizeof(float) * (size_t)(len + 1)), *dy = malloc(sizeof(float) * (size_t)(len + 1));
    for (int step = 0; step < STEPS; step++) {
        fill(sh, step, lo, n, x, dy);
        rc = syncbn_forward(l, x, n, sh.S, 1, o->y + step * len);
        TU_EXPECT(rc == SYNCBN_OK, "forward: %s", syncbn_strerror(rc));
        rc = syncbn_backward(l, x, dy, n, sh.S, o->dx + step * len, o->dw + step * sh.C, o->db + step * sh.C);
        TU_EXPECT(rc == SYNCBN_OK, "backward: %s", syncbn_strerror(rc));
    }
    memcpy(o->rm, syncbn_running_mean(l), sizeof(float) * (size_t)sh.C);
    memcpy(o->rv, syncbn_running_var(l), sizeof(float) * (size_t)sh.C);
    syncbn_destroy(l);
    free(x), free(dy);
}

enum { NSPLITS = 7 };

/* Compares one distributed run with the 1-rank answer; returns 1 if all bytes match. */
static int same(const outputs *whole, const outputs *part, shape sh, int64_t lo, int64_t n)
{
    const int64_t per = sh.C * sh.S, len = n * per, all = sh.B * per;
    int eq = 1;
    for (int step = 0; step < STEPS; step++) {
        eq &= memcmp(part->y + step * len, whole->y + step * all + lo * per, sizeof(float) * (size_t)len) == 0;
        eq &= memcmp(part->dx + step * len, whole->dx + step * all + lo * per, sizeof(float) * (size_t)len) == 0;
    }
    eq &= memcmp(part->dw, whole->dw, sizeof(float) * (size_t)(STEPS * sh.C)) == 0;
    eq &= memcmp(part->db, whole->db, sizeof(float) * (size_t)(STEPS * sh.C)) == 0;
    eq &= memcmp(part->rm, whole->rm, sizeof(float) * (size_t)sh.C) == 0;
    eq &= memcmp(part->rv, whole->rv, sizeof(float) * (size_t)sh.C) == 0;
    return eq;
}

/* Returns the number of (split, threads) runs in mode `red` that differ from the
 * 1-rank answer on some rank. */
static int differing_runs(shape sh, syncbn_reduction red)
{
    outputs whole;
    outputs_alloc(&whole, sh.B * sh.C * sh.S, sh.C);
    omp_set_num_threads(1);
    run(sh, red, MPI_COMM_SELF, 0, sh.B, &whole);
    int differing = 0;
    for (int k = 0; k < NSPLITS; k++)
        for (int threads = 1; threads <= 2; threads++) {
            int64_t lo, n;
            tu_split(k, sh.B, &lo, &n);
            outputs part;
            outputs_alloc(&part, n * sh.C * sh.S, sh.C);
            omp_set_num_threads(threads);
            run(sh, red, MPI_COMM_WORLD, lo, n, &part);
            int eq = same(&whole, &part, sh, lo, n), all_eq = 0;
            MPI_Allreduce(&eq, &all_eq, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
            differing += !all_eq;
            if (red == SYNCBN_REPRODUCIBLE)
                TU_EXPECT(eq, "reproducible result differs from 1 rank: B=%lld C=%lld S=%lld %s split %d threads %d",
                          (long long)sh.B, (long long)sh.C, (long long)sh.S, sh.layout ? "NHWC" : "NCHW", k, threads);
            outputs_free(&part);
        }
    omp_set_num_threads(1);
    outputs_free(&whole);
    return differing;
}

/* Reproducible mode must match the 1-rank answer everywhere. With `show_fast` the
 * batch is large enough that plain double sums must differ for some split when
 * P > 1, which FAST then has to show (with a handful of samples, every grouping
 * can happen to round alike, so small shapes do not ask for it). */
static void contract(shape sh, int show_fast)
{
    differing_runs(sh, SYNCBN_REPRODUCIBLE);
    int fast_diff = differing_runs(sh, SYNCBN_FAST);
    if (show_fast && tu_nranks > 1)
        TU_EXPECT(fast_diff > 0, "FAST never differed: the test data do not exercise reproducibility");
    tu_verdict();
}

START_TEST(bitwise_nchw_small) { contract((shape){9, 5, 7, SYNCBN_NCHW}, 0); }
END_TEST
START_TEST(bitwise_nhwc_small) { contract((shape){9, 5, 7, SYNCBN_NHWC}, 0); }
END_TEST
START_TEST(bitwise_spatial_one) { contract((shape){61, 19, 1, SYNCBN_NHWC}, 1); }
END_TEST
START_TEST(bitwise_many_samples) { contract((shape){60, 4, 5, SYNCBN_NCHW}, 1); }
END_TEST
/* Big enough (> 2^15 elements) for the kernels to actually run on 2 threads. */
START_TEST(bitwise_nchw_threads) { contract((shape){10, 12, 300, SYNCBN_NCHW}, 1); }
END_TEST
START_TEST(bitwise_nhwc_threads) { contract((shape){10, 40, 100, SYNCBN_NHWC}, 1); }
END_TEST

/* Accuracy: reproducible mode is at least as accurate as FAST against float64, on
 * x = 1000 + N(0,1) (channel 0 excluded: its per-sample partials absorb small terms
 * in both modes alike). */
static double max_err(syncbn_reduction red, shape sh)
{
    outputs o;
    outputs_alloc(&o, sh.B * sh.C * sh.S, sh.C);
    run(sh, red, MPI_COMM_SELF, 0, sh.B, &o);
    double worst = 0;
    const double N = (double)(sh.B * sh.S);
    for (int64_t c = 1; c < sh.C; c++) {
        double m = 0, v = 0;
        for (int64_t i = 0; i < sh.B; i++)
            for (int64_t s = 0; s < sh.S; s++)
                m += value(0, i, c, s, 0);
        m /= N;
        for (int64_t i = 0; i < sh.B; i++)
            for (int64_t s = 0; s < sh.S; s++)
                v += pow(value(0, i, c, s, 0) - m, 2);
        v /= N;
        const double w = (float)(0.5 + tu_uniform((uint64_t)c)), b = (float)c / 8;
        for (int64_t i = 0; i < sh.B; i++)
            for (int64_t s = 0; s < sh.S; s++) {
                double ref = (value(0, i, c, s, 0) - m) / sqrt(v + 1e-5) * w + b;
                double e = fabs(o.y[at(sh, i, c, s)] - ref) / (fabs(ref) > 1 ? fabs(ref) : 1);
                worst = e > worst ? e : worst;
            }
    }
    outputs_free(&o);
    return worst;
}

START_TEST(accuracy_vs_fast)
{
    shape sh = {16, 8, 49, SYNCBN_NCHW};
    double fast = max_err(SYNCBN_FAST, sh), repro = max_err(SYNCBN_REPRODUCIBLE, sh);
    TU_EXPECT(repro <= 1e-6 && repro <= fast + 1e-7, "reproducible max rel error %.3g, fast %.3g", repro, fast);
    tu_verdict();
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("reproducible");
    TCase *tc = tcase_create("bitwise");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, bitwise_nchw_small);
    tcase_add_test(tc, bitwise_nhwc_small);
    tcase_add_test(tc, bitwise_spatial_one);
    tcase_add_test(tc, bitwise_many_samples);
    tcase_add_test(tc, bitwise_nchw_threads);
    tcase_add_test(tc, bitwise_nhwc_threads);
    tcase_add_test(tc, accuracy_vs_fast);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, make_suite); }
