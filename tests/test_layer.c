/*
 * test_layer.c - the core property of syncbn under real mpirun at any rank count:
 * P ranks, each holding a slice of one global batch (even, uneven, empty, all on one
 * rank), produce the same y, dx, dweight, dbias and running statistics as a float64
 * reference over the whole batch, written here from the BatchNorm definition.
 * Plus a finite-difference check of backward, eval mode, and the error paths.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "syncbn.h"
#include "testutil.h"

#define RTOL 1e-5

/* ---- test problem: a global batch and its float64 reference ---- */

typedef struct {
    int64_t B, C, S;      /* global batch, channels, spatial */
    syncbn_config cfg;
    double offset, scale; /* x = offset + scale * N(0,1) (per-channel scale varies) */
} problem;

/* Element (sample i, channel c, position s) of step `step`: depends only on global indices. */
static float x_at(const problem *p, int step, int64_t i, int64_t c, int64_t s)
{
    uint64_t key = ((((uint64_t)step * 1000003u + (uint64_t)i) * 4099u + (uint64_t)c) * 65537u + (uint64_t)s);
    return (float)(p->offset + p->scale * (1 + c % 3) * tu_normal(key));
}

static float dy_at(int step, int64_t i, int64_t c, int64_t s)
{
    uint64_t key = 0xd1ULL << 48 | ((((uint64_t)step * 1000003u + (uint64_t)i) * 4099u + (uint64_t)c) * 65537u + (uint64_t)s);
    return (float)tu_normal(key);
}

/* Offset of element (i, c, s) in a buffer of the layer's layout. */
static int64_t at(const problem *p, int64_t i, int64_t c, int64_t s)
{
    return p->cfg.layout == SYNCBN_NCHW ? (i * p->C + c) * p->S + s : (i * p->S + s) * p->C + c;
}

/* The last fill of each step parity, kept: the alignment test fills the same large
 * slice many times (step 0 for training, step 1 for eval). */
typedef struct {
    problem p;
    int step;
    int64_t lo, n;
    float *x, *dy;
} filled;
static filled last_fill[2];

static void fill(const problem *p, int step, int64_t lo, int64_t n, float *x, float *dy)
{
    const size_t bytes = (size_t)(n * p->C * p->S) * sizeof(float);
    filled *f = &last_fill[step & 1];
    const problem *q = &f->p; /* the data do not depend on the configuration beyond the layout */
    if (f->x && q->B == p->B && q->C == p->C && q->S == p->S && q->cfg.layout == p->cfg.layout &&
        q->offset == p->offset && q->scale == p->scale && f->step == step && f->lo == lo && f->n == n) {
        memcpy(x, f->x, bytes), memcpy(dy, f->dy, bytes);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < p->C; c++)
            for (int64_t s = 0; s < p->S; s++) {
                x[at(p, i, c, s)] = x_at(p, step, lo + i, c, s);
                dy[at(p, i, c, s)] = dy_at(step, lo + i, c, s);
            }
    free(f->x), free(f->dy);
    f->x = malloc(bytes + 1), f->dy = malloc(bytes + 1);
    if (f->x && f->dy) {
        memcpy(f->x, x, bytes), memcpy(f->dy, dy, bytes);
        f->p = *p, f->step = step, f->lo = lo, f->n = n;
    } else {
        free(f->x), free(f->dy);
        f->x = f->dy = NULL;
    }
}

typedef struct {
    double *mean, *var, *invstd; /* [C] biased batch statistics */
    double *dweight, *dbias;      /* [C] */
    double *rm, *rv;              /* [C] running statistics after this step */
} reference;

/* Float64 BatchNorm over the whole global batch, from the definition (two passes). */
static void reference_step(const problem *p, int step, const double *w, reference *r, int64_t nbt)
{
    const double N = (double)(p->B * p->S);
    for (int64_t c = 0; c < p->C; c++) {
        double m = 0, v = 0, g = 0, gx = 0;
        for (int64_t i = 0; i < p->B; i++)
            for (int64_t s = 0; s < p->S; s++)
                m += x_at(p, step, i, c, s);
        m /= N;
        for (int64_t i = 0; i < p->B; i++)
            for (int64_t s = 0; s < p->S; s++) {
                double d = x_at(p, step, i, c, s) - m;
                v += d * d;
            }
        v /= N;
        const double is = 1 / sqrt(v + p->cfg.eps);
        for (int64_t i = 0; i < p->B; i++)
            for (int64_t s = 0; s < p->S; s++) {
                g += dy_at(step, i, c, s);
                gx += dy_at(step, i, c, s) * (x_at(p, step, i, c, s) - m) * is;
            }
        r->mean[c] = m, r->var[c] = v, r->invstd[c] = is, r->dbias[c] = g, r->dweight[c] = gx;
        const double f = isnan(p->cfg.momentum) ? 1.0 / (double)nbt : p->cfg.momentum;
        r->rm[c] = (1 - f) * r->rm[c] + f * m;
        r->rv[c] = (1 - f) * r->rv[c] + f * v * N / (N - 1);
    }
    (void)w;
}

