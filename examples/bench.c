/*
 * bench.c - syncbn-bench: time syncbn's forward and backward against the memory
 * bandwidth of this machine, measured in the same run.
 *
 * For each shape (n, C, H, W), layout (NCHW, NHWC), reduction (fast, reproducible)
 * and mode (activation x element type, --act and --dtype) it prints the median time
 * and the effective bandwidth of
 *   fwd-train  syncbn_forward_ex(training=1)   (one allreduce)
 *   fwd-eval   syncbn_forward_ex(training=0)   (running statistics, no communication)
 *   bwd        syncbn_backward_ex               (one allreduce)
 *   fwd+bwd    median over repetitions of (fwd-train + bwd) of the same repetition
 * at the current OMP_NUM_THREADS, and the same-size copy bandwidth for comparison.
 * Modes: --act none (plain BN), relu (fused y = relu(BN(x)), the layer keeping a
 * 1-bit mask), add-relu (y = relu(BN(x) + z) with a residual z, and the backward
 * writing dz = g as well as dx); --dtype f32 (float) or bf16 (uint16_t bfloat16 bit
 * patterns). Every mode goes through syncbn_forward_ex / syncbn_backward_ex (for
 * f32 without z they are what syncbn_forward / syncbn_backward call).
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
 * Traffic model: "effective GB/s" = bytes below / median time, where T is the
 * element size (4 for f32, 2 for bf16: bf16 halves every tensor's bytes) and the
 * ReLU mask costs 1 bit = 1/8 B per element each time it is written or read;
 * caches and write-allocate reads are NOT counted, so the numbers compare directly
 * with the copy loop counted the same way (read + write, 8 B/element).
 *                 none            relu                  add-relu
 *   fwd-train     3T              3T + 1/8              4T + 1/8
 *                 x read for the sums, x read again to normalize, y written;
 *                 relu: mask written; add-relu: z read too.
 *   fwd-eval      2T              2T                    3T   (no mask is kept)
 *   bwd           5T              5T + 2/8              6T + 2/8
 *                 x and dy read for the sums, x and dy read again, dx written;
 *                 relu: the mask read in both passes; add-relu: dz written too.
 *   fwd+bwd       8T              8T + 3/8              10T + 3/8
 *                 f32: 32 B       32.375 B (1.012x)     40.375 B (1.26x)
 *                 bf16: 16 B      16.375 B              20.375 B
 *   copy           8 B/elem: dst[i] = src[i]        (float, OpenMP, static schedule)
 *   read           4 B/elem: s += src[i]            (float, OpenMP, simd reduction)
 *   (fwd-train: a one-pass kernel that kept x in cache would beat this bound; for
 *   tensors larger than the last-level cache two reads are unavoidable.)
 * The reference copy/read run on 128 MiB buffers (larger than any LLC we target);
 * each shape also gets a float copy of its own element count, the fair yardstick
 * for tensors that fit in cache. "%copy" = fwd+bwd effective GB/s / same-size copy
 * GB/s.
 *
 * Timing: each rank holds the full given shape (n samples per rank; the global
 * batch is P*n). Every timed call is preceded by MPI_Barrier; per-repetition times
 * are reduced with MPI_MAX over ranks, then the median over repetitions is printed.
 * Three untimed warm-up repetitions come first (page faults, thread pool, caches,
 * and the growth of the ReLU mask). Modes run one after the other, each on its own
 * layer, all on the same x and dy values (bf16: those rounded to bf16): each mode's
 * repetitions then find the cache as its own previous repetition left it, as the
 * plain-BN figures always have. With --interleave the modes' layers take turns
 * within every repetition instead (as the local and timeout layers do), and each
 * RESULT line gains pair_fwdbwd = the median over repetitions of (this mode's
 * fwd+bwd / the first mode's, same repetition): the ratio least disturbed by a
 * noisy machine, for tensors larger than the last-level cache (smaller ones then
 * find the other modes' data in cache, not their own).
 *
 * Output: a human-readable table on rank 0. With --machine, additionally
 *   REFERENCE copy_gbs=.. read_gbs=.. threads=.. np=..
 *   RESULT impl=syncbn-fast layout=nchw shape=32,64,56,56 fwd_ms=.. fwdbwd_ms=.. bwd_ms=.. ...
 *          ... act=relu dtype=f32 fwdbwd_bpe=32.375
 * (one RESULT line per case; act, dtype and the model's fwd+bwd bytes per element
 * come last, so parsers of the older lines keep working), parsed by
 * scripts/bench/bench_compare.sh and scripts/bench/bench_ab.sh.
 *
 * What it does not do: check numerics (the tests do that), or time anything that
 * a unit test asserts on.
 *
 * Usage: syncbn-bench [--shape N,C,H,W]... [--layout nchw|nhwc|both]
 *                     [--reduction fast|repro|both] [--act LIST] [--dtype LIST]
 *                     [--interleave] [--reps R] [--offset K] [--aligned]
 *                     [--timeout S] [--machine] [--idle-wait W]
 *   --act LIST:   comma-separated none,relu,add-relu, or all (default none)
 *   --dtype LIST: comma-separated f32,bf16, or both (default f32)
 *
 * Buffers: x, z, y, dy, dx, dz come from plain malloc, as in user code (glibc gives
 * 16-byte alignment); --aligned takes 64-byte aligned ones instead, and --offset K
 * (0..1024) starts every buffer K elements later (K floats, or K bf16 values):
 * --aligned --offset 1 is 4 (bf16: 2) bytes past a cache line, what a tensor slice
 * or numpy view may give.
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

/* One benchmarked mode: the layer's activation and element type, and whether the
 * forward gets a residual z (and the backward writes dz). */
