/*
 * scale_driver.c - the communication of one ResNet-50 training step, for the scaling
 * study of scripts/scale_sim.sh (SimGrid SMPI) and its check under the real mpirun.
 *
 * The workload: the 53 BN layers of ResNet-50 (torchvision, v1.5 bottlenecks) in the
 * order a training step calls them: every layer's forward in network order, then
 * every layer's backward in reverse. Channel counts C and spatial sizes S are those
 * of the network at an input of R x R pixels (--res). The global batch of G samples
 * (--batch) is fixed, split in rank order (rank r holds samples [r*G/P, (r+1)*G/P)),
 * so REPRODUCIBLE results must not depend on P: the driver prints a hash of every
 * layer's weight, bias and running statistics after the steps, which the study
 * compares between simulated P and the real mpirun at P = 1..4.
 *
 * Modes (--modes, comma separated), each run as its own sequence of steps:
 *   fast   syncbn FAST, the real library calls
 *   repro  syncbn REPRODUCIBLE, the real library calls
 *   torch  PyTorch 1.13 SyncBatchNorm's communication as plain MPI calls
 *          (torch/nn/modules/_functions.py): forward MPI_Allgather of each rank's
 *          [mean[C], invstd[C], count] as 2C+1 floats (the input's dtype), backward
 *          MPI_Allreduce(SUM) of [sum_dy[C], sum_dy_xmu[C]] as 2C floats
 *   floor  a bare MPI_Allreduce(SUM) of 2C doubles per forward and per backward: the
 *          floor of syncbn's design (its data without header or agreement words)
 * Per mode, rank 0 prints one line
 *   RESULT mode=<m> P=<P> calls=<n> step_s=<max over ranks of the last step's time> hash=<h>
 * (hash only for fast/repro; FAST's hash may depend on P, REPRODUCIBLE's must not).
 *
 * --layers distinct runs one layer per distinct C (6) instead of all 53 and weights
 * each call's time by how many layers share its C; step_s then assumes that calls of
 * the same size cost the same, which the study checks against --layers all. The
 * hash then covers those 6 layers (compared with a real run of the same options).
 *
 * What it does not do: time compute. Under SMPI the study turns computation off
 * (smpi/simulate-computation:no), so a step's time is its communication; under the
 * real mpirun the time printed is wall time and only the hash matters.
 *
 * Built with smpicc and -DSCALE_SIM_NBC_BLOCKING, MPI_Iallreduce is replaced by a
 * blocking MPI_Allreduce (see below and docs/scale.md): SMPI 3.32 implements
 * MPI_Iallreduce as every rank sending its whole buffer to every other rank, P(P-1)
 * messages, which is neither what Open MPI does nor feasible to simulate at 1024
 * ranks. Without a timeout the library uses it only in syncbn_create.
 */
#define _POSIX_C_SOURCE 200809L /* strtok_r: under SMPI every rank shares libc's strtok state */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "syncbn.h"

#ifdef SCALE_SIM_NBC_BLOCKING
/* SMPI declares MPI_* weak, so this definition replaces its MPI_Iallreduce for the
 * library compiled into this program. The request returned is already complete
 * (MPI_Wait and MPI_Test accept MPI_REQUEST_NULL): a nonblocking allreduce modelled
 * as the blocking algorithm of the collective selector, without overlap. */
int MPI_Iallreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm,
                   MPI_Request *req)
{
    *req = MPI_REQUEST_NULL;
    return MPI_Allreduce(sendbuf, recvbuf, count, type, op, comm);
}
#endif

#ifdef SMPI_SHARED_MALLOC
/* The all-gathered statistics of the torch mode are P*(2C+1) floats per rank, and
 * SMPI runs every rank in one process: shared memory, whose content is not used. */
#define BIG_MALLOC(bytes) SMPI_SHARED_MALLOC(bytes)
#define BIG_FREE(p) SMPI_SHARED_FREE(p)
#else
#define BIG_MALLOC(bytes) malloc(bytes)
#define BIG_FREE(p) free(p)
#endif

#define MAX_LAYERS 64

static int rank, nranks;

static void die(const char *what, int rc)
{
    fprintf(stderr, "scale_driver rank %d: %s: %s\n", rank, what, rc < 0 ? syncbn_strerror(rc) : "failed");
    MPI_Abort(MPI_COMM_WORLD, 1);
}