static double ref_y(const problem *p, const reference *r, const double *w, const double *b, int step, int64_t i,
                    int64_t c, int64_t s)
{
    return (x_at(p, step, i, c, s) - r->mean[c]) * r->invstd[c] * w[c] + b[c];
}

static double ref_dx(const problem *p, const reference *r, const double *w, int step, int64_t i, int64_t c,
                     int64_t s)
{
    const double N = (double)(p->B * p->S);
    const double xhat = (x_at(p, step, i, c, s) - r->mean[c]) * r->invstd[c];
    return w[c] * r->invstd[c] * (dy_at(step, i, c, s) - r->dbias[c] / N - xhat * r->dweight[c] / N);
}

/* ---- splits of the global batch over the ranks ---- */

enum { SPLIT_EVEN, SPLIT_FIRST, SPLIT_LAST, SPLIT_HOLES, SPLIT_RANDOM, NSPLITS };

/* This rank's [lo, lo+n) under split kind k. */
static void split(int k, int64_t B, int64_t *lo, int64_t *n)
{
    const int P = tu_nranks, r = tu_rank;
    int64_t cnt[64] = {0};
    switch (k) {
    case SPLIT_EVEN:
        for (int q = 0; q < P; q++)
            cnt[q] = (q + 1) * B / P - q * B / P;
        break;
    case SPLIT_FIRST:
        cnt[0] = B;
        break;
    case SPLIT_LAST:
        cnt[P - 1] = B;
        break;
    case SPLIT_HOLES: /* every other rank empty, the rest uneven */
    case SPLIT_RANDOM: {
        int64_t left = B;
        for (int q = 0; q < P; q++) {
            int64_t take = (k == SPLIT_HOLES && q % 2 == 1) ? 0 : (int64_t)(tu_uniform(977u * q + k) * (double)(left + 1));
            if (q == P - 1 || (k == SPLIT_HOLES && q == P - 2 && q % 2 == 0))
                take = left;
            cnt[q] = take, left -= take;
        }
        if (left)
            cnt[0] += left;
        break;
    }
    }
    *lo = 0;
    for (int q = 0; q < r; q++)
        *lo += cnt[q];
    *n = cnt[r];
}

/* ---- the core property ---- */

static const char *describe(const problem *p, int k)
{
    static char buf[200];
    snprintf(buf, sizeof buf, "B=%lld C=%lld S=%lld %s %s affine=%d track=%d mom=%g split=%d",
             (long long)p->B, (long long)p->C, (long long)p->S, p->cfg.layout ? "NHWC" : "NCHW",
             p->cfg.reduction ? "repro" : "fast", p->cfg.affine, p->cfg.track_running_stats, p->cfg.momentum, k);
    return buf;
}

/* Where run_problem's x, dy, y, dx start: off[b] floats past a 64-byte boundary. */
typedef struct {
    int off[4];
} placement;

static const placement ALIGNED = {{0, 0, 0, 0}};

/* Mixes the bits of count floats into *h (FNV-1a over 32-bit words: cheap enough for
 * tensors of millions of floats, and any single changed bit changes the digest). */
static void digest_floats(uint64_t *h, const float *v, int64_t count)
{
    uint64_t d = *h;
    for (int64_t i = 0; i < count; i++) {
        uint32_t u;
        memcpy(&u, &v[i], sizeof u);
        d = (d ^ u) * 0x100000001b3ULL;
    }
    *h = tu_hash(d);
}

/* Runs `steps` training steps and one eval forward of problem p under split k, with
 * the buffers placed as pl says. With check != 0 it compares every output with the
 * float64 reference; with digest != NULL it hashes the bits of every output of this
 * rank (y, dx, dweight, dbias, running statistics, eval y) into *digest. */
