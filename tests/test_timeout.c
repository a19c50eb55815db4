/*
 * test_timeout.c - the deadline (cfg.timeout) under real mpirun: the cases that hang
 * without a timeout (a rank skips a forward, a backward or a create, or passes a NULL
 * layer) end in SYNCBN_ETIMEOUT within timeout + 2 s on every rank that called;
 * later calls on that communicator answer at once without MPI; destroy returns; a
 * rank that comes late also ends in SYNCBN_ETIMEOUT. Out-of-step calls with messages
 * of different sizes end in SYNCBN_EMISMATCH or SYNCBN_ETIMEOUT (never a hang, never
 * a sanitizer report). A rank that is slow but within the deadline causes no false
 * timeout (results checked against a float64 reference written here). And the text
 * of syncbn_last_error for every code these tests can trigger, against sentences
 * written out here.
 *
 * Each scenario that times out works on its own MPI_Comm_dup of MPI_COMM_WORLD: a
 * timed-out communicator stays unusable for good (by design), the world does not.
 * Test bodies keep every rank's MPI_COMM_WORLD collectives in the same order.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "syncbn.h"
#include "testutil.h"

#define T 1.0       /* the timeout of these tests, seconds */
#define SLACK 2.0   /* the contract: ETIMEOUT within T + 2 s */
#define AT_ONCE 0.5 /* "at once": no waiting (generous for a loaded 2-core machine) */

/* n samples per rank, C channels, S positions: small and fixed. */
enum { N = 2, S = 4 };

static float *data(int64_t C, uint64_t salt) /* this rank's [N][C][S] slice of a global batch */
{
    float *x = malloc(sizeof(float) * (size_t)(N * C * S));
    for (int64_t i = 0; i < N; i++)
        for (int64_t e = 0; e < C * S; e++)
            x[i * C * S + e] = (float)tu_normal(salt * 7919u + (uint64_t)(tu_rank * N + i) * 65537u + (uint64_t)e);
    return x;
}

