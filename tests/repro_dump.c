/*
 * repro_dump.c - a fingerprint of SYNCBN_REPRODUCIBLE's outputs on fixed data, for
 * comparing BUILDS: tests/test_repro_builds.sh runs it from the native
 * (-march=native), AVX2-only (x86-64-v3) and portable (x86-64) builds at several
 * rank and thread counts and requires every fingerprint file to be byte-identical.
 *
 * Usage: mpirun -np P repro_dump OUT.txt [--perturb]
 *   OUT.txt    one line per (configuration, output): element count and a 64-bit
 *              FNV-1a hash of the output's bytes, written by rank 0
 *   --perturb  flip the lowest bit of one input float per configuration: the
 *              script's check that the fingerprint sees a one-bit change
 *
 * Configurations: both layouts x S = 1, 49, 3136 x C = 3, 64, 257 x momentum 0.1
 * (data centred on 0) and NaN, the cumulative average (data centred on 1000): 36.
 * Each runs two training forwards (two running-statistics updates), a backward and
 * an eval forward. Outputs: y of the second training forward, dx, dweight, dbias,
 * running_mean, running_var and the eval y; y and dx are gathered in rank order.
 * Then the fused and bfloat16 configurations, through syncbn_forward_ex / syncbn_backward_ex:
 * {f32, bf16} x {none + z, relu, relu + z} x both layouts x (S, C) = (1, 64), (49, 3),
 * (196, 257): 36 more, each with the same sequence of calls (z in every forward, dz
 * asked for when there is a z) and outputs y, dx, dz (with z), dweight, dbias, eval y.
 * The global batch is the same at any rank count; ranks hold uneven slices (at 3
 * ranks the first holds none). Data come from integer hashing only (no libm), so
 * every build sees the same inputs.
 *
 * What it does not do: judge anything. Equality is the script's business; accuracy
 * is tested against float64 references elsewhere (test_layer, test_reproducible).
 */
#include <mpi.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "syncbn.h"

static int rank, nranks;

static void die(const char *what, int rc) {
    fprintf(stderr, "repro_dump (rank %d): %s: %s\n", rank, what, rc ? syncbn_strerror(rc) : "failed");
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) die("out of memory", 0);
    return p;
}

// splitmix64 of a key: the value depends only on the logical element, not on the split
static uint64_t mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static double sym(uint64_t key) { return (double)(mix(key) >> 11) * 0x1.0p-52 - 1.0; } // [-1, 1), exact

static uint64_t fnv1a(const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}

typedef struct {
    syncbn_layout layout;
    int64_t S, C;
    double momentum, offset;
} config;

// samples [lo, hi) of the global batch, in the layout; `salt` picks the batch
static void fill(float *buf, const config *k, int64_t lo, int64_t hi, uint64_t salt, double offset, double scale) {
    for (int64_t i = lo; i < hi; i++)
        for (int64_t c = 0; c < k->C; c++)
            for (int64_t s = 0; s < k->S; s++) {
                uint64_t key = salt ^ (uint64_t)((i * k->C + c) * k->S + s); // the logical [i][c][s]
                int64_t at = k->layout == SYNCBN_NCHW ? ((i - lo) * k->C + c) * k->S + s : ((i - lo) * k->S + s) * k->C + c;
                buf[at] = (float)(offset + scale * (1 + c % 5) * sym(key));
            }
}

// count elements of es bytes each
static void put_es(FILE *f, const char *cfg, const char *name, const void *v, int64_t count, size_t es) {
    if (rank == 0) fprintf(f, "%s %-12s %9lld %016llx\n", cfg, name, (long long)count,
                           (unsigned long long)fnv1a(v, es * (size_t)count));
}

static void put(FILE *f, const char *cfg, const char *name, const float *v, int64_t count) {
    put_es(f, cfg, name, v, count, sizeof(float));
}