typedef struct {
    syncbn_activation act;
    int add; /* add-relu: z in the forward, dz in the backward */
    syncbn_dtype dtype;
} mode;

static const char *act_name(mode m) { return m.add ? "add-relu" : m.act == SYNCBN_ACT_RELU ? "relu" : "none"; }
static const char *dtype_name(mode m) { return m.dtype == SYNCBN_BF16 ? "bf16" : "f32"; }

/* The traffic model of the header comment, in bytes per element. */
static double elem_bytes(mode m) { return m.dtype == SYNCBN_BF16 ? 2.0 : 4.0; }
static double fwd_bpe(mode m) { return (m.add ? 4 : 3) * elem_bytes(m) + (m.act == SYNCBN_ACT_RELU ? 0.125 : 0); }
static double eval_bpe(mode m) { return (m.add ? 3 : 2) * elem_bytes(m); }
static double bwd_bpe(mode m) { return (m.add ? 6 : 5) * elem_bytes(m) + (m.act == SYNCBN_ACT_RELU ? 0.25 : 0); }

/* How tensor buffers are allocated: as users do (plain malloc: 16-byte alignment from
 * glibc, and tensor slices or numpy views start anywhere on an element boundary), or
 * 64-byte aligned with --aligned; --offset K then moves every start by K elements. */
static int g_aligned = 0;
static int64_t g_offset = 0;

typedef struct {
    void *base; /* what to free */
    void *p;    /* the tensor: base + g_offset elements */
} buffer;

