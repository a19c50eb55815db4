/*
 * bench.c - syncbn-bench: time syncbn's forward and backward against the memory
 * bandwidth of this machine, measured in the same run.
 *
 * For each shape (n, C, H, W), layout (NCHW, NHWC) and reduction (fast,
 * reproducible) it prints the median time and the effective bandwidth of
 *   fwd-train  syncbn_forward(training=1)   (one allreduce)
 *   fwd-eval   syncbn_forward(training=0)   (running statistics, no communication)
 *   bwd        syncbn_backward               (one allreduce)
 *   fwd+bwd    median over repetitions of (fwd-train + bwd) of the same repetition
 * at the current OMP_NUM_THREADS, and the same-size copy bandwidth for comparison.
 * Under mpirun -np P (P > 1) it also times the same layer created on MPI_COMM_SELF
 * (same kernels, no allreduce: a local, unsynchronized BN), taking turns with the
 * synchronized one within each repetition (in alternating order), and prints
 * sync/local. With --timeout S
 * a third layer, synchronized with syncbn_config.timeout = S, takes turns with them
 * too, and "timeout/none" is its fwd+bwd time over the one without timeout.
 * With --idle-wait W (and --timeout S) it instead measures what waiting costs: every
 * rank but 0 sleeps W seconds before a training forward, and rank 0 reports the wall
 * and CPU time (getrusage) of its own forward, without and with the timeout.
 *
 * Traffic model: "effective GB/s" = bytes below / median time, float32, 4 bytes per
 * element; caches and write-allocate reads are NOT counted, so the numbers compare
 * directly with the copy loop counted the same way (read + write, 8 B/element).
 *   fwd-train  12 B/elem: x read for the sums, x read again to normalize, y written.
 *              (A one-pass kernel that kept x in cache would beat this bound; for
 *              tensors larger than the last-level cache two reads are unavoidable.)
 *   fwd-eval    8 B/elem: x read, y written.
 *   bwd        20 B/elem: x and dy read for the sums, x and dy read again, dx written.
 *   fwd+bwd    32 B/elem.
 *   copy        8 B/elem: dst[i] = src[i]        (OpenMP, static schedule)
 *   read        4 B/elem: s += src[i]            (OpenMP, simd reduction)
 * The reference copy/read run on 128 MiB buffers (larger than any LLC we target);
 * each shape also gets a copy of its own size, the fair yardstick for tensors that
 * fit in cache. "%copy" = fwd+bwd effective GB/s / same-size copy GB/s.
 *
 * Timing: each rank holds the full given shape (n samples per rank; the global
 * batch is P*n). Every timed call is preceded by MPI_Barrier; per-repetition times
 * are reduced with MPI_MAX over ranks, then the median over repetitions is printed.
 * Three untimed warm-up repetitions come first (page faults, thread pool, caches).
 *
 * Output: a human-readable table on rank 0. With --machine, additionally
 *   REFERENCE copy_gbs=.. read_gbs=.. threads=.. np=..
 *   RESULT impl=syncbn-fast layout=nchw shape=32,64,56,56 fwd_ms=.. fwdbwd_ms=.. bwd_ms=.. ...
 * (one RESULT line per case), parsed by scripts/bench_compare.sh.
 *
 * What it does not do: check numerics (the tests do that), or time anything that
 * a unit test asserts on.
 *
 * Usage: syncbn-bench [--shape N,C,H,W]... [--layout nchw|nhwc|both]
 *                     [--reduction fast|repro|both] [--reps R] [--offset K] [--aligned]
 *                     [--timeout S] [--machine] [--idle-wait W]
 *
 * Buffers: x, y, dy, dx come from plain malloc, as in user code (glibc gives 16-byte
 * alignment); --aligned takes 64-byte aligned ones instead, and --offset K (0..1024)
 * starts every buffer K floats later: --aligned --offset 1 is 4 bytes past a cache
 * line, what a tensor slice or numpy view may give.
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <mpi.h>

#include "syncbn.h"

#define MAX_SHAPES 16
#define REF_FLOATS ((int64_t)32 << 20) /* 128 MiB per buffer for the reference loops */
#define WARMUP 3

static int g_rank = 0, g_size = 1;

/* Prints on rank 0 only. */
#define ROOT_PRINTF(...)                                                                           \
    do {                                                                                           \
        if (g_rank == 0) {                                                                         \
            printf(__VA_ARGS__);                                                                   \
            fflush(stdout);                                                                        \
        }                                                                                          \
    } while (0)

