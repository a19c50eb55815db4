/*
 * test_apply.c - Check suite for the bfloat16 elementwise passes of src/apply.c
 * (normalize with its epilogues, and the input gradient), called directly, and for
 * the float32 input gradient with the ReLU mask (f32_relu_dx_bits, below).
 *
 * bfloat16 outputs are computed in float and recomputed on the exact double path per
 * vector wherever a proven bound says the float result might round differently
 * (apply.c, "bfloat16 in float"). The contract is unchanged: every output is the
 * double result, rounded once to nearest-even. These tests hold the kernels to it:
 *   - the reference is built here: the double formula in the library's order, and an
 *     independent rounding to bfloat16 (the nearest of the candidates by exact
 *     distances, ties to even);
 *   - ordinary data: the fast path must give the reference's bits, at 1 and 2
 *     threads, and the same bits as the exact path alone (sbn_test_bf16_path(1));
 *   - adversarial data: per channel, coefficients that place the outputs within one
 *     float ulp of a bfloat16 midpoint, with cancellation, so float's own error can
 *     cross it. The real code must give the reference's bits (having fallen back);
 *     a safety margin of zero, which trusts float wherever it is finite (mode 2),
 *     must give wrong bits here, which shows the test can tell the paths apart.
 */
#include "moments.h"
#include "testutil.h"

#include <check.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static double uni(void) /* [0, 1) */
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rng >> 11) * 0x1p-53;
}


/* One problem: tensors [n][C][S] or [n][S][C] of bfloat16, per-channel coefficients. */
typedef struct {
    sbn_shape sh;
    int64_t N;                 /* n*C*S */
    uint16_t *x, *z, *dy;      /* [N] */
    uint8_t *mask;             /* [N/8 + 16], 8-byte aligned */
    double *m, *k, *a, *b;     /* [C + SBN_COEF_PAD], wrapped */
} problem;

static int64_t chan(const problem *p, int64_t e)
{
    const sbn_shape sh = p->sh;
    return sh.layout == SYNCBN_NCHW ? e / sh.S % sh.C : e % sh.C;
}

static problem alloc_problem(int64_t n, int64_t C, int64_t S, syncbn_layout layout)
{
    problem p = {.sh = {n, C, S, layout, SYNCBN_BF16}, .N = n * C * S};
    p.x = malloc(p.N * 2), p.z = malloc(p.N * 2), p.dy = malloc(p.N * 2);
    p.mask = aligned_alloc(8, (size_t)(p.N / 64 + 2) * 8);
    const size_t cb = (size_t)(C + SBN_COEF_PAD) * sizeof(double);
    p.m = malloc(cb), p.k = malloc(cb), p.a = malloc(cb), p.b = malloc(cb);
    ck_assert(p.x && p.z && p.dy && p.mask && p.m && p.k && p.a && p.b);
    memset(p.mask, 0, (size_t)(p.N / 64 + 2) * 8);
    return p;
}

static void free_problem(problem *p)
{
    free(p->x), free(p->z), free(p->dy), free(p->mask), free(p->m), free(p->k), free(p->a), free(p->b);
}

static void wrap(problem *p)
{
    sbn_coef_wrap(p->m, p->sh.C), sbn_coef_wrap(p->k, p->sh.C), sbn_coef_wrap(p->a, p->sh.C);
    sbn_coef_wrap(p->b, p->sh.C);
}

/* The reference of normalize: bits of y (and the mask bits when relu) at element e. */
static uint16_t ref_y(const problem *p, int64_t e, int add, int relu, int *bit)
{
    const int64_t c = chan(p, e);
    double r = ((double)tu_bf16_value(p->x[e]) - p->m[c]) * p->k[c] + p->a[c];
    if (add)
        r += tu_bf16_value(p->z[e]);
    uint16_t h = tu_bf16_round(r);
    *bit = tu_bf16_value(h) > 0;
    if (relu && !*bit)
        h = 0;
    return h;
}

/* The reference of the gradient: dx at e (g = dy, masked when relu). */
static uint16_t ref_dx(const problem *p, int64_t e, int relu, uint16_t *g)
{
    const int64_t c = chan(p, e);
    *g = relu && !((p->mask[e >> 3] >> (e & 7)) & 1) ? 0 : p->dy[e];
    const double gd = tu_bf16_value(*g), x = tu_bf16_value(p->x[e]);
    return tu_bf16_round(p->k[c] * (gd - p->a[c] - (x - p->m[c]) * p->b[c]));
}