static buffer alloc_elems(int64_t count, size_t elsize)
{
    size_t bytes = (size_t)(count + g_offset) * elsize;
    buffer b;
    b.base = g_aligned ? aligned_alloc(64, (bytes + 63) / 64 * 64 + 64) : malloc(bytes + 64);
    if (!b.base) {
        fprintf(stderr, "rank %d: out of memory (%zu bytes)\n", g_rank, bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    b.p = (char *)b.base + (size_t)g_offset * elsize;
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

/* float -> bfloat16 bits, round to nearest even (inputs here are finite). */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void to_bf16_array(uint16_t *dst, const float *src, int64_t count)
{
    for (int64_t i = 0; i < count; i++)
        dst[i] = to_bf16(src[i]);
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

/* The tensors of one element type: x, dy (inputs), z (residual input, add-relu),
 * y, dx, dz (outputs), each [n][C][S] or [n][S][C] of the largest shape. */
typedef struct {
    void *x, *dy, *z, *y, *dx, *dz;
} tensors;

typedef struct {
    double fwd, eval, bwd, fwdbwd; /* median ms */
    double pair;                   /* median over repetitions of this layer's fwd+bwd / layer 0's */
} timings;

static double median(double *t, int r) /* sorts t */
{
    qsort(t, (size_t)r, sizeof *t, cmp_double);
    return r % 2 ? t[r / 2] : 0.5 * (t[r / 2 - 1] + t[r / 2]);
}

/* One layer to time: its communicator (MPI_COMM_WORLD: synchronized; MPI_COMM_SELF:
 * local BN), timeout and mode, and the tensors of its element type. */
typedef struct {
    MPI_Comm comm;
    double timeout;
    mode m;
    const tensors *b;
} layer_spec;

/* Times nl layers of one shape, layout and reduction, described by spec[j], into
 * T[j]. The layers take turns within every repetition (in alternating order), so
 * slow phases of a noisy machine hit all of them alike. */
static void time_layers(shape4 sh, syncbn_layout layout, syncbn_reduction red, int nl, const layer_spec *spec,
                        int reps, timings *T)
{
    syncbn_layer **L = calloc((size_t)nl, sizeof *L);
    for (int j = 0; j < nl; j++) {
        syncbn_config cfg = syncbn_config_default(sh.C);
        cfg.layout = layout;
        cfg.reduction = red;
        cfg.activation = spec[j].m.act;
        cfg.dtype = spec[j].m.dtype;
        cfg.timeout = spec[j].timeout;
        CHECK(syncbn_create(&cfg, spec[j].comm, &L[j]));
    }
    const int64_t S = sh.H * sh.W;
    float *dw = malloc((size_t)sh.C * sizeof *dw), *db = malloc((size_t)sh.C * sizeof *db);
    double *t = malloc(sizeof(double) * (size_t)reps * 5 * (size_t)nl); /* [layer][fwd,bwd,f+b,eval,pair][rep] */
    if (!t || !dw || !db || !L)
        MPI_Abort(MPI_COMM_WORLD, 1);
#define TT(j, what, r) t[((size_t)(j) * 5 + (what)) * (size_t)reps + (size_t)(r)]

    for (int r = -WARMUP; r < reps; r++)
        for (int jj = 0; jj < nl; jj++) {
            const int j = r & 1 ? nl - 1 - jj : jj; /* alternate the order: no layer always goes first */
            const tensors *b = spec[j].b;
            const void *z = spec[j].m.add ? b->z : NULL;
            void *dz = spec[j].m.add ? b->dz : NULL;
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            CHECK(syncbn_forward_ex(L[j], b->x, z, sh.n, S, 1, b->y));
            double t1 = MPI_Wtime();
            MPI_Barrier(MPI_COMM_WORLD);
            double t2 = MPI_Wtime();
            CHECK(syncbn_backward_ex(L[j], b->x, b->dy, sh.n, S, b->dx, dz, dw, db));
            double t3 = MPI_Wtime();
            if (r >= 0)
                TT(j, 0, r) = t1 - t0, TT(j, 1, r) = t3 - t2, TT(j, 2, r) = (t1 - t0) + (t3 - t2);
        }
    for (int r = -WARMUP; r < reps; r++)
        for (int j = 0; j < nl; j++) {
            const tensors *b = spec[j].b;
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            CHECK(syncbn_forward_ex(L[j], b->x, spec[j].m.add ? b->z : NULL, sh.n, S, 0, b->y));
            double t1 = MPI_Wtime();
            if (r >= 0)
                TT(j, 3, r) = t1 - t0;
        }
    /* the slowest rank's time of every repetition, then per-repetition pairs, then medians */
    MPI_Allreduce(MPI_IN_PLACE, t, reps * 5 * nl, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    for (int j = 0; j < nl; j++)
        for (int r = 0; r < reps; r++)
            TT(j, 4, r) = TT(j, 2, r) / TT(0, 2, r);
    for (int j = 0; j < nl; j++) {
        T[j].fwd = median(&TT(j, 0, 0), reps) * 1e3;
        T[j].bwd = median(&TT(j, 1, 0), reps) * 1e3;
        T[j].fwdbwd = median(&TT(j, 2, 0), reps) * 1e3;
        T[j].eval = median(&TT(j, 3, 0), reps) * 1e3;
        T[j].pair = median(&TT(j, 4, 0), reps);
        syncbn_destroy(L[j]);
    }
#undef TT
    free(t), free(dw), free(db), free(L);
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
                "[--reduction fast|repro|both] [--act none,relu,add-relu|all] [--dtype f32,bf16|both] "
                "[--interleave] [--reps R] [--offset K] [--aligned] [--timeout S] [--machine] [--idle-wait W]\n",
                argv0);
}

/* Parses a comma-separated list of names[0..n) (or `all`) into on[]; 0 on an unknown name. */
static int parse_list(const char *v, const char *const *names, int n, int *on)
{
    char buf[128];
    if (strlen(v) >= sizeof buf)
        return 0;
    strcpy(buf, v);
    for (int k = 0; k < n; k++)
        on[k] = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = 0;
        for (int k = 0; k < n; k++)
            if (!strcmp(tok, names[k]) || !strcmp(tok, "all") || !strcmp(tok, "both"))
                on[k] = 1, found = 1;
        if (!found)
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);

    shape4 shapes[MAX_SHAPES] = {{32, 64, 56, 56}, {32, 256, 14, 14}, {256, 1024, 1, 1}, {8, 32, 224, 224}};
    int nshapes = 4, user_shapes = 0, reps = 20, machine = 0, interleave = 0;
    int do_layout[2] = {1, 1}, do_red[2] = {1, 1};
    static const char *const act_names[3] = {"none", "relu", "add-relu"}, *const dtype_names[2] = {"f32", "bf16"};
    int do_act[3] = {1, 0, 0}, do_dtype[2] = {1, 0};
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
        } else if ((!strcmp(a, "--act") && v && parse_list(v, act_names, 3, do_act)) ||
                   (!strcmp(a, "--dtype") && v && parse_list(v, dtype_names, 2, do_dtype))) {
            i++;
        } else if (!strcmp(a, "--interleave")) {
            interleave = 1;
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
    /* The modes, element type outermost: f32 none, relu, add-relu, then bf16 ... */
    mode modes[6];
    int nmodes = 0;
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 3; k++)
            if (do_dtype[d] && do_act[k])
                modes[nmodes++] = (mode){k ? SYNCBN_ACT_RELU : SYNCBN_ACT_NONE, k == 2, d ? SYNCBN_BF16 : SYNCBN_F32};

    if (idle > 0) {
        buffer bx = alloc_elems(8 * 16 * 64, 4), by = alloc_elems(8 * 16 * 64, 4);
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
    int any_add = do_act[2], any_f32 = do_dtype[0], any_bf16 = do_dtype[1];
    /* One set of float buffers for everything; the reference loops reuse x and y.
     * The bf16 tensors (and z, dz) only when a mode needs them. */
    int64_t bufel = maxel > REF_FLOATS ? maxel : REF_FLOATS;
    buffer bx = alloc_elems(bufel, 4), by = alloc_elems(bufel, 4), bdy = alloc_elems(maxel, 4);
    buffer bdx = alloc_elems(any_f32 ? maxel : 1, 4), bz = alloc_elems(any_f32 && any_add ? maxel : 1, 4),
           bdz = alloc_elems(any_f32 && any_add ? maxel : 1, 4);
    float *x = bx.p, *y = by.p, *dy = bdy.p;
    fill(x, bufel, 1000 + (uint64_t)g_rank, 1.0f);
    fill(y, bufel, 2000 + (uint64_t)g_rank, 0.0f);
    fill(dy, maxel, 3000 + (uint64_t)g_rank, 0.0f);
    if (any_f32)
        fill(bdx.p, maxel, 4000 + (uint64_t)g_rank, 0.0f);
    if (any_f32 && any_add)
        fill(bz.p, maxel, 5000 + (uint64_t)g_rank, 0.0f), fill(bdz.p, maxel, 6000 + (uint64_t)g_rank, 0.0f);
    const tensors t32 = {x, dy, bz.p, y, bdx.p, bdz.p};
    tensors t16 = {NULL, NULL, NULL, NULL, NULL, NULL};
    buffer b16[6];
    int nb16 = 0;
    if (any_bf16) {
        /* x, dy and z hold the float values rounded to bf16; y, dx, dz get written anyway. */
        void **slot[6] = {&t16.x, &t16.dy, &t16.z, &t16.y, &t16.dx, &t16.dz};
        for (int k = 0; k < 6; k++) {
            if ((k == 2 || k == 5) && !any_add)
                continue;
            b16[nb16] = alloc_elems(maxel, 2);
            *slot[k] = b16[nb16].p;
            nb16++;
        }
        float *tmp = bdx.p; /* scratch: maxel floats (any_f32) or generated here */
        buffer btmp = {NULL, NULL};
        if (!any_f32)
            btmp = alloc_elems(maxel, 4), tmp = btmp.p;
        to_bf16_array(t16.x, x, maxel);
        to_bf16_array(t16.dy, dy, maxel);
        fill(tmp, maxel, 5000 + (uint64_t)g_rank, 0.0f);
        if (any_add)
            to_bf16_array(t16.z, tmp, maxel);
        fill(tmp, maxel, 2000 + (uint64_t)g_rank, 0.0f);
        to_bf16_array(t16.y, tmp, maxel), to_bf16_array(t16.dx, tmp, maxel);
        if (any_add)
            to_bf16_array(t16.dz, tmp, maxel);
        if (any_f32)
            fill(bdx.p, maxel, 4000 + (uint64_t)g_rank, 0.0f);
        free(btmp.base);
    }

    const int threads = omp_get_max_threads();
    double copy_bw = ref_bandwidth(y, x, REF_FLOATS, 10, 0);
    double read_bw = ref_bandwidth(y, x, REF_FLOATS, 10, 1);
    ROOT_PRINTF("syncbn-bench: %d rank(s), OMP_NUM_THREADS=%d, %d reps (median, max over ranks)\n", g_size, threads,
                reps);
    ROOT_PRINTF("reference (128 MiB per buffer, per rank, all ranks at once): copy %.1f GB/s (8 B/elem), "
                "read %.1f GB/s (4 B/elem)\n",
                copy_bw, read_bw);
    ROOT_PRINTF("buffers: %s, offset %lld element(s): x at %u mod 64 bytes\n",
                g_aligned ? "64-byte aligned" : "malloc", (long long)g_offset, (unsigned)((uintptr_t)x % 64));
    ROOT_PRINTF("traffic model, B/elem (T = 4 f32, 2 bf16): fwd-train 3T (+1/8 relu mask, +T add), "
                "fwd-eval 2T (+T add), bwd 5T (+2/8 relu mask, +T add), fwd+bwd 8T.. (see bench.c)\n\n");
    if (machine)
        ROOT_PRINTF("REFERENCE copy_gbs=%.3f read_gbs=%.3f threads=%d np=%d alloc=%s offset=%lld\n", copy_bw,
                    read_bw, threads, g_size, g_aligned ? "aligned" : "malloc", (long long)g_offset);
    ROOT_PRINTF("%-17s %-6s %-5s %-13s %7s %7s | %8s %6s | %8s %6s | %8s %6s | %8s %6s %6s%s\n", "shape", "layout",
                "mode", "act/dtype", "MB", "copyGB/s", "fwd ms", "GB/s", "eval ms", "GB/s", "bwd ms", "GB/s",
                "f+b ms", "GB/s", "%copy", g_size > 1 ? " | sync/local fwd  bwd   f+b" : "");
    if (timeout > 0)
        ROOT_PRINTF("(last column: fwd+bwd with timeout %g s / without)\n", timeout);

    for (int k = 0; k < nshapes; k++) {
        shape4 sh = shapes[k];
        const int64_t el = sh.n * sh.C * sh.H * sh.W;
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
                /* Per mode: synchronized, then local (P > 1), then with a timeout; with
                 * --interleave all modes' layers in ONE round (pairs against the first). */
                const int per = 1 + (g_size > 1) + (timeout > 0);
                layer_spec spec[6 * 3];
                timings TT[6 * 3];
                for (int mi = 0; mi < nmodes; mi++) {
                    const mode m = modes[mi];
                    layer_spec *sp = spec + mi * per;
                    const tensors *tb = m.dtype == SYNCBN_BF16 ? &t16 : &t32;
                    sp[0] = (layer_spec){MPI_COMM_WORLD, 0, m, tb};
                    if (g_size > 1)
                        sp[1] = (layer_spec){MPI_COMM_SELF, 0, m, tb};
                    if (timeout > 0)
                        sp[per - 1] = (layer_spec){MPI_COMM_WORLD, timeout, m, tb};
                }
                if (interleave)
                    time_layers(sh, lay, red, nmodes * per, spec, reps, TT);
                for (int mi = 0; mi < nmodes; mi++) {
                    const mode m = modes[mi];
                    if (!interleave)
                        time_layers(sh, lay, red, per, spec + mi * per, reps, TT + mi * per);
                    const timings T = TT[mi * per], Lo = TT[mi * per + (g_size > 1)], To = TT[mi * per + per - 1];
                    const double gel = (double)el * 1e-9; /* giga-elements; bytes per element: traffic model */
                    const double mb = (double)el * elem_bytes(m) * 1e-6;
                    const double fb_bpe = fwd_bpe(m) + bwd_bpe(m);
                    double fb_bw = fb_bpe * gel / (T.fwdbwd * 1e-3);
                    char mname[24], pname[40] = "";
                    snprintf(mname, sizeof mname, "%s/%s", act_name(m), dtype_name(m));
                    if (interleave)
                        snprintf(pname, sizeof pname, " pair_fwdbwd=%.4f", T.pair);
                    ROOT_PRINTF("%-17s %-6s %-5s %-13s %7.1f %7.1f | %8.3f %6.1f | %8.3f %6.1f | %8.3f %6.1f | "
                                "%8.3f %6.1f %5.0f%%",
                                sname, li ? "nhwc" : "nchw", ri ? "repro" : "fast", mname, mb, size_copy_bw, T.fwd,
                                fwd_bpe(m) * gel / (T.fwd * 1e-3), T.eval, eval_bpe(m) * gel / (T.eval * 1e-3),
                                T.bwd, bwd_bpe(m) * gel / (T.bwd * 1e-3), T.fwdbwd, fb_bw,
                                100 * fb_bw / size_copy_bw);
                    if (g_size > 1)
                        ROOT_PRINTF(" | %15.3f %5.3f %5.3f", T.fwd / Lo.fwd, T.bwd / Lo.bwd, T.fwdbwd / Lo.fwdbwd);
                    if (timeout > 0)
                        ROOT_PRINTF(" | timeout/none %.3f", To.fwdbwd / T.fwdbwd);
                    if (interleave)
                        ROOT_PRINTF(" | /%s %.3f", mi ? "first" : "self", T.pair);
                    ROOT_PRINTF("\n");
                    if (machine && timeout > 0)
                        ROOT_PRINTF("TIMEOUT impl=syncbn-%s layout=%s shape=%s np=%d fwdbwd_ms=%.4f "
                                    "timeout_fwdbwd_ms=%.4f ratio=%.4f act=%s dtype=%s\n",
                                    ri ? "repro" : "fast", li ? "nhwc" : "nchw", sname, g_size, T.fwdbwd, To.fwdbwd,
                                    To.fwdbwd / T.fwdbwd, act_name(m), dtype_name(m));
                    if (machine)
                        ROOT_PRINTF("RESULT impl=syncbn-%s layout=%s shape=%s fwd_ms=%.4f fwdbwd_ms=%.4f "
                                    "bwd_ms=%.4f eval_ms=%.4f np=%d copy_gbs=%.3f local_fwdbwd_ms=%.4f act=%s "
                                    "dtype=%s fwdbwd_bpe=%.3f%s\n",
                                    ri ? "repro" : "fast", li ? "nhwc" : "nchw", sname, T.fwd, T.fwdbwd, T.bwd,
                                    T.eval, g_size, size_copy_bw, g_size > 1 ? Lo.fwdbwd : T.fwdbwd, act_name(m),
                                    dtype_name(m), fb_bpe, pname);
                }
            }
        }
    }
    for (int k = 0; k < nb16; k++)
        free(b16[k].base);
    free(bx.base), free(by.base), free(bdy.base), free(bdx.base), free(bz.base), free(bdz.base);
    MPI_Finalize();
    return 0;
}
