/*
 * bench_apply_ab.c - per-pass A/B of two versions of src/apply.c: normalize (plain,
 * with the ReLU and its mask, with the residual addition) and the input gradient
 * (plain, with the mask), bf16 and f32, on one shape and layout (buffers from
 * malloc, coefficients shaped like a trained layer's). For each case the versions take
 * turns round after round (base, new, f32 in rotating order) and it prints the median
 * over rounds of the per-round time ratios new/base and bf16/f32 of each version
 * (0.5 = bf16 at f32's byte rate), and the bf16 fallback rate of each. The bf16
 * outputs (and mask) of the two versions must be the same bits ("BITS DIFFER"
 * otherwise). At 1 thread times are the thread's CPU time, else wall time.
 * Build and run (BASE: the old apply.c, e.g. from `git show main~1:src/apply.c`):
 *   F="-O3 -DNDEBUG -march=native -ffp-contract=off -fopenmp -Isrc -Iinclude"
 *   R="-Dsbn_normalize=base_normalize -Dsbn_backward_dx=base_backward_dx -Dsbn_bf16_counts=base_bf16_counts"
 *   mpicc $F $R -Dsbn_coef_wrap=base_coef_wrap -Dsbn_apply_scratch_floats=base_apply_scratch_floats \
 *         -Dsbn_test_bf16_path=base_test_bf16_path -c BASE.c -o /tmp/base.o
 *   mpicc $F scripts/bench/bench_apply_ab.c src/apply.c /tmp/base.o -o /tmp/apply_ab -lm
 *   OMP_NUM_THREADS=1 /tmp/apply_ab 31 32,64,56,56 nchw     # rounds, shape, layout
 */
#include "bench_util.h"
#include "moments.h"
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void base_normalize(void *y, const void *x, const void *z, int relu, uint8_t *mask, const double *mean,
                    const double *scale, const double *shift, float *scratch, sbn_shape sh);
void base_backward_dx(void *dx, void *dz, const void *x, const void *dy, const uint8_t *mask, const double *mean,
                      const double *k, const double *a, const double *b, float *scratch, sbn_shape sh);
void base_bf16_counts(uint64_t *vectors, uint64_t *fallbacks);

enum { NCASE = 5 };
static const char *case_name[NCASE] = {"normalize", "norm relu", "norm add", "dx", "dx relu"};