typedef struct {
    int64_t wrong;              /* outputs (or mask bits) differing from the reference */
    uint64_t vectors, fallbacks; /* of this check's calls */
} verdict;

/* Every normalize variant (none, add, relu with and without the mask, add+relu) and
 * every gradient variant (dx, dx+dz, dz only; with and without the mask), at 1 and 2
 * threads, counted against the reference. */
static verdict check_problem(problem *p, int path)
{
    verdict v = {0};
    uint64_t v0, f0, v1, f1;
    sbn_bf16_counts(&v0, &f0);
    sbn_test_bf16_path(path);
    uint16_t *out = malloc(p->N * 2), *out2 = malloc(p->N * 2);
    uint8_t *mk = aligned_alloc(8, (size_t)(p->N / 64 + 2) * 8);
    float *scratch = aligned_alloc(64, (size_t)sbn_apply_scratch_floats(p->sh.C) * sizeof(float));
    ck_assert(out && out2 && mk && scratch);
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        for (int var = 0; var < 5; var++) {
            const int add = var == 1 || var == 4, relu = var >= 2, wmask = var == 3 || var == 4;
            memset(mk, 0, (size_t)(p->N / 64 + 2) * 8);
            sbn_normalize(out, p->x, add ? p->z : NULL, relu, wmask ? mk : NULL, p->m, p->k, p->a, scratch, p->sh);
            for (int64_t e = 0; e < p->N; e++) {
                int bit;
                const uint16_t want = ref_y(p, e, add, relu, &bit);
                v.wrong += out[e] != want;
                if (wmask)
                    v.wrong += ((mk[e >> 3] >> (e & 7)) & 1) != bit;
            }
        }
        for (int var = 0; var < 6; var++) {
            const int relu = var >= 3, dz = var % 3 >= 1, dx = var % 3 != 2;
            sbn_backward_dx(dx ? out : NULL, dz ? out2 : NULL, p->x, p->dy, relu ? p->mask : NULL, p->m, p->k, p->a,
                            p->b, scratch, p->sh);
            for (int64_t e = 0; e < p->N; e++) {
                uint16_t g;
                const uint16_t want = ref_dx(p, e, relu, &g);
                if (dx)
                    v.wrong += out[e] != want;
                if (dz)
                    v.wrong += out2[e] != g;
            }
        }
    }
    sbn_test_bf16_path(0);
    sbn_bf16_counts(&v1, &f1);
    v.vectors = v1 - v0, v.fallbacks = f1 - f0;
    free(out), free(out2), free(mk), free(scratch);
    return v;
}

static void random_mask(problem *p)
{
    for (int64_t e = 0; e < p->N; e++)
        if (uni() < 0.6)
            p->mask[e >> 3] |= (uint8_t)(1u << (e & 7));
}

/* Ordinary data: activations ~ N(mu, sigma) per channel, BN coefficients from them. */
static void ordinary(problem *p)
{
    const int64_t C = p->sh.C;
    for (int64_t c = 0; c < C; c++) {
        const double mu = 4 * uni() - 2, sigma = 0.1 + 3 * uni();
        p->m[c] = mu + 0.01 * (uni() - 0.5);
        const double is = 1 / sqrt(sigma * sigma + 1e-5);
        p->k[c] = is * (0.5 + uni());
        p->a[c] = uni() - 0.5;
        p->b[c] = is * (uni() - 0.5) * 0.1;
    }
    wrap(p);
    for (int64_t e = 0; e < p->N; e++) {
        const int64_t c = chan(p, e);
        const double g = tu_normal(2 * (uint64_t)e), h = tu_normal(2 * (uint64_t)e + 1);
        p->x[e] = tu_bf16_round(p->m[c] + g / p->k[c] * 0.9);
        p->z[e] = tu_bf16_round(h);
        p->dy[e] = tu_bf16_round(0.01 * g * h + 0.001 * (uni() - 0.5));
    }
    random_mask(p);
}

/* A random bfloat16 midpoint of magnitude in [2^e, 2^(e+1)), either sign. */
static double midpoint(int e)
{
    const double lo = ldexp(1 + floor(uni() * 128) / 128, e);
    return (uni() < 0.5 ? -1 : 1) * (lo + ldexp(1, e - 8));
}

/* The target of channel c in adversarial data: 0 the plain output, 1 the output with
 * z, 2 the gradient; -1 none. NCHW: every channel, by c % 3 (a vector holds one
 * channel). NHWC: one channel in each group of 16 (a float vector's lanes), at a
 * position that moves from group to group, target (c / 16) % 3. A vector falls back
 * as a whole, so with many targets in it one that lands exactly ON its midpoint
 * (where even a zero margin falls back) would hide the others' wrong sides. */
