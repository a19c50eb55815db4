/*
 * bench_passes.c - where the time of a BN training step goes, pass by pass: forward
 * sums, normalize (with the ReLU and its mask), backward sums (with the mask) and the
 * input gradient (with the mask), float32 and bfloat16, FAST, on the four standard
 * shapes in both layouts (buffers from malloc, realistic coefficients computed from
 * the data as the layer does). The variants of a case take turns round after round,
 * and it prints per pass the median over rounds of the per-round time ratios
 * bf16/f32 and relu/plain (0.5 = bf16 at f32's byte rate; 1.0 = the ReLU is free),
 * the f32 time, and the fallback rate of the bf16 float path. At 1 thread times are
 * the thread's CPU time, else wall time. Calls the internal kernels directly:
 *   F="-O3 -DNDEBUG -march=native -ffp-contract=off -fopenmp -Isrc -Iinclude"
 *   mpicc $F scripts/bench/bench_passes.c src/sums.c src/apply.c src/exactsum.c -o /tmp/passes -lm
 *   OMP_NUM_THREADS=1 /tmp/passes 7 [N,C,H,W]     # rounds, optional shape
 */
#include "bench_util.h"
#include "moments.h"
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { P_FSUM, P_NORM, P_BSUM, P_DX, NPASS };
static const char *pass_name[NPASS] = {"fwd sums", "normalize", "bwd sums", "dx"};