#define CHECK(call)                   \
    do {                              \
        int rc_ = (call);             \
        if (rc_ != 0)                 \
            die(#call, rc_);          \
    } while (0)

/* ---- the workload: ResNet-50's BN layers ---- */

typedef struct {
    int64_t C, S; /* channels, spatial positions (H*W) */
    int weight;   /* --layers distinct: how many layers this one stands for */
} bn_shape;

static int64_t ceil_half(int64_t h) { return (h + 1) / 2; }

/* torchvision resnet50: conv1 (7x7, stride 2, pad 3) -> bn1 -> maxpool (3x3, stride 2,
 * pad 1) -> 4 stages of bottlenecks (blocks, width) = (3,64) (4,128) (6,256) (3,512),
 * stride 2 in the first block's 3x3 conv of stages 2-4. A bottleneck calls bn1 (width,
 * at the input size), bn2 and bn3 (width, 4*width, at the output size), then its
 * downsample BN (4*width, first block only). A stride-2 layer gives ceil(h/2). */
static int resnet50_bn(int64_t res, bn_shape *out)
{
    static const int blocks[4] = {3, 4, 6, 3}, width[4] = {64, 128, 256, 512};
    int n = 0;
    int64_t h = ceil_half(res);
    out[n++] = (bn_shape){64, h * h, 1};
    h = ceil_half(h);
    for (int st = 0; st < 4; st++)
        for (int b = 0; b < blocks[st]; b++) {
            const int64_t w = width[st];
            out[n++] = (bn_shape){w, h * h, 1};
            if (b == 0 && st > 0)
                h = ceil_half(h);
            out[n++] = (bn_shape){w, h * h, 1};
            out[n++] = (bn_shape){4 * w, h * h, 1};
            if (b == 0)
                out[n++] = (bn_shape){4 * w, h * h, 1};
        }
    return n;
}

/* One layer per distinct C, weighted by its multiplicity (S of its first occurrence:
 * the message sizes do not depend on S). */
static int distinct_layers(bn_shape *L, int n)
{
    int m = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < m && L[k].C != L[i].C)
            k++;
        if (k < m)
            L[k].weight++;
        else
            L[m++] = L[i];
    }
    return m;
}

/* ---- deterministic data: a function of (purpose, layer, GLOBAL element index) ---- */

static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* x[n][C][S] of samples [g0, g0+n): per-channel offsets and scales so that the
 * statistics are not trivial; dy likewise with another purpose. */
static void fill(float *v, int purpose, int layer, int64_t g0, int64_t n, int64_t C, int64_t S)
{
    const uint64_t key = mix((uint64_t)purpose << 32 | (uint64_t)layer);
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                const uint64_t e = (uint64_t)(((g0 + i) * C + c) * S + s);
                const double u = (double)(mix(key ^ e) >> 11) * 0x1p-53; /* [0, 1) */
                v[(i * C + c) * S + s] = (float)((u - 0.5) * (1 + c % 7) + 0.25 * (double)(c % 5));
            }
}

/* FNV-1a over bytes. */
static uint64_t fnv(uint64_t h, const void *p, size_t bytes)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < bytes; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* ---- one mode ---- */

typedef struct {
    bn_shape *L;
    int nl;
    int64_t lo, n; /* this rank's samples */
    int steps;
    double timeout;
} run_cfg;