static int target_of(const problem *p, int64_t c)
{
    if (p->sh.layout == SYNCBN_NCHW)
        return (int)(c % 3);
    return c % 16 == (c / 16) % 16 ? (int)(c / 16 % 3) : -1;
}

/* Adversarial data. Every element of channel c has the same x (and z, dy), and a
 * targeted channel's coefficients put its normalize output (with and without z), or
 * its gradient, at M + tau: M a bfloat16 midpoint, 0 < |tau| < one float ulp of M.
 * With cancel, the coefficients are large against the output (cancellation), so
 * float's error, from rounding the coefficients and the products, is several float
 * ulps: float often lands on M or on the wrong side of it; this tries the test's
 * term in e. Without, nothing cancels (m = a = b = 0, the output is one product k x,
 * k g with the gradient, plus z), |tau| is up to 2 float ulps, and float's error is
 * the rounding of k to float and of the product, about an ulp of the output: this
 * tries the test's term in R |y|: a margin of a quarter of the proven one (R = 2^-24)
 * fails it, measured when it was written.
 * target_of selects what is targeted; the other outputs, and channels without a
 * target, are ordinary. */
static void adversarial(problem *p, int cancel)
{
    const int64_t C = p->sh.C;
    uint16_t *vals = malloc((size_t)(3 * C) * sizeof *vals); /* x, z, dy of each channel */
    ck_assert(vals);
    for (int64_t c = 0; c < C; c++) {
        const int tg = target_of(p, c);
        if (tg < 0) { /* ordinary coefficients and values */
            p->m[c] = uni() - 0.5, p->k[c] = 0.5 + uni(), p->a[c] = uni() - 0.5, p->b[c] = (uni() - 0.5) * 0.1;
            vals[3 * c] = tu_bf16_round(4 * uni() - 2), vals[3 * c + 1] = tu_bf16_round(uni() - 0.5);
            vals[3 * c + 2] = tu_bf16_round(uni() - 0.5);
            continue;
        }
        const int e = (int)floor(uni() * 12) - 6;
        const double M = midpoint(e),
                     tau = (uni() < 0.5 ? -1 : 1) * (0.05 + (cancel ? 0.9 : 2) * uni()) * ldexp(1, e - 23);
        const double x = tu_bf16_value(tu_bf16_round((uni() + 0.5) * ldexp(1, (int)floor(uni() * 6) - 2)));
        const double z = tu_bf16_value(tu_bf16_round(uni() - 0.5)), g = tu_bf16_value(tu_bf16_round(uni() * 2 - 1));
        if (!cancel) { /* y = k x (+ z), dx = k g: only k's rounding and the product's */
            const double gn = g != 0 ? g : 0.5, target = M + tau;
            p->m[c] = 0, p->a[c] = 0, p->b[c] = 0;
            p->k[c] = tg == 2 ? target / gn : (target - (tg == 1 ? z : 0)) / x;
            vals[3 * c] = tu_bf16_round(x), vals[3 * c + 1] = tu_bf16_round(z), vals[3 * c + 2] = tu_bf16_round(gn);
            continue;
        }
        const double big = ldexp(1, 3 + (int)floor(uni() * 5)) * fabs(M); /* the cancelling terms' size */
        double k = (1 + uni()) * big / fabs(x), m = x * (1 + (uni() - 0.5) * 0.01);
        double b = (uni() - 0.5) * 2 * big / fabs(k * x);
        const double target = M + tau;
        double a = 0;
        if (tg != 2) { /* normalize: a = target (- z) - (x - m) k */
            a = target - (tg == 1 ? z : 0) - (x - m) * k;
        } else { /* gradient: a = g - (x - m) b - target / k */
            a = g - (x - m) * b - target / k;
        }
        p->m[c] = m, p->k[c] = k, p->a[c] = a, p->b[c] = b;
        vals[3 * c] = tu_bf16_round(x), vals[3 * c + 1] = tu_bf16_round(z), vals[3 * c + 2] = tu_bf16_round(g);
    }
    for (int64_t i = 0; i < p->N; i++) {
        const int64_t c = chan(p, i);
        p->x[i] = vals[3 * c], p->z[i] = vals[3 * c + 1], p->dy[i] = vals[3 * c + 2];
    }
    free(vals);
    wrap(p);
    memset(p->mask, 0xFF, (size_t)(p->N / 64 + 2) * 8); /* the masked gradient sees g too */
}