static syncbn_layer *make(MPI_Comm comm, int64_t C, syncbn_reduction red, double timeout)
{
    syncbn_config cfg = syncbn_config_default(C);
    cfg.reduction = red, cfg.timeout = timeout;
    syncbn_layer *l = NULL;
    int rc = syncbn_create(&cfg, comm, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create C = %lld: %s", (long long)C, syncbn_strerror(rc));
    return l;
}

static void expect_text(const char *got, const char *want, int line)
{
    TU_EXPECT(strcmp(got, want) == 0, "line %d: syncbn_last_error is \"%s\", expected \"%s\"", line, got, want);
}
#define EXPECT_TEXT(got, want) expect_text((got), (want), __LINE__)

/* The call waited at least the timeout (no early give-up) and at most T + SLACK. */
static void expect_timeout(int rc, double dt, const char *what, int line)
{
    TU_EXPECT(rc == SYNCBN_ETIMEOUT, "line %d: %s returned %s, expected ETIMEOUT", line, what, syncbn_strerror(rc));
    TU_EXPECT(dt >= T && dt <= T + SLACK, "line %d: %s took %.3f s, outside [%g, %g]", line, what, dt, T, T + SLACK);
}

static void expect_same_layer(syncbn_layer *l, tu_image before, const char *what)
{
    tu_image now = tu_take_image(l);
    TU_EXPECT(tu_same_image(before, now), "%s changed the layer", what);
    free(now.bytes);
}

static void expect_at_once(int rc, double dt, const char *what, int line)
{
    TU_EXPECT(rc == SYNCBN_ETIMEOUT, "line %d: %s returned %s, expected ETIMEOUT", line, what, syncbn_strerror(rc));
    TU_EXPECT(dt <= AT_ONCE, "line %d: %s took %.3f s on a timed-out communicator", line, what, dt);
}

#define TIMED(dt, call) (dt = MPI_Wtime(), rc = (call), dt = MPI_Wtime() - dt)

/* On a communicator that timed out on this rank: every collective call answers
 * ETIMEOUT at once, with the text naming the call that timed out; create too;
 * destroy returns at once. `first` names the call that timed out. */
static void check_poisoned(syncbn_layer *l, MPI_Comm comm, int64_t C, long long next_call, const char *first)
{
    float *x = data(C, 1), *y = malloc(sizeof(float) * (size_t)(N * C * S));
    double dt;
    int rc;
    tu_image before = tu_take_image(l);
    TIMED(dt, syncbn_forward(l, x, N, S, 1, y));
    expect_at_once(rc, dt, "forward after the timeout", __LINE__);
    char want[200];
    snprintf(want, sizeof want,
             "forward, call %lld of layer 0 (C = %lld): not attempted, this communicator timed out earlier (%s)",
             next_call, (long long)C, first);
    EXPECT_TEXT(syncbn_last_error(l), want);
    TIMED(dt, syncbn_backward(l, x, x, N, S, y, NULL, NULL));
    expect_at_once(rc, dt, "backward after the timeout", __LINE__);
    expect_same_layer(l, before, "a call on a timed-out communicator");
    /* eval mode is not collective and still works */
    TU_EXPECT(syncbn_forward(l, x, N, S, 0, y) == SYNCBN_OK, "eval forward after a timeout");
    syncbn_layer *other = (syncbn_layer *)&other;
    syncbn_config cfg = syncbn_config_default(C);
    cfg.timeout = T;
    TIMED(dt, syncbn_create(&cfg, comm, &other));
    expect_at_once(rc, dt, "create after the timeout", __LINE__);
    TU_EXPECT(other == NULL, "*out not NULL after ETIMEOUT");
    cfg.timeout = 0; /* even a layer without timeout: the communicator is gone */
    TIMED(dt, syncbn_create(&cfg, comm, &other));
    expect_at_once(rc, dt, "create (timeout 0) after the timeout", __LINE__);
    free(before.bytes), free(x), free(y);
}

static void destroy_at_once(syncbn_layer *l)
{
    double dt = MPI_Wtime();
    syncbn_destroy(l);
    dt = MPI_Wtime() - dt;
    TU_EXPECT(dt <= AT_ONCE, "destroy took %.3f s", dt);
}

/* ---- a rank skips a call ---- */

/* kind 0: the victim skips the third call, a forward; kind 1: a backward. */
static void skip(int kind, syncbn_reduction red, int victim)
{
    const int64_t C = 3;
    if (tu_nranks < 2)
        return;
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    syncbn_layer *l = make(comm, C, red, T);
    float *x = data(C, 2), *y = malloc(sizeof(float) * (size_t)(N * C * S));
    float *dx = malloc(sizeof(float) * (size_t)(N * C * S)), dw[3] = {7, 7, 7}, db[3] = {7, 7, 7};
    TU_EXPECT(syncbn_forward(l, x, N, S, 1, y) == SYNCBN_OK, "forward 1");
    TU_EXPECT(syncbn_backward(l, x, x, N, S, dx, dw, db) == SYNCBN_OK, "backward 2");
    if (kind == 1)
        TU_EXPECT(syncbn_forward(l, x, N, S, 1, y) == SYNCBN_OK, "forward 3");
    const char *name = kind ? "backward" : "forward";
    const long long call = kind ? 4 : 3;
    char first[64], want[200];
    snprintf(first, sizeof first, "%s, call %lld of layer 0", name, call);
    snprintf(want, sizeof want, "%s, call %lld of layer 0 (C = 3): no answer from the other ranks after 1.0 s", name,
             call);
    double dt;
    int rc;
    if (tu_rank != victim) {
        tu_image before = tu_take_image(l);
        for (int c = 0; c < 3; c++)
            dw[c] = db[c] = -1;
        if (kind == 0)
            TIMED(dt, syncbn_forward(l, x, N, S, 1, y));
        else
            TIMED(dt, syncbn_backward(l, x, x, N, S, dx, dw, db));
        expect_timeout(rc, dt, name, __LINE__);
        expect_same_layer(l, before, "ETIMEOUT");
        for (int c = 0; c < 3; c++)
            TU_EXPECT(dw[c] == -1 && db[c] == -1, "ETIMEOUT wrote dweight/dbias");
        EXPECT_TEXT(syncbn_last_error(l), want);
        check_poisoned(l, comm, C, call, first);
        free(before.bytes);
    }
    /* The victim comes late, after the others gave up. Its call may still meet the
     * message they left behind: for a one-message call (FAST, C <= 64) that call can
     * then succeed, with the others' contributions to it; but it is the last one,
     * the next times out. A two-message call times out (the data never comes). */
    MPI_Barrier(MPI_COMM_WORLD);
    if (tu_rank == victim) {
        for (int late = 0; late < 2; late++) {
            if (kind == 0)
                TIMED(dt, syncbn_forward(l, x, N, S, 1, y));
            else
                TIMED(dt, syncbn_backward(l, x, x, N, S, dx, dw, db));
            TU_EXPECT(rc == SYNCBN_ETIMEOUT || (rc == SYNCBN_OK && late == 0 && red == SYNCBN_FAST),
                      "late call %d returned %s", late, syncbn_strerror(rc));
            TU_EXPECT(dt <= T + SLACK, "late call %d took %.3f s", late, dt);
            if (rc == SYNCBN_ETIMEOUT) {
                snprintf(want, sizeof want, "%s, call %lld of layer 0 (C = 3): no answer from the other ranks "
                         "after 1.0 s", name, call + late);
                EXPECT_TEXT(syncbn_last_error(l), want);
                TU_EXPECT(dt >= T, "late call %d gave up after %.3f s", late, dt);
                break;
            }
            if (kind == 1) /* a backward needs a forward before it */
                TU_EXPECT(syncbn_forward(l, x, N, S, 1, y) == SYNCBN_ETIMEOUT, "the call after a late success");
            if (kind == 1)
                break;
        }
    }
    destroy_at_once(l);
    MPI_Comm_free(&comm);
    free(x), free(y), free(dx);
}

START_TEST(skip_forward_fast) { skip(0, SYNCBN_FAST, tu_nranks - 1); tu_verdict(); }
END_TEST
START_TEST(skip_forward_reproducible) { skip(0, SYNCBN_REPRODUCIBLE, 0); tu_verdict(); }
END_TEST
START_TEST(skip_backward_fast) { skip(1, SYNCBN_FAST, 0); tu_verdict(); }
END_TEST
START_TEST(skip_backward_reproducible) { skip(1, SYNCBN_REPRODUCIBLE, tu_nranks / 2); tu_verdict(); }
END_TEST

/* One rank passes a NULL layer to a training forward: it gets EINVAL at once, the
 * others ETIMEOUT. */
START_TEST(null_layer)
{
    const int64_t C = 4;
    const int victim = tu_nranks / 2;
    if (tu_nranks < 2)
        return;
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    syncbn_layer *l = make(comm, C, SYNCBN_FAST, T);
    float *x = data(C, 3), *y = malloc(sizeof(float) * (size_t)(N * C * S));
    double dt;
    int rc;
    TIMED(dt, syncbn_forward(tu_rank == victim ? NULL : l, x, N, S, 1, y));
    if (tu_rank == victim) {
        TU_EXPECT(rc == SYNCBN_EINVAL && dt <= AT_ONCE, "NULL layer: %s after %.3f s", syncbn_strerror(rc), dt);
        EXPECT_TEXT(syncbn_last_error(NULL), "no layer (NULL handle)");
        EXPECT_TEXT(syncbn_last_error(l), ""); /* nothing happened to the real layer */
    } else {
        expect_timeout(rc, dt, "forward against a NULL layer", __LINE__);
        EXPECT_TEXT(syncbn_last_error(l), "forward, call 1 of layer 0 (C = 4): no answer from the other ranks after 1.0 s");
        check_poisoned(l, comm, C, 1, "forward, call 1 of layer 0");
    }
    destroy_at_once(l);
    MPI_Comm_free(&comm);
    free(x), free(y);
    tu_verdict();
}
END_TEST

/* One rank skips the create of a second layer. */
START_TEST(skip_create)
{
    const int victim = tu_nranks - 1;
    if (tu_nranks < 2)
        return;
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    syncbn_layer *a = make(comm, 2, SYNCBN_FAST, T), *b = (syncbn_layer *)&b;
    if (tu_rank != victim) {
        syncbn_config cfg = syncbn_config_default(6);
        cfg.timeout = T;
        double dt;
        int rc;
        TIMED(dt, syncbn_create(&cfg, comm, &b));
        expect_timeout(rc, dt, "create", __LINE__);
        TU_EXPECT(b == NULL, "*out not NULL after ETIMEOUT");
        check_poisoned(a, comm, 2, 1, "create of layer 1");
    }
    destroy_at_once(a);
    MPI_Comm_free(&comm);
    tu_verdict();
}
END_TEST

/* ---- out of step, messages of different sizes ---- */

static void expect_mismatch_or_timeout(int rc, double dt, const char *what, int line)
{
    TU_EXPECT(rc == SYNCBN_EMISMATCH || rc == SYNCBN_ETIMEOUT, "line %d: %s returned %s", line, what,
              syncbn_strerror(rc));
    TU_EXPECT(dt <= T + SLACK, "line %d: %s took %.3f s", line, what, dt);
}

/* Rank 0 calls layer a while the others call layer b, of another C (and mode); then
 * rank 0 creates a layer while the others run a backward. */
static void sizes(int64_t ca, syncbn_reduction ra, int64_t cb, syncbn_reduction rb)
{
    if (tu_nranks < 2)
        return;
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    syncbn_layer *a = make(comm, ca, ra, T), *b = make(comm, cb, rb, T);
    const int64_t C = tu_rank == 0 ? ca : cb;
    syncbn_layer *mine = tu_rank == 0 ? a : b;
    float *x = data(C, 4), *y = malloc(sizeof(float) * (size_t)(N * C * S));
    double dt;
    int rc;
    TIMED(dt, syncbn_forward(mine, x, N, S, 1, y));
    expect_mismatch_or_timeout(rc, dt, "forward on layers of different C", __LINE__);
    if (rc == SYNCBN_EMISMATCH) {
        char want[200];
        snprintf(want, sizeof want,
                 "forward, call 1 of layer %d (C = %lld): the ranks are not all in this call (layers or calls out of "
                 "step)", tu_rank == 0 ? 0 : 1, (long long)C);
        EXPECT_TEXT(syncbn_last_error(mine), want);
    }
    if (tu_rank == 0) {
        syncbn_config cfg = syncbn_config_default(ca + cb);
        cfg.timeout = T;
        syncbn_layer *c = (syncbn_layer *)&c;
        TIMED(dt, syncbn_create(&cfg, comm, &c));
        TU_EXPECT(c == NULL, "create out of step: *out not NULL");
    } else {
        TIMED(dt, syncbn_backward(b, x, x, N, S, y, NULL, NULL));
    }
    expect_mismatch_or_timeout(rc, dt, "create meeting a backward", __LINE__);
    destroy_at_once(b);
    destroy_at_once(a);
    MPI_Comm_free(&comm);
    free(x), free(y);
}

/* A create meeting a forward whose per-channel sums (a FAST layer with C <= 64 sends
 * them inside the call message) are negative and huge where the create expects its
 * configuration's agreement words: a clean EMISMATCH (or ETIMEOUT), and no
 * conversion of such a value to an integer (undefined; the sanitizer build checks
 * float-cast-overflow). */
START_TEST(create_meets_forward_data)
{
    if (tu_nranks < 2)
        return;
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    syncbn_layer *a = make(comm, 4, SYNCBN_FAST, T), *b = (syncbn_layer *)&b;
    float x[2 * 4], y[2 * 4];
    for (int e = 0; e < 8; e++)
        x[e] = -1e30f * (float)(e + 1);
    double dt;
    int rc;
    if (tu_rank == 0) {
        TIMED(dt, syncbn_forward(a, x, 2, 1, 1, y));
    } else {
        syncbn_config cfg = syncbn_config_default(4);
        cfg.timeout = T;
        TIMED(dt, syncbn_create(&cfg, comm, &b));
        TU_EXPECT(b == NULL, "create out of step: *out not NULL");
    }
    expect_mismatch_or_timeout(rc, dt, tu_rank == 0 ? "forward meeting a create" : "create meeting a forward",
                               __LINE__);
    destroy_at_once(a);
    MPI_Comm_free(&comm);
    tu_verdict();
}
END_TEST

START_TEST(sizes_fast_fast) { sizes(3, SYNCBN_FAST, 5, SYNCBN_FAST); tu_verdict(); }
END_TEST
START_TEST(sizes_fast_reproducible) { sizes(3, SYNCBN_FAST, 3, SYNCBN_REPRODUCIBLE); tu_verdict(); }
END_TEST
/* large messages (Open MPI switches algorithms with the size) */
START_TEST(sizes_large) { sizes(4000, SYNCBN_REPRODUCIBLE, 1, SYNCBN_FAST); tu_verdict(); }
END_TEST

/* ---- slow, but within the deadline ---- */

START_TEST(slow_within_deadline)
{
    const int64_t C = 3, P = tu_nranks, B = P * N;
    syncbn_layer *l = make(MPI_COMM_WORLD, C, SYNCBN_FAST, T);
    float *x = data(C, 5), *dy = data(C, 6), *y = malloc(sizeof(float) * (size_t)(N * C * S));
    float *dx = malloc(sizeof(float) * (size_t)(N * C * S)), dw[3], db[3];
    const struct timespec half = {0, (long)(T / 2 * 1e9)};
    if (tu_rank == P - 1)
        nanosleep(&half, NULL);
    int rc = syncbn_forward(l, x, N, S, 1, y);
    TU_EXPECT(rc == SYNCBN_OK, "forward with a slow rank: %s (%s)", syncbn_strerror(rc), syncbn_last_error(l));
    EXPECT_TEXT(syncbn_last_error(l), "");
    if (tu_rank == 0)
        nanosleep(&half, NULL);
    rc = syncbn_backward(l, x, dy, N, S, dx, dw, db);
    TU_EXPECT(rc == SYNCBN_OK, "backward with a slow rank: %s (%s)", syncbn_strerror(rc), syncbn_last_error(l));

    /* float64 reference over the global batch, rebuilt here from the generators */
    float *gx = malloc(sizeof(float) * (size_t)(B * C * S)), *gdy = malloc(sizeof(float) * (size_t)(B * C * S));
    MPI_Allgather(x, (int)(N * C * S), MPI_FLOAT, gx, (int)(N * C * S), MPI_FLOAT, MPI_COMM_WORLD);
    MPI_Allgather(dy, (int)(N * C * S), MPI_FLOAT, gdy, (int)(N * C * S), MPI_FLOAT, MPI_COMM_WORLD);
    const double cnt = (double)(B * S);
    for (int64_t c = 0; c < C; c++) {
        double m = 0, v = 0, sdy = 0, sdyx = 0;
        for (int64_t i = 0; i < B; i++)
            for (int64_t s = 0; s < S; s++)
                m += gx[(i * C + c) * S + s];
        m /= cnt;
        for (int64_t i = 0; i < B; i++)
            for (int64_t s = 0; s < S; s++)
                v += (gx[(i * C + c) * S + s] - m) * (gx[(i * C + c) * S + s] - m);
        v /= cnt;
        const double is = 1 / sqrt(v + 1e-5);
        for (int64_t i = 0; i < B; i++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t e = (i * C + c) * S + s;
                sdy += gdy[e], sdyx += gdy[e] * (gx[e] - m) * is;
            }
        TU_EXPECT(tu_close(dw[c], sdyx, 1e-5, 1e-3) && tu_close(db[c], sdy, 1e-5, 1e-3), "dweight/dbias channel %lld",
                  (long long)c);
        for (int64_t i = 0; i < N; i++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t e = (i * C + c) * S + s;
                const double xh = (x[e] - m) * is;
                TU_EXPECT(tu_close(y[e], xh, 1e-5, 1e-3), "y[%lld] = %g, reference %g", (long long)e, y[e], xh);
                const double ref = is * (dy[e] - sdy / cnt - xh * sdyx / cnt);
                TU_EXPECT(tu_close(dx[e], ref, 1e-4, 1e-3), "dx[%lld] = %g, reference %g", (long long)e, dx[e], ref);
            }
    }
    syncbn_destroy(l);
    free(x), free(dy), free(y), free(dx), free(gx), free(gdy);
    tu_verdict();
}
END_TEST

/* ---- the configuration field ---- */

START_TEST(timeout_config)
{
    const syncbn_config base = syncbn_config_default(2);
    TU_EXPECT(base.timeout == 0, "default timeout %g", base.timeout);
    TU_EXPECT(SYNCBN_ETIMEOUT == -10 &&
                  strcmp(syncbn_strerror(SYNCBN_ETIMEOUT), "other ranks did not join a collective call in time") == 0,
              "SYNCBN_ETIMEOUT in the error table");
    const double bad[4] = {NAN, INFINITY, -INFINITY, -1e-300};
    syncbn_layer *l = (syncbn_layer *)&l;
    for (int k = 0; k < 4; k++) {
        syncbn_config c = base;
        c.timeout = bad[k];
        /* one rank only: every rank learns of it (the others wait with their own timeout) */
        syncbn_config mine = tu_rank == k % tu_nranks ? c : base;
        mine.timeout = tu_rank == k % tu_nranks ? bad[k] : T;
        int rc = syncbn_create(&mine, MPI_COMM_WORLD, &l);
        TU_EXPECT(rc == SYNCBN_EINVAL && l == NULL, "timeout %g on one rank: %s", bad[k], syncbn_strerror(rc));
    }
    /* ranks must agree on the timeout, including 0 against > 0 */
    const double other[3] = {0, 2 * T, T * (1 + 1e-15)};
    for (int k = 0; k < 3 && tu_nranks > 1; k++) {
        syncbn_config c = base;
        c.timeout = tu_rank == 1 ? other[k] : T;
        int rc = syncbn_create(&c, MPI_COMM_WORLD, &l);
        TU_EXPECT(rc == SYNCBN_EMISMATCH && l == NULL, "timeout %g against %g: %s", other[k], T, syncbn_strerror(rc));
    }
    /* -0.0 is 0.0; the value is kept */
    syncbn_config c = base;
    c.timeout = tu_rank % 2 ? -0.0 : 0.0;
    TU_EXPECT(syncbn_create(&c, MPI_COMM_WORLD, &l) == SYNCBN_OK, "timeout -0.0 and 0.0 agree");
    syncbn_destroy(l);
    c.timeout = 1e300;
    TU_EXPECT(syncbn_create(&c, MPI_COMM_WORLD, &l) == SYNCBN_OK, "a huge finite timeout is valid");
    syncbn_config got;
    syncbn_get_config(l, &got);
    TU_EXPECT(got.timeout == 1e300, "get_config timeout %g", got.timeout);
    syncbn_destroy(l);
    tu_verdict();
}
END_TEST

/* ---- syncbn_last_error for every code a test can trigger ---- */

static void last_error_texts(double timeout)
{
    const int P = tu_nranks, last = P - 1;
    syncbn_config cfg = syncbn_config_default(3);
    cfg.timeout = timeout;
    syncbn_layer *l = NULL;
    TU_EXPECT(syncbn_create(&cfg, MPI_COMM_WORLD, &l) == SYNCBN_OK, "create");
    float *x = data(3, 7), y[N * 3 * S], dx[N * 3 * S], dw[3], db[3];
    char want[200];

    TU_EXPECT(syncbn_backward(l, x, x, N, S, dx, dw, db) == SYNCBN_ESTATE, "ESTATE");
    snprintf(want, sizeof want, "backward: no matching training forward (same n and spatial) on %d of %d ranks "
             "(this one among them)", P, P);
    EXPECT_TEXT(syncbn_last_error(l), want);

    TU_EXPECT(syncbn_forward(l, x, tu_rank == last ? -1 : N, S, 1, y) == SYNCBN_EINVAL, "EINVAL");
    snprintf(want, sizeof want, "forward: invalid argument (n, spatial, a NULL buffer, dweight/dbias without "
             "affine, or dz without z) on 1 of %d ranks%s", P, tu_rank == last ? " (this one among them)" : " (not this one)");
    EXPECT_TEXT(syncbn_last_error(l), want);

    TU_EXPECT(syncbn_forward(l, x, N, S, 1, y) == SYNCBN_OK, "OK");
    EXPECT_TEXT(syncbn_last_error(l), "");

    if (P > 1) {
        TU_EXPECT(syncbn_forward(l, x, N, tu_rank == 0 ? S / 2 : S, 1, y) == SYNCBN_EMISMATCH, "EMISMATCH");
        EXPECT_TEXT(syncbn_last_error(l), "forward: spatial differs between ranks");
    }
    TU_EXPECT(syncbn_forward(l, x, tu_rank == 0 ? 1 : 0, 1, 1, y) == SYNCBN_EEMPTY, "EEMPTY");
    EXPECT_TEXT(syncbn_last_error(l), "forward: the global count per channel is 1, below 2");

    const float keep = x[5];
    x[5] = tu_rank == last ? NAN : x[5];
    TU_EXPECT(syncbn_forward(l, x, N, S, 1, y) == SYNCBN_ENONFINITE, "ENONFINITE");
    EXPECT_TEXT(syncbn_last_error(l), "forward: NaN or Inf in the global batch statistics");
    x[5] = keep;
    TU_EXPECT(syncbn_forward(l, x, N, S, 1, y) == SYNCBN_OK, "OK");
    float *dy = data(3, 8);
    dy[0] = tu_rank == 0 ? INFINITY : dy[0];
    TU_EXPECT(syncbn_backward(l, x, dy, N, S, dx, dw, db) == SYNCBN_ENONFINITE, "ENONFINITE backward");
    EXPECT_TEXT(syncbn_last_error(l), "backward: NaN or Inf in the global gradient sums");
    float big[N * 3 * S];
    for (int e = 0; e < N * 3 * S; e++)
        big[e] = e % 2 ? 3e38f : -3e38f;
    TU_EXPECT(syncbn_forward(l, big, N, S, 1, y) == SYNCBN_ENONFINITE, "running overflow");
    EXPECT_TEXT(syncbn_last_error(l), "forward: the running statistics would overflow float");

    /* not collective */
    TU_EXPECT(syncbn_forward(l, x, -1, S, 0, y) == SYNCBN_EINVAL, "eval EINVAL");
    EXPECT_TEXT(syncbn_last_error(l), "forward (eval): invalid argument (n, spatial or a NULL buffer)");
    TU_EXPECT(syncbn_set_num_batches_tracked(l, -3) == SYNCBN_EINVAL, "set_num_batches_tracked");
    EXPECT_TEXT(syncbn_last_error(l), "set_num_batches_tracked: n = -3 is negative");
    TU_EXPECT(syncbn_load(l, "/nonexistent/syncbn.ck") == SYNCBN_EIO, "EIO");
    EXPECT_TEXT(syncbn_last_error(l), "load '/nonexistent/syncbn.ck': checkpoint file could not be read or written");
    char path[64];
    snprintf(path, sizeof path, "/tmp/syncbn_le_%d_%d.ck", (int)getpid(), tu_rank);
    FILE *f = fopen(path, "wb");
    fputs("not a checkpoint", f);
    fclose(f);
    TU_EXPECT(syncbn_load(l, path) == SYNCBN_EFORMAT, "EFORMAT");
    snprintf(want, sizeof want, "load '%s': checkpoint file is corrupt, truncated, or of another shape", path);
    EXPECT_TEXT(syncbn_last_error(l), want);
    TU_EXPECT(syncbn_save(l, path) == SYNCBN_OK, "save");
    EXPECT_TEXT(syncbn_last_error(l), "");
    TU_EXPECT(syncbn_save(l, "/nonexistent/dir/x.ck") == SYNCBN_EIO, "save EIO");
    EXPECT_TEXT(syncbn_last_error(l), "save '/nonexistent/dir/x.ck': checkpoint file could not be read or written");
    TU_EXPECT(syncbn_load(l, path) == SYNCBN_OK, "load");
    EXPECT_TEXT(syncbn_last_error(l), "");
    unlink(path);

    syncbn_config no_affine = syncbn_config_default(3);
    no_affine.affine = 0, no_affine.timeout = timeout;
    syncbn_layer *na = NULL;
    TU_EXPECT(syncbn_create(&no_affine, MPI_COMM_WORLD, &na) == SYNCBN_OK, "create");
    TU_EXPECT(syncbn_forward(na, x, N, S, 1, y) == SYNCBN_OK, "forward");
    TU_EXPECT(syncbn_backward(na, x, x, N, S, dx, tu_rank == 0 ? dw : NULL, NULL) == SYNCBN_EINVAL, "dweight");
    snprintf(want, sizeof want, "backward: invalid argument (n, spatial, a NULL buffer, dweight/dbias without "
             "affine, or dz without z) on 1 of %d ranks%s", P, tu_rank == 0 ? " (this one among them)" : " (not this one)");
    EXPECT_TEXT(syncbn_last_error(na), want);
    /* layers out of step (same size: detected with or without timeout) */
    if (P > 1) {
        TU_EXPECT(syncbn_forward(tu_rank == 0 ? l : na, x, N, S, 1, y) == SYNCBN_EMISMATCH, "out of step");
        /* l is layer 0 of MPI_COMM_WORLD in this process's history only if no other
         * test made one before: name it from the text's own prefix instead */
        const char *got = syncbn_last_error(tu_rank == 0 ? l : na);
        TU_EXPECT(strstr(got, ": the ranks are not all in this call (layers or calls out of step)") != NULL &&
                      strncmp(got, "forward, call ", 14) == 0,
                  "out-of-step text \"%s\"", got);
    }
    syncbn_destroy(na);
    syncbn_destroy(l);
    free(x), free(dy);
}

START_TEST(last_error_with_timeout) { last_error_texts(T); tu_verdict(); }
END_TEST
START_TEST(last_error_without_timeout) { last_error_texts(0); tu_verdict(); }
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("timeout");
    TCase *tc = tcase_create("timeout");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, timeout_config);
    tcase_add_test(tc, last_error_with_timeout);
    tcase_add_test(tc, last_error_without_timeout);
    tcase_add_test(tc, slow_within_deadline);
    tcase_add_test(tc, create_meets_forward_data);
    tcase_add_test(tc, sizes_fast_fast);
    tcase_add_test(tc, sizes_fast_reproducible);
    tcase_add_test(tc, sizes_large);
    tcase_add_test(tc, skip_forward_fast);
    tcase_add_test(tc, skip_forward_reproducible);
    tcase_add_test(tc, skip_backward_fast);
    tcase_add_test(tc, skip_backward_reproducible);
    tcase_add_test(tc, null_layer);
    tcase_add_test(tc, skip_create);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, make_suite); }