int main(int argc, char **argv)
{
    long v[4] = {32, 64, 56, 56};
    int rounds = argc > 1 ? atoi(argv[1]) : 21;
    rounds = rounds < 1 ? 1 : rounds > 64 ? 64 : rounds;
    if (argc > 2 && sscanf(argv[2], "%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3]) != 4)
        return 2;
    const int nhwc = argc > 3 && !strcmp(argv[3], "nhwc");
    const sbn_shape sh = {v[0], v[1], v[2] * v[3], nhwc ? SYNCBN_NHWC : SYNCBN_NCHW, SYNCBN_BF16};
    const int64_t C = sh.C, E = sh.n * C * sh.S, cw = C + SBN_COEF_PAD, mbytes = (E / 512 + 2) * 64;
    float *x = malloc(E * 4), *dy = malloc(E * 4), *y = malloc(E * 4);
    uint16_t *xb = malloc(E * 2), *dyb = malloc(E * 2), *zb = malloc(E * 2), *yb[2] = {malloc(E * 2), malloc(E * 2)};
    uint8_t *mask = aligned_alloc(64, (size_t)mbytes), *mk[3]; /* the ReLU mask: dx's; each version's */
    for (int j = 0; j < 3; j++)
        mk[j] = aligned_alloc(64, (size_t)mbytes);
    double *co = calloc(6 * (size_t)cw, sizeof *co);
    float *scratch = aligned_alloc(64, (size_t)sbn_apply_scratch_floats(C) * sizeof(float));
    if (!x || !dy || !y || !xb || !dyb || !zb || !yb[0] || !yb[1] || !mask || !mk[0] || !mk[1] || !mk[2] || !co || !scratch)
        return 1;
    double *mean = co, *k = co + cw, *a = co + 2 * cw, *kg = co + 3 * cw, *ag = co + 4 * cw, *bg = co + 5 * cw;
    uint64_t r = 1;
    for (int64_t e = 0; e < E; e++) { /* as bench_passes.c: x ~ 1 + U(-1.5, 1.5) + an offset, dy ~ U(-0.5, 0.5) */
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        x[e] = (float)(1.0 + ((r >> 40) / (double)(1 << 24) * 3 - 1.5) + 0.25 * sin((double)(e % 97)));
        dy[e] = (float)((r >> 20 & 0xFFFFF) / (double)(1 << 20) - 0.5);
        xb[e] = to_bf16(x[e]), dyb[e] = to_bf16(dy[e]), zb[e] = to_bf16(2 * dy[e]);
    }
    for (int64_t i = 0; i < mbytes; i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        mask[i] = (uint8_t)(r >> 40);
    }
    for (int64_t c = 0; c < C; c++) { /* x's mean and deviation are about 1 and 0.9 */
        const double is = 1 / sqrt(0.78 + 1e-5);
        mean[c] = 1.0 + 0.01 * (c % 5), k[c] = is * (0.9 + 0.2 * (double)c / (double)C), a[c] = 0.1 * (c % 7) - 0.2;
        kg[c] = k[c], ag[c] = 0.003 * (c % 3) - 0.001, bg[c] = is * is * 0.01 * (c % 4 - 1.5);
    }
    sbn_coef_wrap(mean, C), sbn_coef_wrap(k, C), sbn_coef_wrap(a, C);
    sbn_coef_wrap(kg, C), sbn_coef_wrap(ag, C), sbn_coef_wrap(bg, C);
    double t[NCASE][3][64]; /* [case][base bf16, new bf16, f32][round] */
    int64_t differ = 0;
    uint64_t v0[2], f0[2], v1[2], f1[2];
    base_bf16_counts(&v0[0], &f0[0]), sbn_bf16_counts(&v0[1], &f0[1]);
    for (int q = 0; q < rounds; q++)
        for (int cs = 0; cs < NCASE; cs++) {
            for (int w0 = 0; w0 < 3; w0++) {
                const int w = (w0 + q) % 3, bf = w < 2;
                sbn_shape s = sh;
                s.dt = bf ? SYNCBN_BF16 : SYNCBN_F32;
                const void *X = bf ? (void *)xb : (void *)x, *DY = bf ? (void *)dyb : (void *)dy;
                const void *Z = cs == 2 ? (bf ? (void *)zb : (void *)dy) : NULL;
                void *Y = bf ? (void *)yb[w] : (void *)y;
                uint8_t *M = cs == 1 ? mk[w] : NULL;
                const double t0 = now();
                if (cs < 3)
                    (w == 0 ? base_normalize : sbn_normalize)(Y, X, Z, cs == 1, M, mean, k, a, scratch, s);
                else
                    (w == 0 ? base_backward_dx : sbn_backward_dx)(Y, NULL, X, DY, cs == 4 ? mask : NULL, mean, kg,
                                                                  ag, bg, scratch, s);
                t[cs][w][q] = now() - t0;
            }
            if (q == 0) { /* the two versions' bits */
                differ += memcmp(yb[0], yb[1], (size_t)E * 2) != 0;
                if (cs == 1)
                    differ += memcmp(mk[0], mk[1], (size_t)(E / 8)) != 0;
            }
        }
    base_bf16_counts(&v1[0], &f1[0]), sbn_bf16_counts(&v1[1], &f1[1]);
    printf("%ld,%ld,%ld,%ld %s, %d thread(s), median of %d rounds; fallbacks: base %.3f%%, new %.3f%% of vectors "
           "of 16\n",
           v[0], v[1], v[2], v[3], nhwc ? "NHWC" : "NCHW", omp_get_max_threads(), rounds,
           100.0 * (double)(f1[0] - f0[0]) / (double)(v1[0] - v0[0] ? v1[0] - v0[0] : 1),
           100.0 * (double)(f1[1] - f0[1]) / (double)(v1[1] - v0[1] ? v1[1] - v0[1] : 1));
    printf("%-10s | %8s | %9s %9s | %7s\n", "pass", "new/base", "base/f32", "new/f32", "f32 ms");
    for (int cs = 0; cs < NCASE; cs++) {
        double nb[64], bf[64], nf[64], ms[64];
        for (int q = 0; q < rounds; q++)
            nb[q] = t[cs][1][q] / t[cs][0][q], bf[q] = t[cs][0][q] / t[cs][2][q], nf[q] = t[cs][1][q] / t[cs][2][q],
            ms[q] = t[cs][2][q] * 1e3;
        printf("%-10s | %8.3f | %9.3f %9.3f | %7.3f\n", case_name[cs], med(nb, rounds), med(bf, rounds),
               med(nf, rounds), med(ms, rounds));
    }
    if (differ)
        printf("BITS DIFFER in %lld cases of the first round\n", (long long)differ);
    return differ != 0;
}