/* How many of the adversarial targets really lie within `ulps` float ulps of a
 * midpoint in the library's double formula (the construction above is in double too,
 * so a few may miss by its own rounding); reported, and most must. */
static int64_t near_midpoints(const problem *p, int64_t *targets, int ulps)
{
    int64_t near = 0;
    *targets = 0;
    for (int64_t c = 0; c < p->sh.C; c++) {
        const int tg = target_of(p, c);
        if (tg < 0)
            continue;
        ++*targets;
        int64_t e = 0;
        while (chan(p, e) != c)
            e++;
        const double x = tu_bf16_value(p->x[e]);
        double r = tg != 2 ? (x - p->m[c]) * p->k[c] + p->a[c] + (tg == 1 ? tu_bf16_value(p->z[e]) : 0)
                              : p->k[c] * (tu_bf16_value(p->dy[e]) - p->a[c] - (x - p->m[c]) * p->b[c]);
        const float f = (float)fabs(r);
        uint32_t fb;
        memcpy(&fb, &f, sizeof fb);
        const uint32_t mb = (fb & 0xFFFF0000u) | 0x8000u;
        float mid;
        memcpy(&mid, &mb, sizeof mid);
        near += fabs(fabs(r) - mid) <= ulps * ldexp(1, ilogb(mid) - 23);
    }
    return near;
}

START_TEST(bf16_fast_path_ordinary)
{
    const int64_t shapes[][3] = {{4, 13, 37}, {3, 64, 49}, {2, 40, 1}, {5, 8, 64}};
    for (int s = 0; s < 4; s++)
        for (int l = 0; l < 2; l++) {
            problem p = alloc_problem(shapes[s][0], shapes[s][1], shapes[s][2], l ? SYNCBN_NHWC : SYNCBN_NCHW);
            ordinary(&p);
            const verdict real = check_problem(&p, 0), exact = check_problem(&p, 1);
            ck_assert_msg(real.wrong == 0 && exact.wrong == 0, "shape %d layout %d: %lld wrong (exact path: %lld)", s,
                          l, (long long)real.wrong, (long long)exact.wrong);
            ck_assert_msg(real.vectors > 0 && exact.vectors == 0, "float path tried %llu, exact-only tried %llu",
                          (unsigned long long)real.vectors, (unsigned long long)exact.vectors);
            printf("ordinary shape %d layout %d: fallbacks %llu of %llu vectors\n", s, l,
                   (unsigned long long)real.fallbacks, (unsigned long long)real.vectors);
            /* ordinary data rarely needs the fallback */
            ck_assert_msg(real.fallbacks * 20 < real.vectors, "fallbacks %llu of %llu",
                          (unsigned long long)real.fallbacks, (unsigned long long)real.vectors);
            free_problem(&p);
        }
}
END_TEST

START_TEST(bf16_fast_path_adversarial)
{
    /* Layouts 0, 1; 2: NHWC large enough to be written with streaming stores (whole
     * 64-byte lines of 32 outputs, two float vectors, one of which may fall back);
     * each with cancelling coefficients (cancel 1) and without (cancel 0). */
    for (int t = 0; t < 6; t++) {
        const int l = t % 3, cancel = t < 3;
        const int64_t C = cancel ? 192 : 1536; /* more targets: fewer outputs cross without cancelling */
        problem p = l < 2 ? alloc_problem(3, C, 24, l ? SYNCBN_NHWC : SYNCBN_NCHW)
                          : alloc_problem(4, C, cancel ? 5462 : 683, SYNCBN_NHWC);
        adversarial(&p, cancel);
        int64_t targets;
        const int64_t near = near_midpoints(&p, &targets, cancel ? 1 : 3);
        ck_assert_msg(targets > 0 && near * 10 >= targets * 9, "only %lld of %lld targets near a midpoint",
                      (long long)near, (long long)targets);
        const verdict real = check_problem(&p, 0), trust = check_problem(&p, 2);
        printf("adversarial layout %d, %s: %lld of %lld targets within %d float ulps of a midpoint; fallbacks "
               "%llu of %llu vectors; wrong outputs: real %lld, float trusted (zero margin) %lld\n",
               l, cancel ? "cancelling" : "not cancelling", (long long)near, (long long)targets, cancel ? 1 : 3, (unsigned long long)real.fallbacks,
               (unsigned long long)real.vectors, (long long)real.wrong, (long long)trust.wrong);
        ck_assert_msg(real.wrong == 0, "real code: %lld wrong outputs", (long long)real.wrong);
        ck_assert_msg(real.fallbacks > 0, "no fallback on adversarial data");
        ck_assert_msg(trust.wrong > 0, "float trusted gave the right bits: the data is not adversarial");
        free_problem(&p);
    }
}
END_TEST

