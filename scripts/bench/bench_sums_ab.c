/*
 * bench_sums_ab.c - per-pass A/B of two versions of src/sums.c: the forward sums, the
 * backward sums and the backward sums with the ReLU mask, FAST and REPRODUCIBLE, f32
 * and bf16, on the four standard shapes in both layouts (buffers from malloc).
 * REPRODUCIBLE twice: accumulated (`repro`, what each of several ranks does) and
 * rounded by the kernels (`repro-r`, sums and accumulators both given: what one rank
 * does, moments.h).
 * For each case the two versions take turns (A B, then B A, ...) and it prints the
 * median over rounds of the per-round time ratio new/base, the new version's input
 * throughput in GB/s (bytes of x, and dy, read once), and the bf16/f32 time ratio of
 * each version (0.5 = bf16 at the byte rate of f32). FAST and rounded REPRODUCIBLE
 * results of the two versions must be the same bits ("BITS DIFFER" otherwise). At 1
 * thread times are the thread's CPU time (less sensitive to a shared machine), else
 * wall time.
 * Build and run (BASE: the old sums.c, e.g. from `git show main~1:src/sums.c`):
 *   F="-O3 -DNDEBUG -march=native -ffp-contract=off -fopenmp -Isrc -Iinclude"
 *   mpicc $F -Dsbn_forward_sums=base_forward_sums -Dsbn_backward_sums=base_backward_sums \
 *         -c BASE.c -o /tmp/base.o
 *   mpicc $F scripts/bench/bench_sums_ab.c src/sums.c /tmp/base.o src/exactsum.c -o /tmp/sums_ab -lm
 *   OMP_NUM_THREADS=1 /tmp/sums_ab 9        # rounds
 */
#include "exactsum.h"
#include "moments.h"
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
void base_forward_sums(const void *x, sbn_shape sh, double *s1, double *s2, int64_t *acc1, int64_t *acc2);
void base_backward_sums(const void *x, const void *dy, const uint8_t *mask, const double *mean, sbn_shape sh,
                        double *s1, double *s2, int64_t *acc1, int64_t *acc2);