int main(int argc, char **argv)
{
    int64_t shapes[4][4] = {{32, 64, 56, 56}, {8, 32, 224, 224}, {32, 256, 14, 14}, {256, 1024, 1, 1}};
    int nshapes = 4;
    int rounds = argc > 1 ? atoi(argv[1]) : 7;
    rounds = rounds < 1 ? 1 : rounds > 64 ? 64 : rounds;
    if (argc > 2) {
        long v[4];
        if (sscanf(argv[2], "%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3]) != 4)
            return 2;
        for (int j = 0; j < 4; j++)
            shapes[0][j] = v[j];
        nshapes = 1;
    }
    int64_t maxE = 0, maxC = 0;
    for (int s = 0; s < nshapes; s++) {
        const int64_t E = shapes[s][0] * shapes[s][1] * shapes[s][2] * shapes[s][3];
        maxE = E > maxE ? E : maxE, maxC = shapes[s][1] > maxC ? shapes[s][1] : maxC;
    }
    float *x = malloc(maxE * 4), *dy = malloc(maxE * 4), *y = malloc(maxE * 4), *dx = malloc(maxE * 4);
    uint16_t *xb = malloc(maxE * 2), *dyb = malloc(maxE * 2), *yb = malloc(maxE * 2), *dxb = malloc(maxE * 2);
    uint8_t *mask = aligned_alloc(64, (size_t)(maxE / 512 + 2) * 64);
    const int64_t cw = maxC + SBN_COEF_PAD;
    double *co = malloc(8 * (size_t)cw * sizeof *co); /* mean k a | k a b | s1 s2 */
    float *scratch = aligned_alloc(64, (size_t)sbn_apply_scratch_floats(maxC) * sizeof *scratch);
    if (!x || !dy || !y || !dx || !xb || !dyb || !yb || !dxb || !mask || !co || !scratch)
        return 1;
    double *mean = co, *k = co + cw, *a = co + 2 * cw, *kg = co + 3 * cw, *ag = co + 4 * cw, *bg = co + 5 * cw,
           *s1 = co + 6 * cw, *s2 = co + 7 * cw;
    uint64_t r = 1;
    for (int64_t e = 0; e < maxE; e++) { /* x ~ 1 + U(-1.5, 1.5) + a per-position offset; dy ~ U(-0.5, 0.5) */
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        x[e] = (float)(1.0 + ((r >> 40) / (double)(1 << 24) * 3 - 1.5) + 0.25 * sin((double)(e % 97)));
        dy[e] = (float)((r >> 20 & 0xFFFFF) / (double)(1 << 20) - 0.5);
        xb[e] = to_bf16(x[e]), dyb[e] = to_bf16(dy[e]);
    }
    printf("per pass: median over %d rounds of the paired ratios; f32 ms is the plain f32 pass; fallbacks: "
           "bf16 float-path vectors recomputed exactly\n",
           rounds);
    printf("%-3s %-14s %-4s %-9s | %8s | %7s %7s %7s %7s | %s\n", "thr", "shape", "lay", "pass", "f32 ms",
           "bf16/f", "relu/pl", "bfr/bf", "bfr/f", "fallbacks");
    for (int s = 0; s < nshapes; s++)
        for (int lay = 0; lay < 2; lay++) {
            sbn_shape sh = {shapes[s][0], shapes[s][1], shapes[s][2] * shapes[s][3],
                            lay ? SYNCBN_NHWC : SYNCBN_NCHW, SYNCBN_F32};
            const int64_t C = sh.C, E = sh.n * C * sh.S;
            double t[NPASS][4][64]; /* [pass][f32, f32 relu, bf16, bf16 relu][round] */
            uint64_t v0, f0, v1, f1;
            sbn_bf16_counts(&v0, &f0);
            for (int q = 0; q < rounds; q++)
                for (int w0 = 0; w0 < 4; w0++) {
                    const int w = (w0 + q) % 4, bf = w >= 2, relu = w & 1;
                    sh.dt = bf ? SYNCBN_BF16 : SYNCBN_F32;
                    const void *X = bf ? (void *)xb : (void *)x, *DY = bf ? (void *)dyb : (void *)dy;
                    void *Y = bf ? (void *)yb : (void *)y, *DX = bf ? (void *)dxb : (void *)dx;
                    double t0 = now();
                    sbn_forward_sums(X, sh, s1, s2, NULL, NULL);
                    double t1 = now();
                    t[P_FSUM][w][q] = t1 - t0;
                    const double N = (double)(sh.n * sh.S);
                    for (int64_t c = 0; c < C; c++) {
                        const double m = s1[c] / N, v = s2[c] / N - m * m, is = 1 / sqrt((v > 0 ? v : 0) + 1e-5);
                        mean[c] = m, k[c] = is * (0.9 + 0.2 * (double)c / (double)C), a[c] = 0.1 * (c % 7) - 0.2;
                    }
                    sbn_coef_wrap(mean, C), sbn_coef_wrap(k, C), sbn_coef_wrap(a, C);
                    t0 = now();
                    sbn_normalize(Y, X, NULL, relu, relu ? mask : NULL, mean, k, a, scratch, sh);
                    t1 = now();
                    t[P_NORM][w][q] = t1 - t0;
                    t0 = now();
                    sbn_backward_sums(X, DY, relu ? mask : NULL, mean, sh, s1, s2, NULL, NULL);
                    t1 = now();
                    t[P_BSUM][w][q] = t1 - t0;
                    for (int64_t c = 0; c < C; c++) {
                        const double is = k[c] / (0.9 + 0.2 * (double)c / (double)C);
                        kg[c] = k[c], ag[c] = s1[c] / N, bg[c] = is * is * s2[c] / N;
                    }
                    sbn_coef_wrap(kg, C), sbn_coef_wrap(ag, C), sbn_coef_wrap(bg, C);
                    t0 = now();
                    sbn_backward_dx(DX, NULL, X, DY, relu ? mask : NULL, mean, kg, ag, bg, scratch, sh);
                    t1 = now();
                    t[P_DX][w][q] = t1 - t0;
                }
            sbn_bf16_counts(&v1, &f1);
            for (int p = 0; p < NPASS; p++) {
                double rb[64], rr[64], rbr[64], rbf[64];
                for (int q = 0; q < rounds; q++) {
                    rb[q] = t[p][2][q] / t[p][0][q], rr[q] = t[p][1][q] / t[p][0][q];
                    rbr[q] = t[p][3][q] / t[p][2][q], rbf[q] = t[p][3][q] / t[p][0][q];
                }
                printf("%-3d %ld,%ld,%ld,%-4ld %-4s %-9s | %8.3f | %7.2f %7.2f %7.2f %7.2f |", omp_get_max_threads(),
                       (long)shapes[s][0], (long)shapes[s][1], (long)shapes[s][2], (long)shapes[s][3],
                       lay ? "nhwc" : "nchw", pass_name[p], med(t[p][0], rounds) * 1e3, med(rb, rounds),
                       med(rr, rounds), med(rbr, rounds), med(rbf, rounds));
                if (p == P_DX)
                    printf(" %.3f%% of %.0f vectors", 100.0 * (double)(f1 - f0) / (double)(v1 - v0 ? v1 - v0 : 1),
                           (double)(v1 - v0));
                printf("\n");
            }
            (void)E;
            fflush(stdout);
        }
    return 0;
}