/* Aborts the whole job on a library error: a benchmark has nothing to recover. */
#define CHECK(call)                                                                                \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_ != SYNCBN_OK) {                                                                    \
            fprintf(stderr, "rank %d: %s failed: %s (%d)\n", g_rank, #call, syncbn_strerror(rc_), \
                    rc_);                                                                          \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                          \
        }                                                                                          \
    } while (0)

typedef struct {
    int64_t n, C, H, W;
} shape4;

/* How tensor buffers are allocated: as users do (plain malloc: 16-byte alignment from
 * glibc, and tensor slices or numpy views start anywhere on a 4-byte boundary), or
 * 64-byte aligned with --aligned; --offset K then moves every start by K floats. */
static int g_aligned = 0;
static int64_t g_offset = 0;

typedef struct {
    void *base; /* what to free */
    float *p;   /* the tensor: base + g_offset floats */
} buffer;

static buffer alloc_floats(int64_t count)
{
    size_t bytes = (size_t)(count + g_offset) * sizeof(float);
    buffer b;
    b.base = g_aligned ? aligned_alloc(64, (bytes + 63) / 64 * 64 + 64) : malloc(bytes + 64);
    if (!b.base) {
        fprintf(stderr, "rank %d: out of memory (%zu bytes)\n", g_rank, bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    b.p = (float *)b.base + g_offset;
    return b;
}

/* Fills with offset + uniform(-1.7, 1.7) (variance ~1), xorshift seeded per purpose. */
static void fill(float *p, int64_t count, uint64_t seed, float offset)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t i = 0; i < count; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        p[i] = offset + 3.4f * ((float)(s >> 40) / 16777216.0f - 0.5f);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of t[0..r) after MPI_MAX over ranks, element-wise (t is overwritten). */
static double median_max(double *t, int r)
{
    MPI_Allreduce(MPI_IN_PLACE, t, r, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    qsort(t, (size_t)r, sizeof *t, cmp_double);
    return r % 2 ? t[r / 2] : 0.5 * (t[r / 2 - 1] + t[r / 2]);
}

/* ---- reference loops ---- */

static void copy_loop(float *restrict dst, const float *restrict src, int64_t count)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++)
        dst[i] = src[i];
}

static double read_loop(const float *restrict src, int64_t count)
{
    float s = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : s)
    for (int64_t i = 0; i < count; i++)
        s += src[i];
    return s;
}

/* Median GB/s of copy (read_only == 0) or read over count floats. */
static double ref_bandwidth(float *dst, const float *src, int64_t count, int reps, int read_only)
{
    double *t = malloc(sizeof(double) * (size_t)reps);
    volatile double sink = 0;
    for (int r = -WARMUP; r < reps; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        if (read_only)
            sink += read_loop(src, count);
        else
            copy_loop(dst, src, count);
        double dt = MPI_Wtime() - t0;
        if (r >= 0)
            t[r] = dt;
    }
    (void)sink;
    double med = median_max(t, reps);
    free(t);
    return (double)count * (read_only ? 4.0 : 8.0) / med * 1e-9;
}

/* ---- one layer configuration ---- */

typedef struct {
    double fwd, eval, bwd, fwdbwd; /* median ms */
} timings;

/* Times nl layers of the same configuration, layer j on comms[j] (MPI_COMM_WORLD:
 * synchronized; MPI_COMM_SELF: local BN) with timeout timeouts[j], into T[j]. The
 * layers take turns within every repetition, so slow phases of a noisy machine hit
 * all of them alike. */