// an output of which every rank holds its samples (elements of es bytes): concatenated
// in rank order on rank 0
static void put_gathered_es(FILE *f, const char *cfg, const char *name, const void *mine, int64_t count,
                            int64_t total, size_t es) {
    int c = (int)(count * (int64_t)es), *counts = xmalloc(sizeof(int) * nranks), *displs = xmalloc(sizeof(int) * nranks);
    MPI_Gather(&c, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD);
    for (int r = 0, d = 0; rank == 0 && r < nranks; d += counts[r], r++) displs[r] = d;
    char *all = rank == 0 ? xmalloc(es * (size_t)total) : NULL;
    MPI_Gatherv(mine, c, MPI_BYTE, all, counts, displs, MPI_BYTE, 0, MPI_COMM_WORLD);
    put_es(f, cfg, name, all, total, es);
    free(counts);
    free(displs);
    free(all);
}

static void put_gathered(FILE *f, const char *cfg, const char *name, const float *mine, int64_t count, int64_t total) {
    put_gathered_es(f, cfg, name, mine, count, total, sizeof(float));
}

static void run(FILE *f, const config *k, int perturb) {
    char name[96];
    snprintf(name, sizeof name, "%s S=%-4lld C=%-3lld momentum=%-3s offset=%-4g", k->layout == SYNCBN_NCHW ? "NCHW" : "NHWC",
             (long long)k->S, (long long)k->C, isnan(k->momentum) ? "NaN" : "0.1", k->offset);
    int64_t N = k->S == 1 ? 256 : 7;
    // uneven: rank r holds [N r^2/P^2, N (r+1)^2/P^2); at P = 3, N = 7 the first rank holds none
    int64_t lo = N * rank * rank / (nranks * nranks), hi = N * (rank + 1) * (rank + 1) / (nranks * nranks);
    int64_t n = hi - lo, per = k->C * k->S, total = N * per;
    size_t bytes = sizeof(float) * (size_t)(n * per);
    float *xa = xmalloc(bytes), *xb = xmalloc(bytes), *dy = xmalloc(bytes), *y = xmalloc(bytes), *dx = xmalloc(bytes);
    float *ye = xmalloc(bytes), *dw = xmalloc(sizeof(float) * (size_t)k->C), *db = xmalloc(sizeof(float) * (size_t)k->C);
    fill(xa, k, lo, hi, 0x1000000000ULL, k->offset, 1.0);
    fill(xb, k, lo, hi, 0x2000000000ULL, k->offset, 2.0);
    fill(dy, k, lo, hi, 0x3000000000ULL, 0.0, 0.1);
    if (perturb && lo == 0 && n > 0) { // the first element of the global batch, lowest mantissa bit
        uint32_t u;
        memcpy(&u, xb, 4);
        u ^= 1;
        memcpy(xb, &u, 4);
    }

    syncbn_config cfg = syncbn_config_default(k->C);
    cfg.layout = k->layout;
    cfg.momentum = k->momentum;
    cfg.reduction = SYNCBN_REPRODUCIBLE;
    syncbn_layer *bn;
    int rc = syncbn_create(&cfg, MPI_COMM_WORLD, &bn);
    if (rc) die("syncbn_create", rc);
    for (int64_t c = 0; c < k->C; c++) { // not the identity, so that weight and bias take part
        syncbn_weight(bn)[c] = (float)(1.0 + 0.5 * sym(0x4000000000ULL + (uint64_t)c));
        syncbn_bias(bn)[c] = (float)(0.5 * sym(0x5000000000ULL + (uint64_t)c));
    }
    if ((rc = syncbn_forward(bn, xa, n, k->S, 1, y))) die("forward (first)", rc);
    if ((rc = syncbn_forward(bn, xb, n, k->S, 1, y))) die("forward (second)", rc);
    if ((rc = syncbn_backward(bn, xb, dy, n, k->S, dx, dw, db))) die("backward", rc);
    if ((rc = syncbn_forward(bn, xa, n, k->S, 0, ye))) die("forward (eval)", rc);

    put_gathered(f, name, "y", y, n * per, total);
    put_gathered(f, name, "dx", dx, n * per, total);
    put_gathered(f, name, "y_eval", ye, n * per, total);
    put(f, name, "dweight", dw, k->C);
    put(f, name, "dbias", db, k->C);
    put(f, name, "running_mean", syncbn_running_mean(bn), k->C);
    put(f, name, "running_var", syncbn_running_var(bn), k->C);
    syncbn_destroy(bn);
    float *bufs[] = {xa, xb, dy, y, dx, ye, dw, db};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
}