static void run_syncbn(const run_cfg *r, syncbn_reduction red, double *step_s, uint64_t *hash)
{
    syncbn_layer *layer[MAX_LAYERS];
    int64_t maxe = 1;
    for (int l = 0; l < r->nl; l++) {
        syncbn_config cfg = syncbn_config_default(r->L[l].C);
        cfg.reduction = red;
        cfg.timeout = r->timeout;
        CHECK(syncbn_create(&cfg, MPI_COMM_WORLD, &layer[l]));
        const int64_t e = r->n * r->L[l].C * r->L[l].S;
        maxe = e > maxe ? e : maxe;
    }
    float *x = malloc(sizeof(float) * (size_t)maxe), *y = malloc(sizeof(float) * (size_t)maxe);
    float *dy = malloc(sizeof(float) * (size_t)maxe), *dw = malloc(sizeof(float) * 2048), *db = malloc(sizeof(float) * 2048);
    if (!x || !y || !dy || !dw || !db)
        die("malloc", 0);

    double last = 0;
    for (int step = 0; step < r->steps; step++) {
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        double weighted = 0;
        for (int l = 0; l < r->nl; l++) {
            const double tc = MPI_Wtime();
            fill(x, 2 * step, l, r->lo, r->n, r->L[l].C, r->L[l].S);
            CHECK(syncbn_forward(layer[l], x, r->n, r->L[l].S, 1, y));
            weighted += (r->L[l].weight - 1) * (MPI_Wtime() - tc);
        }
        for (int l = r->nl - 1; l >= 0; l--) {
            const double tc = MPI_Wtime();
            fill(x, 2 * step, l, r->lo, r->n, r->L[l].C, r->L[l].S);
            fill(dy, 2 * step + 1, l, r->lo, r->n, r->L[l].C, r->L[l].S);
            CHECK(syncbn_backward(layer[l], x, dy, r->n, r->L[l].S, y, dw, db));
            weighted += (r->L[l].weight - 1) * (MPI_Wtime() - tc);
            /* SGD on the global gradients, so that the next step sees other weights */
            float *w = syncbn_weight(layer[l]), *b = syncbn_bias(layer[l]);
            for (int64_t c = 0; c < r->L[l].C; c++)
                w[c] -= 0.01f * dw[c], b[c] -= 0.01f * db[c];
        }
        const double mine = MPI_Wtime() - t0 + weighted;
        MPI_Reduce(&mine, &last, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    }
    *step_s = last;

    uint64_t h = 0xcbf29ce484222325ull;
    for (int l = 0; l < r->nl; l++) {
        const size_t bytes = sizeof(float) * (size_t)r->L[l].C;
        h = fnv(h, syncbn_weight(layer[l]), bytes);
        h = fnv(h, syncbn_bias(layer[l]), bytes);
        h = fnv(h, syncbn_running_mean(layer[l]), bytes);
        h = fnv(h, syncbn_running_var(layer[l]), bytes);
        syncbn_destroy(layer[l]);
    }
    *hash = h;
    free(x), free(y), free(dy), free(dw), free(db);
}

/* The torch and floor modes: the same sequence of calls on a duplicate of the
 * world communicator, with buffers of the sizes and types they send. */
static void run_plain(const run_cfg *r, int torch, double *step_s)
{
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    float *gathered = BIG_MALLOC(sizeof(float) * (size_t)nranks * (2 * 2048 + 1));
    float fbuf[2 * 2048 + 1];
    double dbuf[2 * 2048];
    if (!gathered)
        die("malloc", 0);
    memset(fbuf, 0, sizeof fbuf), memset(dbuf, 0, sizeof dbuf);
    double last = 0;
    for (int step = 0; step < r->steps; step++) {
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        double weighted = 0;
        for (int l = 0; l < r->nl; l++) {
            const double tc = MPI_Wtime();
            const int C = (int)r->L[l].C;
            if (torch) {
                fbuf[2 * C] = (float)(r->n * r->L[l].S); /* count */
                CHECK(MPI_Allgather(fbuf, 2 * C + 1, MPI_FLOAT, gathered, 2 * C + 1, MPI_FLOAT, comm));
            } else {
                CHECK(MPI_Allreduce(MPI_IN_PLACE, dbuf, 2 * C, MPI_DOUBLE, MPI_SUM, comm));
            }
            weighted += (r->L[l].weight - 1) * (MPI_Wtime() - tc);
        }
        for (int l = r->nl - 1; l >= 0; l--) {
            const double tc = MPI_Wtime();
            const int C = (int)r->L[l].C;
            if (torch)
                CHECK(MPI_Allreduce(MPI_IN_PLACE, fbuf, 2 * C, MPI_FLOAT, MPI_SUM, comm));
            else
                CHECK(MPI_Allreduce(MPI_IN_PLACE, dbuf, 2 * C, MPI_DOUBLE, MPI_SUM, comm));
            weighted += (r->L[l].weight - 1) * (MPI_Wtime() - tc);
        }
        const double mine = MPI_Wtime() - t0 + weighted;
        MPI_Reduce(&mine, &last, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    }
    *step_s = last;
    BIG_FREE(gathered);
    MPI_Comm_free(&comm);
}

static void usage(void)
{
    if (rank == 0)
        fprintf(stderr, "usage: scale_driver [--modes fast,repro,torch,floor] [--layers all|distinct]\n"
                        "                    [--res R] [--batch G] [--steps K] [--timeout T]\n");
    MPI_Finalize();
    exit(2);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);

    const char *modes = "fast,repro,torch,floor";
    int distinct = 0, steps = 2;
    int64_t res = 16, batch = 2048;
    double timeout = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        if (!strcmp(a, "--modes"))
            modes = v;
        else if (!strcmp(a, "--layers") && (!strcmp(v, "all") || !strcmp(v, "distinct")))
            distinct = !strcmp(v, "distinct");
        else if (!strcmp(a, "--res"))
            res = atoll(v);
        else if (!strcmp(a, "--batch"))
            batch = atoll(v);
        else if (!strcmp(a, "--steps"))
            steps = atoi(v);
        else if (!strcmp(a, "--timeout"))
            timeout = atof(v);
        else
            usage();
        i++;
    }
    if (res < 1 || batch < 2 || steps < 1 || timeout < 0)
        usage();

    bn_shape L[MAX_LAYERS];
    int nl = resnet50_bn(res, L);
    if (distinct)
        nl = distinct_layers(L, nl);
    int calls = 0;
    for (int l = 0; l < nl; l++)
        calls += 2 * L[l].weight;
    run_cfg r = {L, nl, batch * rank / nranks, batch * (rank + 1) / nranks - batch * rank / nranks, steps, timeout};

    char list[256];
    snprintf(list, sizeof list, "%s", modes);
    char *save = NULL;
    for (char *m = strtok_r(list, ",", &save); m; m = strtok_r(NULL, ",", &save)) {
        double t = 0;
        uint64_t h = 0;
        const int lib = !strcmp(m, "fast") || !strcmp(m, "repro");
        if (lib)
            run_syncbn(&r, !strcmp(m, "repro") ? SYNCBN_REPRODUCIBLE : SYNCBN_FAST, &t, &h);
        else if (!strcmp(m, "torch") || !strcmp(m, "floor"))
            run_plain(&r, !strcmp(m, "torch"), &t);
        else
            usage();
        if (rank == 0) {
            printf("RESULT mode=%s P=%d calls=%d step_s=%.9e", m, nranks, calls, t);
            if (lib)
                printf(" hash=%016llx", (unsigned long long)h);
            printf("\n");
            fflush(stdout);
        }
    }
    MPI_Finalize();
    return 0;
}