static void time_layers(shape4 sh, syncbn_layout layout, syncbn_reduction red, int nl, const MPI_Comm *comms,
                        const double *timeouts, const float *x, const float *dy, float *y, float *dx, int reps,
                        timings *T)
{
    syncbn_config cfg = syncbn_config_default(sh.C);
    cfg.layout = layout;
    cfg.reduction = red;
    syncbn_layer *L[3] = {NULL, NULL, NULL};
    for (int j = 0; j < nl; j++) {
        cfg.timeout = timeouts[j];
        CHECK(syncbn_create(&cfg, comms[j], &L[j]));
    }
    const int64_t S = sh.H * sh.W;
    float *dw = malloc((size_t)sh.C * sizeof *dw), *db = malloc((size_t)sh.C * sizeof *db);
    double *t = malloc(sizeof(double) * (size_t)reps * 4 * (size_t)nl); /* [layer][fwd,bwd,f+b,eval][rep] */
    if (!t || !dw || !db)
        MPI_Abort(MPI_COMM_WORLD, 1);

    for (int r = -WARMUP; r < reps; r++)
        for (int jj = 0; jj < nl; jj++) {
            const int j = r & 1 ? nl - 1 - jj : jj; /* alternate the order: no layer always goes first */
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            CHECK(syncbn_forward(L[j], x, sh.n, S, 1, y));
            double t1 = MPI_Wtime();
            MPI_Barrier(MPI_COMM_WORLD);
            double t2 = MPI_Wtime();
            CHECK(syncbn_backward(L[j], x, dy, sh.n, S, dx, dw, db));
            double t3 = MPI_Wtime();
            if (r >= 0) {
                double *tj = t + (size_t)j * 4 * (size_t)reps;
                tj[r] = t1 - t0, tj[reps + r] = t3 - t2, tj[2 * reps + r] = (t1 - t0) + (t3 - t2);
            }
        }
    for (int r = -WARMUP; r < reps; r++)
        for (int j = 0; j < nl; j++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            CHECK(syncbn_forward(L[j], x, sh.n, S, 0, y));
            double t1 = MPI_Wtime();
            if (r >= 0)
                t[(size_t)j * 4 * (size_t)reps + 3 * (size_t)reps + (size_t)r] = t1 - t0;
        }
    for (int j = 0; j < nl; j++) {
        double *tj = t + (size_t)j * 4 * (size_t)reps;
        T[j].fwd = median_max(tj, reps) * 1e3;
        T[j].bwd = median_max(tj + reps, reps) * 1e3;
        T[j].fwdbwd = median_max(tj + 2 * reps, reps) * 1e3;
        T[j].eval = median_max(tj + 3 * reps, reps) * 1e3;
        syncbn_destroy(L[j]);
    }
    free(t), free(dw), free(db);
}

/* CPU seconds (user + system) this process has used. */
static double cpu_seconds(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + 1e-6 * (double)u.ru_utime.tv_usec + (double)u.ru_stime.tv_sec +
           1e-6 * (double)u.ru_stime.tv_usec;
}

/* --idle-wait: rank 0 waits `wait` seconds in a training forward for the others. */
static void idle_wait(double wait, double timeout, const float *x, float *y)
{
    const double touts[2] = {0, timeout};
    for (int k = 0; k < 2; k++) {
        syncbn_config cfg = syncbn_config_default(16);
        cfg.timeout = touts[k];
        syncbn_layer *l = NULL;
        CHECK(syncbn_create(&cfg, MPI_COMM_WORLD, &l));
        MPI_Barrier(MPI_COMM_WORLD);
        if (g_rank != 0) {
            struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
            nanosleep(&ts, NULL);
        }
        const double w0 = MPI_Wtime(), c0 = cpu_seconds();
        CHECK(syncbn_forward(l, x, 8, 64, 1, y));
        const double wall = MPI_Wtime() - w0, cpu = cpu_seconds() - c0;
        ROOT_PRINTF("IDLEWAIT np=%d timeout=%g wall_s=%.3f cpu_s=%.3f cpu_pct=%.1f\n", g_size, touts[k], wall, cpu,
                    100 * cpu / wall);
        syncbn_destroy(l);
    }
}