static void run_placed(const problem *p, int k, int steps, placement pl, int check, uint64_t *digest)
{
    int64_t lo, n;
    split(k, p->B, &lo, &n);
    const int64_t C = p->C, len = n * C * p->S;
    float *base[4];
    for (int b = 0; b < 4; b++)
        base[b] = aligned_alloc(64, ((size_t)(len + 16) * sizeof(float) + 63) / 64 * 64); /* room for off < 16 */
    float *x = base[0] + pl.off[0], *dy = base[1] + pl.off[1], *y = base[2] + pl.off[2], *dx = base[3] + pl.off[3];
    float *dw = malloc(sizeof(float) * (size_t)C), *db = malloc(sizeof(float) * (size_t)C);
    double *buf = calloc(9 * (size_t)C, sizeof(double));
    reference r = {buf, buf + C, buf + 2 * C, buf + 3 * C, buf + 4 * C, buf + 5 * C, buf + 6 * C};
    double *w = buf + 7 * C, *b = buf + 8 * C;
    const char *what = describe(p, k);

    syncbn_layer *l = NULL;
    int rc = syncbn_create(&p->cfg, MPI_COMM_WORLD, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create: %s", syncbn_strerror(rc));
    for (int64_t c = 0; c < C; c++) {
        w[c] = p->cfg.affine ? 0.5 + tu_uniform(31u * c + 7) : 1.0;
        b[c] = p->cfg.affine ? tu_uniform(37u * c + 5) - 0.5 : 0.0;
        if (p->cfg.affine)
            syncbn_weight(l)[c] = (float)w[c], syncbn_bias(l)[c] = (float)b[c];
        w[c] = p->cfg.affine ? (double)(float)w[c] : 1.0;
        b[c] = p->cfg.affine ? (double)(float)b[c] : 0.0;
        r.rm[c] = 0, r.rv[c] = 1;
    }

    for (int step = 0; step < steps; step++) {
        fill(p, step, lo, n, x, dy);
        if (check)
            reference_step(p, step, w, &r, step + 1);
        /* A rank that holds none of the batch may pass NULL buffers. */
        rc = syncbn_forward(l, n ? x : NULL, n, p->S, 1, n ? y : NULL);
        TU_EXPECT(rc == SYNCBN_OK, "forward: %s (%s)", syncbn_strerror(rc), what);
        rc = syncbn_backward(l, n ? x : NULL, n ? dy : NULL, n, p->S, n ? dx : NULL, p->cfg.affine ? dw : NULL,
                             p->cfg.affine ? db : NULL);
        TU_EXPECT(rc == SYNCBN_OK, "backward: %s (%s)", syncbn_strerror(rc), what);
        if (digest) {
            digest_floats(digest, y, len), digest_floats(digest, dx, len);
            if (p->cfg.affine)
                digest_floats(digest, dw, C), digest_floats(digest, db, C);
            if (p->cfg.track_running_stats)
                digest_floats(digest, syncbn_running_mean(l), C), digest_floats(digest, syncbn_running_var(l), C);
        }
        for (int64_t i = 0; check && i < n; i++)
            for (int64_t c = 0; c < C; c++)
                for (int64_t s = 0; s < p->S; s++) {
                    double ry = ref_y(p, &r, w, b, step, lo + i, c, s), rdx = ref_dx(p, &r, w, step, lo + i, c, s);
                    TU_EXPECT(tu_close(y[at(p, i, c, s)], ry, RTOL, 1), "y[%lld,%lld,%lld] %.9g vs %.9g (%s)",
                              (long long)(lo + i), (long long)c, (long long)s, y[at(p, i, c, s)], ry, what);
                    /* dx is O(invstd * |dy| / sqrt(N)) smaller than its terms: compare
                     * on the scale of those terms. */
                    TU_EXPECT(tu_close(dx[at(p, i, c, s)], rdx, RTOL, r.invstd[c] * w[c]),
                              "dx[%lld,%lld,%lld] %.9g vs %.9g (%s)", (long long)(lo + i), (long long)c,
                              (long long)s, dx[at(p, i, c, s)], rdx, what);
                }
        for (int64_t c = 0; check && c < C; c++) {
            const double N = (double)(p->B * p->S);
            if (p->cfg.affine) {
                TU_EXPECT(tu_close(dw[c], r.dweight[c], RTOL, sqrt(N)), "dweight[%lld] %.9g vs %.9g (%s)",
                          (long long)c, dw[c], r.dweight[c], what);
                TU_EXPECT(tu_close(db[c], r.dbias[c], RTOL, sqrt(N)), "dbias[%lld] %.9g vs %.9g (%s)", (long long)c,
                          db[c], r.dbias[c], what);
            }
            if (p->cfg.track_running_stats) {
                TU_EXPECT(tu_close(syncbn_running_mean(l)[c], r.rm[c], RTOL, 1 + fabs(p->offset)),
                          "running_mean[%lld] %.9g vs %.9g (%s)", (long long)c, syncbn_running_mean(l)[c], r.rm[c],
                          what);
                TU_EXPECT(tu_close(syncbn_running_var(l)[c], r.rv[c], RTOL, 1), "running_var[%lld] %.9g vs %.9g (%s)",
                          (long long)c, syncbn_running_var(l)[c], r.rv[c], what);
            }
        }
        TU_EXPECT(syncbn_num_batches_tracked(l) == step + 1, "num_batches_tracked %lld (%s)",
                  (long long)syncbn_num_batches_tracked(l), what);
    }

    /* Eval: running statistics (float32 as stored), or this rank's own batch when
     * untracked. Never communicates: a rank that holds none of the batch (and passes
     * NULL buffers) just succeeds. */
    fill(p, steps, lo, n, x, dy);
    rc = syncbn_forward(l, n ? x : NULL, n, p->S, 0, n ? y : NULL);
    TU_EXPECT(rc == SYNCBN_OK, "eval forward (n = %lld): %s (%s)", (long long)n, syncbn_strerror(rc), what);
    if (digest)
        digest_floats(digest, y, len);
    {
        for (int64_t c = 0; check && c < C; c++) {
            double m, v;
            if (p->cfg.track_running_stats) {
                m = syncbn_running_mean(l)[c], v = syncbn_running_var(l)[c];
            } else {
                double s1 = 0, s2 = 0, cnt = (double)(n * p->S);
                for (int64_t i = 0; i < n; i++)
                    for (int64_t s = 0; s < p->S; s++)
                        s1 += x_at(p, steps, lo + i, c, s);
                for (int64_t i = 0; i < n; i++)
                    for (int64_t s = 0; s < p->S; s++)
                        s2 += pow(x_at(p, steps, lo + i, c, s) - s1 / cnt, 2);
                m = s1 / cnt, v = s2 / cnt;
            }
            for (int64_t i = 0; i < n; i++)
                for (int64_t s = 0; s < p->S; s++) {
                    double ry = (x_at(p, steps, lo + i, c, s) - m) / sqrt(v + p->cfg.eps) * w[c] + b[c];
                    TU_EXPECT(tu_close(y[at(p, i, c, s)], ry, RTOL, 1), "eval y %.9g vs %.9g (%s)",
                              y[at(p, i, c, s)], ry, what);
                }
        }
        rc = syncbn_backward(l, x, dy, n, p->S, dx, NULL, NULL);
        TU_EXPECT(rc == SYNCBN_ESTATE, "backward after eval: %s (%s)", syncbn_strerror(rc), what);
    }

    syncbn_destroy(l);
    for (int b = 0; b < 4; b++)
        free(base[b]);
    free(dw), free(db), free(buf);
}

static void run_problem(const problem *p, int k, int steps) { run_placed(p, k, steps, ALIGNED, 1, NULL); }

static problem make_problem(int64_t B, int64_t C, int64_t S, syncbn_layout layout, syncbn_reduction red)
{
    problem p = {B, C, S, syncbn_config_default(C), 0, 1};
    p.cfg.layout = layout;
    p.cfg.reduction = red;
    return p;
}

/* Both layouts x both reductions x every split, for one shape and option set. */
static void sweep(int64_t B, int64_t C, int64_t S, int affine, int track, double momentum, double offset)
{
    for (int layout = 0; layout < 2; layout++)
        for (int red = 0; red < 2; red++)
            for (int k = 0; k < NSPLITS; k++) {
                problem p = make_problem(B, C, S, (syncbn_layout)layout, (syncbn_reduction)red);
                p.cfg.affine = affine, p.cfg.track_running_stats = track, p.cfg.momentum = momentum;
                p.offset = offset;
                run_problem(&p, k, 2);
            }
    tu_verdict();
}

START_TEST(core_default) { sweep(7, 5, 9, 1, 1, 0.1, 0); }
END_TEST
START_TEST(core_spatial_one) { sweep(13, 19, 1, 1, 1, 0.1, 0); } /* [n][C] input, C odd */
END_TEST
START_TEST(core_wide_rows) { sweep(5, 3, 67, 1, 1, 0.1, 0); }    /* S not a multiple of the lanes */
END_TEST
START_TEST(core_no_affine) { sweep(6, 33, 4, 0, 1, 0.1, 0); }
END_TEST
START_TEST(core_no_tracking) { sweep(6, 4, 5, 1, 0, 0.1, 0); }
END_TEST
START_TEST(core_cumulative_momentum) { sweep(9, 4, 3, 1, 1, NAN, 0); }
END_TEST
START_TEST(core_large_offset) { sweep(8, 6, 49, 1, 1, 0.1, 1000); } /* x = 1000 + N(0,1) */
END_TEST

/* Uneven splits where P does not divide B, with a channel count that is not a
 * multiple of any SIMD width, in the layout where channels are the vector lanes. */
START_TEST(core_many_channels_nhwc)
{
    for (int k = 0; k < NSPLITS; k++) {
        problem p = make_problem(11, 257, 3, SYNCBN_NHWC, SYNCBN_FAST);
        run_problem(&p, k, 1);
        /* both reductions, with S > 1 and 131 = 2 x 64 + 3 channels (register blocks and a scalar tail) */
        for (int red = 0; red < 2; red++) {
            problem q = make_problem(5, 131, 9, SYNCBN_NHWC, (syncbn_reduction)red);
            run_problem(&q, k, 1);
        }
    }
    tu_verdict();
}
END_TEST

/* NHWC rows of 13 channels (an alignment head, at most one vector step, a tail)
 * on a tensor large enough for streaming stores when one rank holds it all
 * (>= 16 MiB per output at P = 1; malloc'ed blocks this large are not 32-byte
 * aligned, so the head is not empty), with two threads splitting the rows. */
START_TEST(core_streaming_narrow_nhwc)
{
    const int threads = omp_get_max_threads();
    omp_set_num_threads(2);
    for (int red = 0; red < 2; red++) {
        problem p = make_problem(8, 13, 41000, SYNCBN_NHWC, (syncbn_reduction)red);
        run_problem(&p, SPLIT_EVEN, 1);
    }
    omp_set_num_threads(threads);
    tu_verdict();
}
END_TEST

/* Any 4-byte alignment of x, dy, y and dx, each independently, gives the same bits
 * as 64-byte aligned buffers, at 1 and 2 threads: both layouts and reductions,
 * C = 13 (rows of 52 bytes: cache lines shared between rows). A small tensor split
 * evenly (every placement; the aligned run also checked against the float64
 * reference), and one that takes the streaming-store path when one rank holds it
 * (>= 16 MiB per output; S = 4111: NCHW rows not a whole number of lines), where the
 * reference (slow at this size) is checked once, NCHW on one rank, and the other
 * cases must give the same bits under four placements. The large tensor runs at one
 * and two ranks only: alignment does not interact with the rank count. */
START_TEST(core_any_alignment)
{
    static const placement pls[] = {{{0, 0, 0, 0}}, {{5, 11, 2, 15}}, {{1, 0, 0, 0}}, {{0, 1, 0, 0}},
                                    {{0, 0, 1, 0}}, {{0, 0, 0, 1}}, {{13, 7, 9, 3}}};
    const int threads = omp_get_max_threads();
    for (int big = 0; big < (tu_nranks <= 2 ? 2 : 1); big++)
        for (int layout = 0; layout < 2; layout++)
            for (int red = 0; red < 2; red++) {
                problem p = big ? make_problem(80, 13, 4111, (syncbn_layout)layout, (syncbn_reduction)red)
                                : make_problem(7, 13, 196, (syncbn_layout)layout, (syncbn_reduction)red);
                const int k = big ? SPLIT_FIRST : SPLIT_EVEN, npl = big ? 4 : (int)(sizeof pls / sizeof pls[0]);
                uint64_t ref = 0;
                omp_set_num_threads(2);
                run_placed(&p, k, 1, pls[0], !big || (layout == SYNCBN_NCHW && red == SYNCBN_FAST && tu_nranks == 1),
                           &ref);
                for (int t = 1; t <= 2; t++) {
                    omp_set_num_threads(t);
                    for (int q = t == 1 ? 0 : 1; q < npl; q++) {
                        uint64_t h = 0;
                        run_placed(&p, k, 1, pls[q], 0, &h);
                        TU_EXPECT(h == ref, "%s, %d thread(s), offsets %d %d %d %d: bits differ from aligned",
                                  describe(&p, k), t, pls[q].off[0], pls[q].off[1], pls[q].off[2], pls[q].off[3]);
                    }
                }
            }
    omp_set_num_threads(threads);
    tu_verdict();
}
END_TEST

/* ---- finite differences: backward against the forward it differentiates ---- */

/* Collective: L = sum over the global batch of y * dy (dy fixed), in double. */
static double loss(syncbn_layer *l, const problem *p, const float *x, int64_t n, float *y, const float *g)
{
    int rc = syncbn_forward(l, x, n, p->S, 1, y);
    TU_EXPECT(rc == SYNCBN_OK, "fd forward: %s", syncbn_strerror(rc));
    double mine = 0, all = 0;
    for (int64_t e = 0; e < n * p->C * p->S; e++)
        mine += (double)y[e] * g[e];
    MPI_Allreduce(&mine, &all, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return all;
}

START_TEST(backward_finite_differences)
{
    for (int layout = 0; layout < 2; layout++) {
        problem p = make_problem(6, 3, 5, (syncbn_layout)layout, SYNCBN_FAST);
        p.cfg.track_running_stats = 0;
        int64_t lo, n;
        split(SPLIT_RANDOM, p.B, &lo, &n);
        const int64_t len = n * p.C * p.S;
        float *x = malloc(sizeof(float) * (size_t)(len + 1)), *g = malloc(sizeof(float) * (size_t)(len + 1));
        float *y = malloc(sizeof(float) * (size_t)(len + 1)), *dx = malloc(sizeof(float) * (size_t)(len + 1));
        float dw[3], db[3];
        fill(&p, 0, lo, n, x, g);
        syncbn_layer *l;
        ck_assert_int_eq(syncbn_create(&p.cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
        for (int c = 0; c < 3; c++)
            syncbn_weight(l)[c] = 0.7f + 0.3f * (float)c, syncbn_bias(l)[c] = 0.1f * (float)c;
        loss(l, &p, x, n, y, g);
        TU_EXPECT(syncbn_backward(l, x, g, n, p.S, dx, dw, db) == SYNCBN_OK, "fd backward");

        const double h = 1e-2;
        /* d/dx at a few global elements; the owning rank perturbs, all evaluate. */
        for (int probe = 0; probe < 6; probe++) {
            int64_t gi = (int64_t)(tu_uniform(100u + probe) * (double)p.B), c = probe % 3, s = (probe * 2) % p.S;
            int mine = gi >= lo && gi < lo + n;
            float *xe = mine ? &x[at(&p, gi - lo, c, s)] : NULL;
            float keep = mine ? *xe : 0;
            if (mine)
                *xe = keep + (float)h;
            double lp = loss(l, &p, x, n, y, g);
            if (mine)
                *xe = keep - (float)h;
            double lm = loss(l, &p, x, n, y, g);
            if (mine)
                *xe = keep;
            double fd = (lp - lm) / (2 * h), an = mine ? dx[at(&p, gi - lo, c, s)] : 0;
            MPI_Allreduce(MPI_IN_PLACE, &an, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            TU_EXPECT(fabs(fd - an) <= 2e-3 * (1 + fabs(an)), "dx fd %.6g vs analytic %.6g", fd, an);
        }
        /* d/dweight and d/dbias: every rank perturbs its copy (they are replicated). */
        for (int c = 0; c < 3; c++) {
            float *ps[2] = {syncbn_weight(l) + c, syncbn_bias(l) + c};
            float an[2] = {dw[c], db[c]};
            for (int k = 0; k < 2; k++) {
                float keep = *ps[k];
                *ps[k] = keep + (float)h;
                double lp = loss(l, &p, x, n, y, g);
                *ps[k] = keep - (float)h;
                double lm = loss(l, &p, x, n, y, g);
                *ps[k] = keep;
                double fd = (lp - lm) / (2 * h);
                TU_EXPECT(fabs(fd - an[k]) <= 2e-3 * (1 + fabs(an[k])), "%s[%d] fd %.6g vs analytic %.6g",
                          k ? "dbias" : "dweight", c, fd, an[k]);
            }
        }
        syncbn_destroy(l);
        free(x), free(g), free(y), free(dx);
    }
    tu_verdict();
}
END_TEST

/* ---- errors: the same code on every rank, and nothing changed ---- */

typedef struct {
    float w[4], b[4], rm[4], rv[4];
    int64_t nbt;
} snapshot;

static snapshot snap(syncbn_layer *l)
{
    snapshot s;
    memcpy(s.w, syncbn_weight(l), sizeof s.w), memcpy(s.b, syncbn_bias(l), sizeof s.b);
    memcpy(s.rm, syncbn_running_mean(l), sizeof s.rm), memcpy(s.rv, syncbn_running_var(l), sizeof s.rv);
    s.nbt = syncbn_num_batches_tracked(l);
    return s;
}

#define EXPECT_CODE(call, code)                                                                         \
    do {                                                                                                \
        int rc_ = (call);                                                                               \
        TU_EXPECT(rc_ == (code), "%s returned %s, expected %s", #call, syncbn_strerror(rc_), syncbn_strerror(code)); \
    } while (0)

START_TEST(errors_collective)
{
    syncbn_config cfg = syncbn_config_default(4);
    syncbn_layer *l = NULL, *bad = (syncbn_layer *)&cfg;

    /* create: invalid config anywhere -> EINVAL everywhere; disagreement -> EMISMATCH */
    syncbn_config c2 = cfg;
    c2.eps = tu_rank == tu_nranks - 1 ? 0 : 1e-5;
    EXPECT_CODE(syncbn_create(&c2, MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
    TU_EXPECT(l == NULL, "failed create must leave *out NULL");
    c2 = cfg;
    c2.momentum = tu_rank == 0 ? 1.5 : 0.1;
    EXPECT_CODE(syncbn_create(&c2, MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_create(tu_rank == 0 ? NULL : &cfg, MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
    if (tu_nranks > 1) {
        c2 = cfg;
        c2.eps = tu_rank == 1 ? 1e-3 : 1e-5;
        EXPECT_CODE(syncbn_create(&c2, MPI_COMM_WORLD, &l), SYNCBN_EMISMATCH);
    }
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_NULL, &l), SYNCBN_EINVAL);
    (void)bad;

    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    float x[4 * 4 * 2], y[4 * 4 * 2], dx[4 * 4 * 2];
    for (int e = 0; e < 32; e++)
        x[e] = (float)tu_normal((uint64_t)(e + 100 * tu_rank));
    const int64_t n = 2, S = 4;

    /* backward before any forward */
    snapshot s0 = snap(l);
    EXPECT_CODE(syncbn_backward(l, x, x, n, S, dx, NULL, NULL), SYNCBN_ESTATE);
    /* bad arguments on ONE rank: everyone gets EINVAL, no hang */
    EXPECT_CODE(syncbn_forward(l, tu_rank == 0 ? NULL : x, n, S, 1, y), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_forward(l, x, tu_rank == tu_nranks - 1 ? -1 : n, S, 1, y), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_forward(l, x, n, tu_rank == 0 ? 0 : S, 1, y), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_forward(l, x, INT64_MAX / 2, S, 1, y), SYNCBN_EINVAL); /* n*C*S overflows */
    EXPECT_CODE(syncbn_forward(NULL, x, n, S, 1, y), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_forward(l, x, -1, S, 0, y), SYNCBN_EINVAL);
    /* one rank with a different spatial size */
    if (tu_nranks > 1)
        EXPECT_CODE(syncbn_forward(l, x, 1, tu_rank == 1 ? 2 : 4, 1, y), SYNCBN_EMISMATCH);
    /* global count < 2: only rank 0 holds one element */
    EXPECT_CODE(syncbn_forward(l, x, tu_rank == 0 ? 1 : 0, 1, 1, y), SYNCBN_EEMPTY);
    EXPECT_CODE(syncbn_forward(l, x, 0, S, 1, y), SYNCBN_EEMPTY);
    /* NaN on one rank: ENONFINITE on all */
    float keep = x[5];
    if (tu_rank == tu_nranks - 1)
        x[5] = NAN;
    EXPECT_CODE(syncbn_forward(l, x, n, S, 1, y), SYNCBN_ENONFINITE);
    if (tu_rank == tu_nranks - 1)
        x[5] = INFINITY;
    EXPECT_CODE(syncbn_forward(l, x, n, S, 1, y), SYNCBN_ENONFINITE);
    x[5] = keep;
    snapshot s1 = snap(l);
    TU_EXPECT(memcmp(&s0, &s1, sizeof s0) == 0, "failed calls changed the layer");

    /* a good forward, then backward misuse */
    EXPECT_CODE(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    s0 = snap(l);
    float dw[4];
    EXPECT_CODE(syncbn_backward(l, x, x, n + (tu_rank == 0), S, dx, NULL, NULL), SYNCBN_ESTATE);
    EXPECT_CODE(syncbn_backward(l, x, tu_rank == 0 ? NULL : x, n, S, dx, NULL, NULL), SYNCBN_EINVAL);
    keep = x[3];
    if (tu_rank == 0)
        x[3] = NAN; /* the gradient sums become NaN */
    EXPECT_CODE(syncbn_backward(l, x, x, n, S, dx, dw, NULL), SYNCBN_ENONFINITE);
    x[3] = keep;
    EXPECT_CODE(syncbn_backward(l, x, x, n, S, dx, dw, NULL), SYNCBN_OK);
    s1 = snap(l);
    TU_EXPECT(memcmp(&s0, &s1, sizeof s0) == 0, "backward changed parameters or statistics");
    /* eval invalidates the saved statistics */
    EXPECT_CODE(syncbn_forward(l, x, n, S, 0, y), SYNCBN_OK);
    EXPECT_CODE(syncbn_backward(l, x, x, n, S, dx, NULL, NULL), SYNCBN_ESTATE);
    syncbn_destroy(l);

    /* dweight on a layer without affine */
    cfg.affine = 0;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    TU_EXPECT(syncbn_weight(l) == NULL && syncbn_bias(l) == NULL, "no affine, no weight");
    EXPECT_CODE(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    EXPECT_CODE(syncbn_backward(l, x, x, n, S, dx, tu_rank == 0 ? dw : NULL, NULL), SYNCBN_EINVAL);
    syncbn_destroy(l);
    syncbn_destroy(NULL);

    /* num_batches_tracked setter: it is the divisor of the cumulative average */
    cfg.affine = 1, cfg.momentum = NAN;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    EXPECT_CODE(syncbn_set_num_batches_tracked(l, -1), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_set_num_batches_tracked(NULL, 3), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_set_num_batches_tracked(l, 3), SYNCBN_OK);
    for (int e = 0; e < 32; e++)
        x[e] = 8.0f; /* batch mean 8 in every channel */
    EXPECT_CODE(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    TU_EXPECT(syncbn_num_batches_tracked(l) == 4, "num_batches_tracked %lld", (long long)syncbn_num_batches_tracked(l));
    /* running_mean = (1 - 1/4) * 0 + (1/4) * 8 */
    TU_EXPECT(syncbn_running_mean(l)[0] == 2.0f, "cumulative average after setter: %g", syncbn_running_mean(l)[0]);
    syncbn_destroy(l);
    cfg.momentum = 0.1;

    /* untracked eval on an empty rank: nothing to normalize, nothing to fail */
    cfg.track_running_stats = 0;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    TU_EXPECT(syncbn_running_mean(l) == NULL, "no tracking, no running mean");
    EXPECT_CODE(syncbn_forward(l, NULL, 0, S, 0, NULL), SYNCBN_OK);
    EXPECT_CODE(syncbn_forward(l, x, 0, S, 0, y), SYNCBN_OK);
    syncbn_destroy(l);
    tu_verdict();
}
END_TEST

/* Ranks calling different layers out of step meet in the shared communicator and
 * get EMISMATCH instead of a hang. */
START_TEST(errors_out_of_step)
{
    syncbn_config cfg = syncbn_config_default(3);
    syncbn_layer *a, *b;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &a), SYNCBN_OK);
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &b), SYNCBN_OK);
    float x[12], y[12];
    for (int e = 0; e < 12; e++)
        x[e] = (float)e;
    if (tu_nranks > 1) {
        EXPECT_CODE(syncbn_forward(tu_rank == 0 ? a : b, x, 2, 2, 1, y), SYNCBN_EMISMATCH);
        /* a forward on one rank meeting a backward on another */
        EXPECT_CODE(syncbn_forward(a, x, 2, 2, 1, y), SYNCBN_EMISMATCH); /* sequence numbers now differ */
    }
    syncbn_destroy(b);
    syncbn_destroy(a);
    /* sub-communicators: even and odd ranks normalize separately */
    MPI_Comm half;
    MPI_Comm_split(MPI_COMM_WORLD, tu_rank % 2, tu_rank, &half);
    EXPECT_CODE(syncbn_create(&cfg, half, &a), SYNCBN_OK);
    for (int e = 0; e < 12; e++)
        x[e] = (float)(tu_rank % 2 ? 100 + e : e);
    EXPECT_CODE(syncbn_forward(a, x, 2, 2, 1, y), SYNCBN_OK);
    /* channel 0 holds x = base + {0,1,6,7}: mean base + 3.5 on every rank of the group */
    TU_EXPECT(tu_close(syncbn_running_mean(a)[0], 0.1 * ((tu_rank % 2 ? 100 : 0) + 3.5), 1e-6, 1),
              "group mean %g", syncbn_running_mean(a)[0]);
    syncbn_destroy(a);
    if (tu_nranks > 1) { /* intercommunicators are refused on every rank */
        MPI_Comm inter;
        MPI_Intercomm_create(half, 0, MPI_COMM_WORLD, tu_rank % 2 ? 0 : 1, 77, &inter);
        a = (syncbn_layer *)&cfg;
        EXPECT_CODE(syncbn_create(&cfg, inter, &a), SYNCBN_EINVAL);
        TU_EXPECT(a == NULL, "refused create must set *out to NULL");
        MPI_Comm_free(&inter);
    }
    MPI_Comm_free(&half);
    TU_EXPECT(strcmp(syncbn_strerror(SYNCBN_EMISMATCH), syncbn_strerror(SYNCBN_EINVAL)) != 0 &&
                  strcmp(syncbn_strerror(12345), "unknown error code") == 0,
              "strerror table");
    tu_verdict();
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("layer");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, core_default);
    tcase_add_test(tc, core_spatial_one);
    tcase_add_test(tc, core_wide_rows);
    tcase_add_test(tc, core_no_affine);
    tcase_add_test(tc, core_no_tracking);
    tcase_add_test(tc, core_cumulative_momentum);
    tcase_add_test(tc, core_large_offset);
    tcase_add_test(tc, core_many_channels_nhwc);
    tcase_add_test(tc, core_streaming_narrow_nhwc);
    tcase_add_test(tc, backward_finite_differences);
    tcase_add_test(tc, errors_collective);
    tcase_add_test(tc, errors_out_of_step);
    suite_add_tcase(s, tc);
    TCase *ta = tcase_create("alignment");
    tcase_set_timeout(ta, 600);
    tcase_add_test(ta, core_any_alignment);
    suite_add_tcase(s, ta);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, make_suite); }