static double now(void) {
    struct timespec t;
    clock_gettime(omp_get_max_threads() == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
static int cmpd(const void *a, const void *b) {
    double x = *(double *)a, y = *(double *)b;
    return x < y ? -1 : x > y;
}
static double med(double *v, int n) {
    qsort(v, n, 8, cmpd);
    return v[n / 2];
}
int main(int argc, char **argv) {
    int64_t shapes[4][4] = {{32, 64, 56, 56}, {32, 256, 14, 14}, {256, 1024, 1, 1}, {8, 32, 224, 224}};
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    if (reps < 1 || reps > 64)
        reps = reps < 1 ? 1 : 64;
    int64_t maxE = 8 * 32 * 224 * 224;
    float *x = malloc(maxE * 4), *dy = malloc(maxE * 4);
    uint16_t *xb = malloc(maxE * 2), *dyb = malloc(maxE * 2);
    uint8_t *mask = malloc(maxE / 8 + 16);
    uint64_t k = 1;
    for (int64_t e = 0; e < maxE; e++) {
        k = k * 6364136223846793005ULL + 1442695040888963407ULL;
        float f = (float)((k >> 40) / (double)(1 << 24) * 4 - 1.5);
        x[e] = f;
        uint32_t b;
        memcpy(&b, &f, 4);
        xb[e] = b >> 16;
        float g = (float)((k >> 20 & 0xFFFFF) / (double)(1 << 20) - 0.5);
        dy[e] = g;
        memcpy(&b, &g, 4);
        dyb[e] = b >> 16;
    }
    for (int64_t e = 0; e < maxE / 8 + 16; e++)
        mask[e] = (uint8_t)(e * 37);
    double *s1 = malloc(1024 * 8), *s2 = malloc(1024 * 8), *mean = calloc(1024 + 8, 8),
           *t1 = malloc(1024 * 8), *t2 = malloc(1024 * 8);
    int64_t W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
    int64_t *a1 = malloc(1024 * W1 * 8), *a2 = malloc(1024 * W2 * 8);
    const char *vn[3] = {"fwd", "bwd", "bwd+relu"};
    printf("thr shape layout mode pass | new/base f32 bf16 | new GB/s f32 bf16 | new bf16/f32 time | base "
           "bf16/f32 time\n");
    for (int sh = 0; sh < 4; sh++)
        for (int lay = 0; lay < 2; lay++)
            for (int repro = 0; repro < 3; repro++) /* fast, repro, repro-r */
                for (int kind = 0; kind < 3; kind++) {
                    sbn_shape s = {.n = shapes[sh][0],
                                   .C = shapes[sh][1],
                                   .S = shapes[sh][2] * shapes[sh][3],
                                   .layout = lay ? SYNCBN_NHWC : SYNCBN_NCHW};
                    int64_t E = s.n * s.C * s.S;
                    double t[2][2][64];
                    int bad = 0;
                    for (int r = 0; r < reps; r++)
                        for (int bf = 0; bf < 2; bf++)
                            for (int w0 = 0; w0 < 2; w0++) {
                                int which = (w0 + r) & 1;
                                s.dt = bf ? SYNCBN_BF16 : SYNCBN_F32;
                                const void *X = bf ? (void *)xb : (void *)x,
                                           *DY = bf ? (void *)dyb : (void *)dy;
                                if (repro) {
                                    memset(a1, 0, s.C * W1 * 8);
                                    memset(a2, 0, s.C * W2 * 8);
                                }
                                double *o1 = which ? s1 : t1, *o2 = which ? s2 : t2;
                                const int sums = repro != 1; /* rounded sums wanted */
                                double t0 = now();
                                if (kind == 0) {
                                    if (which)
                                        sbn_forward_sums(X, s, sums ? o1 : NULL, sums ? o2 : NULL,
                                                         repro ? a1 : NULL, repro ? a2 : NULL);
                                    else
                                        base_forward_sums(X, s, sums ? o1 : NULL, sums ? o2 : NULL,
                                                          repro ? a1 : NULL, repro ? a2 : NULL);
                                } else {
                                    if (which)
                                        sbn_backward_sums(X, DY, kind == 2 ? mask : NULL, mean, s,
                                                          sums ? o1 : NULL, sums ? o2 : NULL,
                                                          repro ? a1 : NULL, repro ? a2 : NULL);
                                    else
                                        base_backward_sums(X, DY, kind == 2 ? mask : NULL, mean, s,
                                                           sums ? o1 : NULL, sums ? o2 : NULL,
                                                           repro ? a1 : NULL, repro ? a2 : NULL);
                                }
                                t[bf][which][r] = now() - t0;
                                if (sums && w0 == 1 && (memcmp(s1, t1, s.C * 8) || memcmp(s2, t2, s.C * 8)))
                                    bad = 1;
                            }
                    double rn[2], rb[2][64], rr[64];
                    for (int bf = 0; bf < 2; bf++) {
                        for (int r = 0; r < reps; r++)
                            rb[bf][r] = t[bf][1][r] / t[bf][0][r];
                        rn[bf] = med(rb[bf], reps);
                    }
                    double bytes = (kind ? 2.0 : 1.0) * E * 4;
                    double mt[2][2];
                    for (int bf = 0; bf < 2; bf++)
                        for (int w = 0; w < 2; w++) {
                            double c[64];
                            memcpy(c, t[bf][w], reps * 8);
                            mt[bf][w] = med(c, reps);
                        }
                    for (int r = 0; r < reps; r++)
                        rr[r] = t[1][1][r] / t[0][1][r];
                    double rnew = med(rr, reps);
                    for (int r = 0; r < reps; r++)
                        rr[r] = t[1][0][r] / t[0][0][r];
                    double rbase = med(rr, reps);
                    printf("%d %ld,%ld,%ld,%ld %s %s %-8s | %.2f %.2f | %5.1f %5.1f | %.2f | %.2f %s\n",
                           omp_get_max_threads(), (long)shapes[sh][0], (long)shapes[sh][1],
                           (long)shapes[sh][2], (long)shapes[sh][3], lay ? "nhwc" : "nchw",
                           repro == 2 ? "repro-r" : repro ? "repro" : "fast", vn[kind], rn[0], rn[1],
                           bytes / mt[0][1] / 1e9, bytes / 2 / mt[1][1] / 1e9, rnew, rbase, bad ? "BITS DIFFER" : "");
                    fflush(stdout);
                }
}