static void usage(const char *argv0)
{
    ROOT_PRINTF("usage: %s [--shape N,C,H,W]... [--layout nchw|nhwc|both] "
                "[--reduction fast|repro|both] [--reps R] [--offset K] [--aligned] [--timeout S] [--machine] "
                "[--idle-wait W]\n",
                argv0);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);

    shape4 shapes[MAX_SHAPES] = {{32, 64, 56, 56}, {32, 256, 14, 14}, {256, 1024, 1, 1}, {8, 32, 224, 224}};
    int nshapes = 4, user_shapes = 0, reps = 20, machine = 0;
    int do_layout[2] = {1, 1}, do_red[2] = {1, 1};
    double timeout = 0; /* > 0: also time a synchronized layer with this timeout */
    double idle = 0;    /* > 0: --idle-wait mode */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--machine")) {
            machine = 1;
        } else if (!strcmp(a, "--shape") && v) {
            shape4 s;
            long long q[4];
            if (sscanf(v, "%lld,%lld,%lld,%lld", &q[0], &q[1], &q[2], &q[3]) != 4 || q[0] < 1 || q[1] < 1 ||
                q[2] < 1 || q[3] < 1 || (user_shapes && nshapes == MAX_SHAPES)) {
                usage(argv[0]);
                MPI_Finalize();
                return 2;
            }
            s.n = q[0], s.C = q[1], s.H = q[2], s.W = q[3];
            if (!user_shapes)
                nshapes = 0;
            user_shapes = 1;
            shapes[nshapes++] = s;
            i++;
        } else if (!strcmp(a, "--layout") && v) {
            do_layout[0] = !strcmp(v, "nchw") || !strcmp(v, "both");
            do_layout[1] = !strcmp(v, "nhwc") || !strcmp(v, "both");
            i++;
        } else if (!strcmp(a, "--reduction") && v) {
            do_red[0] = !strcmp(v, "fast") || !strcmp(v, "both");
            do_red[1] = !strcmp(v, "repro") || !strcmp(v, "reproducible") || !strcmp(v, "both");
            i++;
        } else if (!strcmp(a, "--aligned")) {
            g_aligned = 1;
        } else if (!strcmp(a, "--offset") && v) {
            g_offset = atoll(v);
            i++;
        } else if (!strcmp(a, "--idle-wait") && v) {
            idle = atof(v);
            i++;
        } else if (!strcmp(a, "--timeout") && v) {
            timeout = atof(v);
            i++;
        } else if (!strcmp(a, "--reps") && v) {
            reps = atoi(v);
            i++;
        } else {
            usage(argv[0]);
            MPI_Finalize();
            return 2;
        }
    }
    if (reps < 1 || g_offset < 0 || g_offset > 1024 || !(do_layout[0] || do_layout[1]) || !(do_red[0] || do_red[1])) {
        usage(argv[0]);
        MPI_Finalize();
        return 2;
    }

    if (idle > 0) {
        buffer bx = alloc_floats(8 * 16 * 64), by = alloc_floats(8 * 16 * 64);
        fill(bx.p, 8 * 16 * 64, 1000 + (uint64_t)g_rank, 1.0f);
        idle_wait(idle, timeout > 0 ? timeout : 600, bx.p, by.p);
        free(bx.base), free(by.base);
        MPI_Finalize();
        return 0;
    }

    int64_t maxel = 0;
    for (int k = 0; k < nshapes; k++) {
        int64_t e = shapes[k].n * shapes[k].C * shapes[k].H * shapes[k].W;
        maxel = e > maxel ? e : maxel;
    }
    /* One set of buffers for everything; the reference loops reuse x and y. */
    int64_t bufel = maxel > REF_FLOATS ? maxel : REF_FLOATS;
    buffer bx = alloc_floats(bufel), by = alloc_floats(bufel), bdy = alloc_floats(maxel), bdx = alloc_floats(maxel);
    float *x = bx.p, *y = by.p, *dy = bdy.p, *dx = bdx.p;
    fill(x, bufel, 1000 + (uint64_t)g_rank, 1.0f);
    fill(y, bufel, 2000 + (uint64_t)g_rank, 0.0f);
    fill(dy, maxel, 3000 + (uint64_t)g_rank, 0.0f);
    fill(dx, maxel, 4000 + (uint64_t)g_rank, 0.0f);

    const int threads = omp_get_max_threads();
    double copy_bw = ref_bandwidth(y, x, REF_FLOATS, 10, 0);
    double read_bw = ref_bandwidth(y, x, REF_FLOATS, 10, 1);
    ROOT_PRINTF("syncbn-bench: %d rank(s), OMP_NUM_THREADS=%d, %d reps (median, max over ranks), float32\n",
                g_size, threads, reps);
    ROOT_PRINTF("reference (128 MiB per buffer, per rank, all ranks at once): copy %.1f GB/s (8 B/elem), "
                "read %.1f GB/s (4 B/elem)\n",
                copy_bw, read_bw);
    ROOT_PRINTF("buffers: %s, offset %lld float(s): x at %u mod 64 bytes\n", g_aligned ? "64-byte aligned" : "malloc",
                (long long)g_offset, (unsigned)((uintptr_t)x % 64));
    ROOT_PRINTF("traffic model: fwd-train 12 B/elem, fwd-eval 8, bwd 20, fwd+bwd 32 (see bench.c)\n\n");
    if (machine)
        ROOT_PRINTF("REFERENCE copy_gbs=%.3f read_gbs=%.3f threads=%d np=%d alloc=%s offset=%lld\n", copy_bw,
                    read_bw, threads, g_size, g_aligned ? "aligned" : "malloc", (long long)g_offset);
    ROOT_PRINTF("%-17s %-6s %-5s %7s %7s | %8s %6s | %8s %6s | %8s %6s | %8s %6s %6s%s\n", "shape", "layout",
                "mode", "MB", "copyGB/s", "fwd ms", "GB/s", "eval ms", "GB/s", "bwd ms", "GB/s", "f+b ms",
                "GB/s", "%copy", g_size > 1 ? " | sync/local fwd  bwd   f+b" : "");
    if (timeout > 0)
        ROOT_PRINTF("(last column: fwd+bwd with timeout %g s / without)\n", timeout);

    for (int k = 0; k < nshapes; k++) {
        shape4 sh = shapes[k];
        const int64_t el = sh.n * sh.C * sh.H * sh.W;
        const double mb = (double)el * 4 * 1e-6;
        int creps = reps > 5 ? reps : 5;
        double size_copy_bw = ref_bandwidth(y, x, el, creps, 0);
        char sname[64];
        snprintf(sname, sizeof sname, "%lld,%lld,%lld,%lld", (long long)sh.n, (long long)sh.C,
                 (long long)sh.H, (long long)sh.W);
        for (int li = 0; li < 2; li++) {
            if (!do_layout[li])
                continue;
            for (int ri = 0; ri < 2; ri++) {
                if (!do_red[ri])
                    continue;
                syncbn_layout lay = li ? SYNCBN_NHWC : SYNCBN_NCHW;
                syncbn_reduction red = ri ? SYNCBN_REPRODUCIBLE : SYNCBN_FAST;
                /* layer 0 synchronized, then local (P > 1), then with a timeout */
                MPI_Comm comms[3] = {MPI_COMM_WORLD, MPI_COMM_SELF, MPI_COMM_WORLD};
                double touts[3] = {0, 0, timeout};
                int nl = g_size > 1 ? 2 : 1;
                if (timeout > 0)
                    comms[nl] = MPI_COMM_WORLD, touts[nl] = timeout, nl++;
                timings TT[3];
                time_layers(sh, lay, red, nl, comms, touts, x, dy, y, dx, reps, TT);
                const timings T = TT[0], Lo = TT[1], To = TT[nl - 1];
                const double gb = (double)el * 4 * 1e-9; /* GB moved per 4 B/elem; see traffic model */
                double fb_bw = 8 * gb / (T.fwdbwd * 1e-3);
                ROOT_PRINTF("%-17s %-6s %-5s %7.1f %7.1f | %8.3f %6.1f | %8.3f %6.1f | %8.3f %6.1f | %8.3f %6.1f "
                            "%5.0f%%",
                            sname, li ? "nhwc" : "nchw", ri ? "repro" : "fast", mb, size_copy_bw, T.fwd,
                            3 * gb / (T.fwd * 1e-3), T.eval, 2 * gb / (T.eval * 1e-3), T.bwd,
                            5 * gb / (T.bwd * 1e-3), T.fwdbwd, fb_bw, 100 * fb_bw / size_copy_bw);
                if (g_size > 1)
                    ROOT_PRINTF(" | %15.3f %5.3f %5.3f", T.fwd / Lo.fwd, T.bwd / Lo.bwd, T.fwdbwd / Lo.fwdbwd);
                if (timeout > 0)
                    ROOT_PRINTF(" | timeout/none %.3f", To.fwdbwd / T.fwdbwd);
                ROOT_PRINTF("\n");
                if (machine && timeout > 0)
                    ROOT_PRINTF("TIMEOUT impl=syncbn-%s layout=%s shape=%s np=%d fwdbwd_ms=%.4f "
                                "timeout_fwdbwd_ms=%.4f ratio=%.4f\n",
                                ri ? "repro" : "fast", li ? "nhwc" : "nchw", sname, g_size, T.fwdbwd, To.fwdbwd,
                                To.fwdbwd / T.fwdbwd);
                if (machine)
                    ROOT_PRINTF("RESULT impl=syncbn-%s layout=%s shape=%s fwd_ms=%.4f fwdbwd_ms=%.4f "
                                "bwd_ms=%.4f eval_ms=%.4f np=%d copy_gbs=%.3f local_fwdbwd_ms=%.4f\n",
                                ri ? "repro" : "fast", li ? "nhwc" : "nchw", sname, T.fwd, T.fwdbwd, T.bwd,
                                T.eval, g_size, size_copy_bw, g_size > 1 ? Lo.fwdbwd : T.fwdbwd);
            }
        }
    }
    free(bx.base), free(by.base), free(bdy.base), free(bdx.base);
    MPI_Finalize();
    return 0;
}
