/*
 * test_misuse.c - bad input and desynchronized ranks beyond tests/test_layer.c's
 * errors_* tests: every argument check at its boundary, applied on ONE rank at a
 * time; configurations differing in each field; a different spatial size on one
 * rank; non-finite input in both reduction modes; backward with another shape; and
 * layers called out of step in REPRODUCIBLE mode too.
 *
 * Every error must be (1) the expected code, (2) the SAME code on every rank
 * (checked with an extra MPI_Allreduce of the codes, not only per rank), and
 * (3) leave weight, bias, running statistics and num_batches_tracked bitwise
 * unchanged.
 *
 * What these tests do not do, because without a timeout the library cannot detect
 * it (syncbn.h): a rank that makes FEWER collective calls than the others (skips a
 * layer and stops), a NULL layer handle or MPI_COMM_NULL on only one rank (that rank
 * returns at once, the others wait in the allreduce), and out-of-step calls whose
 * messages differ in size. Those would hang here; with a timeout they are detected,
 * and tests/test_timeout.c runs them.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "syncbn.h"
#include "testutil.h"

/* Asserts the code on this rank and that all ranks got the same one. Collective. */
static void expect_all(int rc, int want, const char *what, int line)
{
    int lo, hi;
    MPI_Allreduce(&rc, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&rc, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    TU_EXPECT(rc == want, "line %d: %s returned %s, expected %s", line, what, syncbn_strerror(rc),
              syncbn_strerror(want));
    TU_EXPECT(lo == hi, "line %d: %s: ranks returned different codes (%d .. %d)", line, what, lo, hi);
}
#define EXPECT_ALL(call, want) expect_all((call), (want), #call, __LINE__)

/* ---- layer state as bytes ---- */

static void expect_unchanged(syncbn_layer *l, tu_image before, int line)
{
    tu_image now = tu_take_image(l);
    TU_EXPECT(tu_same_image(now, before),
              "line %d: a failed call changed the layer", line);
    free(now.bytes);
}
#define EXPECT_UNCHANGED(l, im) expect_unchanged((l), (im), __LINE__)

/* Rank-dependent finite input with n*C*S elements. */
static float *make_x(int64_t count, uint64_t salt)
{
    float *x = malloc((size_t)(count + 1) * sizeof *x);
    for (int64_t e = 0; e < count; e++)
        x[e] = (float)(1 + tu_normal(salt * 1000003u + (uint64_t)tu_rank * 7919u + (uint64_t)e));
    return x;
}

/* ---- create ---- */

/* Each invalid value, on every rank and then on one rank only: EINVAL everywhere. */
START_TEST(create_invalid_fields)
{
    const syncbn_config base = syncbn_config_default(4);
    syncbn_config bad[15];
    int nb = 0;
    bad[nb] = base, bad[nb++].channels = 0;
    bad[nb] = base, bad[nb++].channels = -3;
    bad[nb] = base, bad[nb++].channels = INT64_MIN;
    bad[nb] = base, bad[nb++].channels = ((int64_t)1 << 25) + 1; /* message would exceed INT_MAX words */
    bad[nb] = base, bad[nb++].eps = NAN;
    bad[nb] = base, bad[nb++].eps = INFINITY;
    bad[nb] = base, bad[nb++].eps = -1e-5;
    bad[nb] = base, bad[nb++].eps = -0.0;
    bad[nb] = base, bad[nb++].momentum = -0.1;
    bad[nb] = base, bad[nb++].momentum = 1.0000001;
    bad[nb] = base, bad[nb++].momentum = INFINITY;
    bad[nb] = base, bad[nb++].momentum = -INFINITY;
    bad[nb] = base, bad[nb++].layout = (syncbn_layout)2;
    bad[nb] = base, bad[nb++].reduction = (syncbn_reduction)2;
    bad[nb] = base, bad[nb++].layout = (syncbn_layout)-1;
    for (int k = 0; k < nb; k++) {
        syncbn_layer *l = (syncbn_layer *)&l; /* must be reset to NULL */
        EXPECT_ALL(syncbn_create(&bad[k], MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
        TU_EXPECT(l == NULL, "case %d: *out not NULL after a failed create", k);
        const int culprit = k % tu_nranks;
        EXPECT_ALL(syncbn_create(tu_rank == culprit ? &bad[k] : &base, MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
        TU_EXPECT(l == NULL, "case %d: *out not NULL after a failed create", k);
    }
    /* out == NULL on one rank */
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&base, MPI_COMM_WORLD, tu_rank == tu_nranks - 1 ? NULL : &l), SYNCBN_EINVAL);
    TU_EXPECT(l == NULL, "*out set although another rank failed");

    /* The boundaries that are valid: momentum 0, 1 and NaN; the smallest eps. */
    syncbn_config good[4] = {base, base, base, base};
    good[0].momentum = 0, good[1].momentum = 1, good[2].momentum = NAN, good[3].eps = 4.9e-324;
    for (int k = 0; k < 4; k++) {
        EXPECT_ALL(syncbn_create(&good[k], MPI_COMM_WORLD, &l), SYNCBN_OK);
        syncbn_destroy(l);
    }
    /* The failures above left the shared communicator usable: a layer still works. */
    EXPECT_ALL(syncbn_create(&base, MPI_COMM_WORLD, &l), SYNCBN_OK);
    float *x = make_x(2 * 4 * 3, 1), y[24];
    EXPECT_ALL(syncbn_forward(l, x, 2, 3, 1, y), SYNCBN_OK);
    syncbn_destroy(l);
    free(x);
    tu_verdict();
}
END_TEST

/* One rank differs in one field: EMISMATCH everywhere, for every field. Values
 * that mean the same thing (any NaN momentum, any nonzero flag) must agree. */
START_TEST(create_mismatch_every_field)
{
    const syncbn_config base = syncbn_config_default(4);
    syncbn_config other[9];
    const char *name[9] = {"channels", "eps", "momentum", "momentum NaN vs 0.1", "affine", "track_running_stats",
                           "layout", "reduction", "channels by 2^16"};
    for (int k = 0; k < 9; k++)
        other[k] = base;
    other[0].channels = 5;
    other[1].eps = 1e-5 * (1 + 1e-15); /* one ulp-ish: bitwise comparison */
    other[2].momentum = 0.2;
    other[3].momentum = NAN;
    other[4].affine = 0;
    other[5].track_running_stats = 0;
    other[6].layout = SYNCBN_NHWC;
    other[7].reduction = SYNCBN_REPRODUCIBLE;
    other[8].channels = 4 + 65536; /* differs only in the second 16-bit agreement piece */
    for (int k = 0; k < 9 && tu_nranks > 1; k++) {
        const int culprit = 1 + k % (tu_nranks - 1);
        syncbn_layer *l = NULL;
        int rc = syncbn_create(tu_rank == culprit ? &other[k] : &base, MPI_COMM_WORLD, &l);
        expect_all(rc, SYNCBN_EMISMATCH, name[k], __LINE__);
        TU_EXPECT(l == NULL, "%s: *out not NULL after EMISMATCH", name[k]);
        /* and the reverse: one rank keeps the base, all others differ */
        rc = syncbn_create(tu_rank == 0 ? &base : &other[k], MPI_COMM_WORLD, &l);
        expect_all(rc, SYNCBN_EMISMATCH, name[k], __LINE__);
        syncbn_destroy(l);
    }
    /* same meaning, different bits: accepted */
    syncbn_config a = base, b = base;
    a.momentum = NAN, b.momentum = -NAN;
    a.affine = 1, b.affine = 7;
    a.track_running_stats = 1, b.track_running_stats = -1;
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(tu_rank % 2 ? &b : &a, MPI_COMM_WORLD, &l), SYNCBN_OK);
    syncbn_config got;
    syncbn_get_config(l, &got);
    TU_EXPECT(got.affine == 1 && got.track_running_stats == 1 && syncbn_weight(l) && syncbn_running_mean(l),
              "flags normalized to 0/1");
    syncbn_destroy(l);
    tu_verdict();
}
END_TEST

/* ---- forward: bad shapes on one rank ---- */

static void forward_bad_shapes(syncbn_reduction red, syncbn_layout layout)
{
    syncbn_config cfg = syncbn_config_default(3);
    cfg.reduction = red, cfg.layout = layout;
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    const int64_t n = 2, S = 4, C = 3;
    float *x = make_x(n * C * S, 2), *y = malloc(sizeof(float) * (size_t)(n * C * S));
    EXPECT_ALL(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK); /* some state worth protecting */
    tu_image before = tu_take_image(l);

    struct { int64_t n, S; int xnull, ynull; } cases[] = {
        {1, INT64_MAX / 3 + 1, 0, 0},     /* C*S overflows */
        {2, INT64_MAX / 6 + 1, 0, 0},     /* n*C*S overflows, C*S does not */
        {INT64_MAX, 1, 0, 0},             /* n*C overflows */
        {(INT64_MAX / 3) / 4 + 1, 4, 0, 0}, /* just past the limit */
        {-1, 4, 0, 0},
        {INT64_MIN, 4, 0, 0},
        {2, 0, 0, 0},
        {2, -4, 0, 0},
        {0, 0, 0, 0},                     /* S is checked even when n == 0 */
        {2, 4, 0, 1},                     /* y NULL with n > 0 */
    };
    const int nc = (int)(sizeof cases / sizeof cases[0]);
    for (int k = 0; k < nc; k++) {
        const int culprit = k % tu_nranks;
        const int me = tu_rank == culprit;
        int rc = syncbn_forward(l, me && cases[k].xnull ? NULL : x, me ? cases[k].n : n, me ? cases[k].S : S, 1,
                                me && cases[k].ynull ? NULL : y);
        char what[64];
        snprintf(what, sizeof what, "forward bad shape case %d on rank %d", k, culprit);
        expect_all(rc, SYNCBN_EINVAL, what, __LINE__);
        EXPECT_UNCHANGED(l, before);
        /* the same locally in eval mode (not collective) */
        if (me)
            TU_EXPECT(syncbn_forward(l, cases[k].xnull ? NULL : x, cases[k].n, cases[k].S, 0,
                                     cases[k].ynull ? NULL : y) == SYNCBN_EINVAL,
                      "eval forward case %d", k);
    }
    /* n == 0 with NULL buffers is fine (a rank may hold no samples) */
    EXPECT_ALL(syncbn_forward(l, tu_rank == 0 ? x : NULL, tu_rank == 0 ? n : 0, S, 1, tu_rank == 0 ? y : NULL),
               SYNCBN_OK);
    free(before.bytes), free(x), free(y);
    syncbn_destroy(l);
}

START_TEST(forward_bad_shapes_fast) { forward_bad_shapes(SYNCBN_FAST, SYNCBN_NCHW); tu_verdict(); }
END_TEST
START_TEST(forward_bad_shapes_reproducible) { forward_bad_shapes(SYNCBN_REPRODUCIBLE, SYNCBN_NHWC); tu_verdict(); }
END_TEST

/* ---- a different spatial size on one rank ---- */

static void spatial_mismatch(syncbn_reduction red)
{
    syncbn_config cfg = syncbn_config_default(2);
    cfg.reduction = red;
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    float *x = make_x(64, 3), y[64];
    tu_image before = tu_take_image(l);
    if (tu_nranks > 1) {
        /* same element count n*S on every rank, different S on rank 1 */
        const int odd = tu_rank == 1;
        EXPECT_ALL(syncbn_forward(l, x, odd ? 1 : 2, odd ? 8 : 4, 1, y), SYNCBN_EMISMATCH);
        EXPECT_UNCHANGED(l, before);
        /* every rank a different S */
        EXPECT_ALL(syncbn_forward(l, x, 1, 1 + tu_rank, 1, y), SYNCBN_EMISMATCH);
        /* S differing only in a high 16-bit piece */
        EXPECT_ALL(syncbn_forward(l, x, 0, tu_rank == 1 ? 4 + ((int64_t)1 << 40) : 4, 1, y), SYNCBN_EMISMATCH);
        EXPECT_UNCHANGED(l, before);
        /* a rank with no samples still passes its S, and must agree too */
        EXPECT_ALL(syncbn_forward(l, x, tu_rank == 1 ? 0 : 2, tu_rank == 1 ? 5 : 4, 1, y), SYNCBN_EMISMATCH);
        EXPECT_UNCHANGED(l, before);
    }
    /* the layer is still usable and in step */
    EXPECT_ALL(syncbn_forward(l, x, 2, 4, 1, y), SYNCBN_OK);
    free(before.bytes), free(x);
    syncbn_destroy(l);
}

START_TEST(spatial_mismatch_fast) { spatial_mismatch(SYNCBN_FAST); tu_verdict(); }
END_TEST
START_TEST(spatial_mismatch_reproducible) { spatial_mismatch(SYNCBN_REPRODUCIBLE); tu_verdict(); }
END_TEST

/* ---- non-finite input during training ---- */

static void nonfinite(syncbn_reduction red, syncbn_layout layout, double momentum)
{
    syncbn_config cfg = syncbn_config_default(5);
    cfg.reduction = red, cfg.layout = layout, cfg.momentum = momentum;
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    const int64_t n = 3, S = 2, C = 5, count = n * C * S;
    float *x = make_x(count, 4), *y = malloc(sizeof(float) * (size_t)count);
    float *dx = malloc(sizeof(float) * (size_t)count), dw[5], db[5];
    EXPECT_ALL(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    tu_image before = tu_take_image(l);
    const float bad[4] = {NAN, INFINITY, -INFINITY, -NAN};
    for (int k = 0; k < 4; k++) {
        const int culprit = k % tu_nranks;
        const int64_t at = (k * 7) % count; /* different channels and positions */
        const float keep = x[at];
        if (tu_rank == culprit)
            x[at] = bad[k];
        EXPECT_ALL(syncbn_forward(l, x, n, S, 1, y), SYNCBN_ENONFINITE);
        EXPECT_UNCHANGED(l, before);
        x[at] = keep;
    }
    /* +Inf on one rank and -Inf on another: the sum is NaN, still ENONFINITE */
    if (tu_nranks > 1) {
        const float keep = x[1];
        if (tu_rank < 2)
            x[1] = tu_rank ? -INFINITY : INFINITY;
        EXPECT_ALL(syncbn_forward(l, x, n, S, 1, y), SYNCBN_ENONFINITE);
        EXPECT_UNCHANGED(l, before);
        x[1] = keep;
    }
    /* Backward: Inf in dy on one rank. Needs the last training forward to be a good
     * one (see backward_after_failed_forward for why). */
    EXPECT_ALL(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    free(before.bytes);
    before = tu_take_image(l);
    float *dy = make_x(count, 5);
    if (tu_rank == tu_nranks - 1)
        dy[count - 1] = INFINITY;
    EXPECT_ALL(syncbn_backward(l, x, dy, n, S, dx, dw, db), SYNCBN_ENONFINITE);
    EXPECT_UNCHANGED(l, before);
    dy[count - 1] = 0.5f;
    EXPECT_ALL(syncbn_backward(l, x, dy, n, S, dx, dw, db), SYNCBN_OK);
    TU_EXPECT(syncbn_num_batches_tracked(l) == 2, "num_batches_tracked %lld",
              (long long)syncbn_num_batches_tracked(l));
    free(before.bytes), free(x), free(y), free(dx), free(dy);
    syncbn_destroy(l);
}

START_TEST(nonfinite_fast)
{
    nonfinite(SYNCBN_FAST, SYNCBN_NCHW, 0.1);
    nonfinite(SYNCBN_FAST, SYNCBN_NHWC, NAN);
    tu_verdict();
}
END_TEST

START_TEST(nonfinite_reproducible)
{
    nonfinite(SYNCBN_REPRODUCIBLE, SYNCBN_NCHW, NAN);
    nonfinite(SYNCBN_REPRODUCIBLE, SYNCBN_NHWC, 0.1);
    tu_verdict();
}
END_TEST

/* ---- backward with another shape than the forward ---- */

static void backward_other_shape(syncbn_reduction red)
{
    syncbn_config cfg = syncbn_config_default(3);
    cfg.reduction = red;
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    const int64_t n = 2, S = 4;
    float *x = make_x(64, 6), *y = malloc(64 * sizeof(float)), *dx = malloc(64 * sizeof(float)), dw[3], db[3];
    EXPECT_ALL(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    tu_image before = tu_take_image(l);
    EXPECT_ALL(syncbn_backward(l, x, x, n, 2, dx, dw, db), SYNCBN_ESTATE);         /* other S, all ranks */
    EXPECT_ALL(syncbn_backward(l, x, x, n + 1, S, dx, dw, db), SYNCBN_ESTATE);     /* other n, all ranks */
    EXPECT_ALL(syncbn_backward(l, x, x, 1, 8, dx, dw, db), SYNCBN_ESTATE);         /* same n*S */
    EXPECT_ALL(syncbn_backward(l, x, x, tu_rank == tu_nranks - 1 ? 0 : n, S, dx, dw, db), SYNCBN_ESTATE);
    EXPECT_ALL(syncbn_backward(l, x, x, n, tu_rank == 0 ? 2 : S, dx, dw, db), SYNCBN_ESTATE);
    EXPECT_UNCHANGED(l, before);
    /* none of that consumed the saved statistics */
    EXPECT_ALL(syncbn_backward(l, x, x, n, S, dx, dw, db), SYNCBN_OK);
    free(before.bytes), free(x), free(y), free(dx);
    syncbn_destroy(l);
}

START_TEST(backward_other_shape_fast) { backward_other_shape(SYNCBN_FAST); tu_verdict(); }
END_TEST
START_TEST(backward_other_shape_reproducible) { backward_other_shape(SYNCBN_REPRODUCIBLE); tu_verdict(); }
END_TEST

/* After a FAILED training forward, the statistics of the previous successful one are
 * no longer "the matching training forward": backward must answer ESTATE, or it
 * silently computes gradients with another batch's mean and invstd. */
START_TEST(backward_after_failed_forward)
{
    syncbn_config cfg = syncbn_config_default(3);
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    const int64_t n = 2, S = 4;
    float *x1 = make_x(24, 7), *x2 = make_x(24, 8), y[24], dx[24];
    EXPECT_ALL(syncbn_forward(l, x1, n, S, 1, y), SYNCBN_OK);
    x2[0] = tu_rank == 0 ? NAN : x2[0];
    EXPECT_ALL(syncbn_forward(l, x2, n, S, 1, y), SYNCBN_ENONFINITE);
    int rc = syncbn_backward(l, x2, x2, n, S, dx, NULL, NULL);
    int lo, hi;
    MPI_Allreduce(&rc, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&rc, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    TU_EXPECT(lo == hi, "backward after a failed forward: codes differ across ranks");
    /* A failed training forward invalidates the previous one's statistics. */
    TU_EXPECT(rc == SYNCBN_ESTATE, "backward after a failed training forward returned %s, expected ESTATE",
              syncbn_strerror(rc));
    /* Silent variant: forward on x2 fails because ANOTHER rank passed a bad n; a
     * backward on x2 must not reuse x1's mean/invstd (that would be wrong gradients). */
    x2[0] = 0.25f;
    EXPECT_ALL(syncbn_forward(l, x1, n, S, 1, y), SYNCBN_OK);
    EXPECT_ALL(syncbn_forward(l, x2, tu_rank == tu_nranks - 1 ? -1 : n, S, 1, y), SYNCBN_EINVAL);
    rc = syncbn_backward(l, x2, x2, n, S, dx, NULL, NULL);
    TU_EXPECT(rc == SYNCBN_ESTATE, "backward after an EINVAL forward returned %s, expected ESTATE",
              syncbn_strerror(rc));
    free(x1), free(x2);
    syncbn_destroy(l);
    tu_verdict();
}
END_TEST

/* -0.0 and 0.0 momentum are the same configuration; finite input so large that the
 * running variance would overflow float is refused, with nothing changed. */
START_TEST(momentum_signed_zero_and_float_overflow)
{
    syncbn_config cfg = syncbn_config_default(3);
    cfg.momentum = tu_rank % 2 ? -0.0 : 0.0;
    syncbn_layer *l = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    syncbn_destroy(l);
    cfg.momentum = 0.1;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    float x[3 * 4], y[3 * 4];
    for (int e = 0; e < 12; e++)
        x[e] = (e % 2 ? 3e38f : -3e38f); /* variance ~9e76: fine in double, not in float */
    tu_image before = tu_take_image(l);
    EXPECT_ALL(syncbn_forward(l, x, 2, 2, 1, y), SYNCBN_ENONFINITE);
    EXPECT_UNCHANGED(l, before);
    free(before.bytes);
    syncbn_destroy(l);
    tu_verdict();
}
END_TEST

/* ---- out-of-step layers ---- */

static void out_of_step(syncbn_reduction red)
{
    if (tu_nranks < 2)
        return;
    syncbn_config cfg = syncbn_config_default(3);
    cfg.reduction = red;
    syncbn_layer *a = NULL, *b = NULL, *c = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &a), SYNCBN_OK);
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &b), SYNCBN_OK);
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &c), SYNCBN_OK);
    float *x = make_x(24, 9), y[24], dx[24];
    tu_image ia = tu_take_image(a), ib = tu_take_image(b);
    /* rank 0 on layer a, the others on layer b (the PyTorch "rank skips a layer" case) */
    EXPECT_ALL(syncbn_forward(tu_rank == 0 ? a : b, x, 2, 4, 1, y), SYNCBN_EMISMATCH);
    EXPECT_UNCHANGED(a, ia);
    EXPECT_UNCHANGED(b, ib);
    /* three layers spread over the ranks */
    syncbn_layer *mine = tu_rank % 3 == 0 ? a : tu_rank % 3 == 1 ? b : c;
    EXPECT_ALL(syncbn_forward(mine, x, 2, 4, 1, y), SYNCBN_EMISMATCH);

    /* on a fresh pair: a forward on one rank meeting a backward on the others */
    syncbn_layer *d = NULL;
    EXPECT_ALL(syncbn_create(&cfg, MPI_COMM_WORLD, &d), SYNCBN_OK);
    EXPECT_ALL(syncbn_forward(d, x, 2, 4, 1, y), SYNCBN_OK);
    tu_image id = tu_take_image(d);
    int rc = tu_rank == 0 ? syncbn_forward(d, x, 2, 4, 1, y) : syncbn_backward(d, x, x, 2, 4, dx, NULL, NULL);
    expect_all(rc, SYNCBN_EMISMATCH, "forward meeting backward", __LINE__);
    EXPECT_UNCHANGED(d, id);
    free(ia.bytes), free(ib.bytes), free(id.bytes), free(x);
    syncbn_destroy(d);
    syncbn_destroy(c), syncbn_destroy(b), syncbn_destroy(a);
}

START_TEST(out_of_step_fast) { out_of_step(SYNCBN_FAST); tu_verdict(); }
END_TEST
START_TEST(out_of_step_reproducible) { out_of_step(SYNCBN_REPRODUCIBLE); tu_verdict(); }
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("misuse");
    TCase *tc = tcase_create("misuse");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, create_invalid_fields);
    tcase_add_test(tc, create_mismatch_every_field);
    tcase_add_test(tc, forward_bad_shapes_fast);
    tcase_add_test(tc, forward_bad_shapes_reproducible);
    tcase_add_test(tc, spatial_mismatch_fast);
    tcase_add_test(tc, spatial_mismatch_reproducible);
    tcase_add_test(tc, nonfinite_fast);
    tcase_add_test(tc, nonfinite_reproducible);
    tcase_add_test(tc, backward_other_shape_fast);
    tcase_add_test(tc, backward_other_shape_reproducible);
    tcase_add_test(tc, backward_after_failed_forward);
    tcase_add_test(tc, momentum_signed_zero_and_float_overflow);
    tcase_add_test(tc, out_of_step_fast);
    tcase_add_test(tc, out_of_step_reproducible);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, make_suite); }