/* float32 input gradient with the ReLU mask, bit for bit against the formula written
 * here (g = dy where the mask bit is set, else +0; dx = k (g - a - (x - m) b) in double,
 * rounded once). The coefficients include a = +0, -0 and NaN with b = 0, where g - a of
 * a masked element is exactly the sign of a zero or a NaN's sign (apply.c takes
 * fl(0 - a) for it without computing g - a: -a instead would give other bits there),
 * and masked elements hold NaN and Inf in dy, which must not reach dx. NCHW rows of 196
 * (their mask bits start in the middle of a byte) and 256, NHWC, 1 and 2 threads. */
START_TEST(f32_relu_dx_bits)
{
    const int64_t shapes[][3] = {{3, 5, 196}, {2, 6, 256}, {4, 10, 30}};
    for (int s = 0; s < 3; s++)
        for (int l = 0; l < 2; l++)
            for (int threads = 1; threads <= 2; threads++) {
                const sbn_shape sh = {shapes[s][0], shapes[s][1], shapes[s][2], l ? SYNCBN_NHWC : SYNCBN_NCHW,
                                      SYNCBN_F32};
                const int64_t C = sh.C, N = sh.n * C * sh.S;
                float *x = malloc(N * 4), *dy = malloc(N * 4), *dx = malloc(N * 4);
                uint8_t *mask = aligned_alloc(8, (size_t)(N / 64 + 2) * 8);
                double *co = malloc(4 * (size_t)(C + SBN_COEF_PAD) * sizeof *co);
                ck_assert(x && dy && dx && mask && co);
                double *m = co, *k = m + C + SBN_COEF_PAD, *a = k + C + SBN_COEF_PAD, *b = a + C + SBN_COEF_PAD;
                for (int64_t c = 0; c < C; c++) {
                    const double special[3] = {0.0, -0.0, NAN};
                    m[c] = uni() - 0.5, k[c] = 0.5 + uni();
                    a[c] = c % 4 < 3 ? special[c % 4] : uni() - 0.5;
                    b[c] = c % 4 < 3 ? 0.0 : uni() - 0.5;
                }
                sbn_coef_wrap(m, C), sbn_coef_wrap(k, C), sbn_coef_wrap(a, C), sbn_coef_wrap(b, C);
                for (int64_t e = 0; e < N; e++) {
                    x[e] = (float)(2 * uni() - 1), dy[e] = (float)(2 * uni() - 1);
                    if (e % 7 == 3)
                        dy[e] = e % 2 ? NAN : INFINITY; /* left out by the mask where its bit is clear */
                }
                memset(mask, 0, (size_t)(N / 64 + 2) * 8);
                for (int64_t e = 0; e < N; e++)
                    mask[e >> 3] |= (uint8_t)((uni() < 0.5 && e % 7 != 3) << (e & 7));
                omp_set_num_threads(threads);
                sbn_backward_dx(dx, NULL, x, dy, mask, m, k, a, b, NULL, sh);
                int64_t wrong = 0;
                for (int64_t e = 0; e < N; e++) {
                    const int64_t c = sh.layout == SYNCBN_NCHW ? e / sh.S % C : e % C;
                    const double g = (mask[e >> 3] >> (e & 7)) & 1 ? (double)dy[e] : 0.0;
                    const float want = (float)(k[c] * (g - a[c] - ((double)x[e] - m[c]) * b[c]));
                    wrong += memcmp(&want, &dx[e], sizeof want) != 0;
                }
                ck_assert_msg(wrong == 0, "shape %d layout %d, %d threads: %lld of %lld outputs wrong", s, l, threads,
                              (long long)wrong, (long long)N);
                free(x), free(dy), free(dx), free(mask), free(co);
            }
}
END_TEST

static Suite *apply_suite(void)
{
    Suite *s = suite_create("apply");
    TCase *tc = tcase_create("bf16");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, bf16_fast_path_ordinary);
    tcase_add_test(tc, bf16_fast_path_adversarial);
    suite_add_tcase(s, tc);
    TCase *tf = tcase_create("f32");
    tcase_add_test(tf, f32_relu_dx_bits);
    suite_add_tcase(s, tf);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, apply_suite); }