// ---- fused activation, residual z, bfloat16 ----

typedef struct {
    syncbn_layout layout;
    int64_t S, C;
    syncbn_dtype dtype;
    syncbn_activation act;
    int z; // a residual in every forward, and dz from the backward
} fconfig;

// float to bfloat16, nearest-even, by integer operations (inputs only: any fixed rule
// gives every build the same data)
static uint16_t to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// like fill(), in the element type
static void fill_t(void *buf, const fconfig *k, int64_t lo, int64_t hi, uint64_t salt, double offset, double scale) {
    for (int64_t i = lo; i < hi; i++)
        for (int64_t c = 0; c < k->C; c++)
            for (int64_t s = 0; s < k->S; s++) {
                uint64_t key = salt ^ (uint64_t)((i * k->C + c) * k->S + s);
                int64_t at = k->layout == SYNCBN_NCHW ? ((i - lo) * k->C + c) * k->S + s : ((i - lo) * k->S + s) * k->C + c;
                float v = (float)(offset + scale * (1 + c % 5) * sym(key));
                if (k->dtype == SYNCBN_BF16) ((uint16_t *)buf)[at] = to_bf16(v);
                else ((float *)buf)[at] = v;
            }
}

static void run_fused(FILE *f, const fconfig *k, int perturb) {
    char name[96];
    snprintf(name, sizeof name, "%s S=%-4lld C=%-3lld %s %s%s", k->layout == SYNCBN_NCHW ? "NCHW" : "NHWC",
             (long long)k->S, (long long)k->C, k->dtype == SYNCBN_BF16 ? "bf16" : "f32 ",
             k->act == SYNCBN_ACT_RELU ? "relu" : "none", k->z ? "+z" : "  ");
    int64_t N = k->S == 1 ? 256 : 7;
    int64_t lo = N * rank * rank / (nranks * nranks), hi = N * (rank + 1) * (rank + 1) / (nranks * nranks);
    int64_t n = hi - lo, per = k->C * k->S, total = N * per;
    size_t es = k->dtype == SYNCBN_BF16 ? 2 : 4, bytes = es * (size_t)(n * per);
    char *xa = xmalloc(bytes), *xb = xmalloc(bytes), *z = xmalloc(bytes), *dy = xmalloc(bytes), *y = xmalloc(bytes);
    char *dx = xmalloc(bytes), *dz = xmalloc(bytes), *ye = xmalloc(bytes);
    float *dw = xmalloc(sizeof(float) * (size_t)k->C), *db = xmalloc(sizeof(float) * (size_t)k->C);
    fill_t(xa, k, lo, hi, 0x1000000000ULL, 0.0, 1.0);
    fill_t(xb, k, lo, hi, 0x2000000000ULL, 0.5, 2.0);
    fill_t(dy, k, lo, hi, 0x3000000000ULL, 0.0, 0.1);
    fill_t(z, k, lo, hi, 0x6000000000ULL, 0.0, 0.5); // of the order of BN(x): the ReLU cuts about half
    if (perturb && lo == 0 && n > 0) { // the first element of the global batch, lowest bit
        if (k->dtype == SYNCBN_BF16) ((uint16_t *)xb)[0] ^= 1;
        else {
            uint32_t u;
            memcpy(&u, xb, 4);
            u ^= 1;
            memcpy(xb, &u, 4);
        }
    }
    syncbn_config cfg = syncbn_config_default(k->C);
    cfg.layout = k->layout;
    cfg.reduction = SYNCBN_REPRODUCIBLE;
    cfg.dtype = k->dtype;
    cfg.activation = k->act;
    syncbn_layer *bn;
    int rc = syncbn_create(&cfg, MPI_COMM_WORLD, &bn);
    if (rc) die("syncbn_create (fused)", rc);
    for (int64_t c = 0; c < k->C; c++) {
        syncbn_weight(bn)[c] = (float)(1.0 + 0.5 * sym(0x4000000000ULL + (uint64_t)c));
        syncbn_bias(bn)[c] = (float)(0.5 * sym(0x5000000000ULL + (uint64_t)c));
    }
    const void *zz = k->z ? z : NULL;
    if ((rc = syncbn_forward_ex(bn, xa, zz, n, k->S, 1, y))) die("forward_ex (first)", rc);
    if ((rc = syncbn_forward_ex(bn, xb, zz, n, k->S, 1, y))) die("forward_ex (second)", rc);
    if ((rc = syncbn_backward_ex(bn, xb, dy, n, k->S, dx, k->z ? dz : NULL, dw, db))) die("backward_ex", rc);
    if ((rc = syncbn_forward_ex(bn, xa, zz, n, k->S, 0, ye))) die("forward_ex (eval)", rc);

    put_gathered_es(f, name, "y", y, n * per, total, es);
    put_gathered_es(f, name, "dx", dx, n * per, total, es);
    if (k->z) put_gathered_es(f, name, "dz", dz, n * per, total, es);
    put_gathered_es(f, name, "y_eval", ye, n * per, total, es);
    put(f, name, "dweight", dw, k->C);
    put(f, name, "dbias", db, k->C);
    syncbn_destroy(bn);
    void *bufs[] = {xa, xb, z, dy, y, dx, dz, ye, dw, db};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (argc < 2 || (argc == 3 && strcmp(argv[2], "--perturb") != 0) || argc > 3) {
        if (rank == 0) fprintf(stderr, "usage: mpirun -np P repro_dump OUT.txt [--perturb]\n");
        MPI_Finalize();
        return 2;
    }
    FILE *f = NULL;
    if (rank == 0 && !(f = fopen(argv[1], "w"))) die(argv[1], 0);
    static const int64_t spatial[] = {1, 49, 3136}, channels[] = {3, 64, 257};
    for (int l = 0; l < 2; l++)
        for (int si = 0; si < 3; si++)
            for (int ci = 0; ci < 3; ci++)
                for (int mi = 0; mi < 2; mi++) {
                    config k = {l ? SYNCBN_NHWC : SYNCBN_NCHW, spatial[si], channels[ci], mi ? NAN : 0.1, mi ? 1000.0 : 0.0};
                    run(f, &k, argc == 3);
                }
    static const int64_t fshape[][2] = {{1, 64}, {49, 3}, {196, 257}}; // (S, C)
    static const struct { syncbn_activation act; int z; } fvar[] = {
        {SYNCBN_ACT_NONE, 1}, {SYNCBN_ACT_RELU, 0}, {SYNCBN_ACT_RELU, 1}};
    for (int t = 0; t < 2; t++)
        for (int v = 0; v < 3; v++)
            for (int l = 0; l < 2; l++)
                for (int si = 0; si < 3; si++) {
                    fconfig k = {l ? SYNCBN_NHWC : SYNCBN_NCHW, fshape[si][0], fshape[si][1],
                                 t ? SYNCBN_BF16 : SYNCBN_F32, fvar[v].act, fvar[v].z};
                    run_fused(f, &k, argc == 3);
                }
    if (f && fclose(f) != 0) die(argv[1], 0);
    MPI_Finalize();
    return 0;
}
