/*
 * moments.c - local BN kernels: per-channel sums, normalization, input gradient.
 * (perf work in progress: issue 5, bench engineer; numerics unchanged by design.)
 *
 * Memory-bound by design: each kernel streams its inputs once. Inner loops keep
 * SBN_LANES independent double accumulators, written out explicitly so the compiler
 * can vectorize them without reassociating anything (no -ffast-math needed), and the
 * lanes are combined in a fixed order. See moments.h for the reduction order.
 */
#include "moments.h"

#include <omp.h>

#define SBN_LANES 16
#define SBN_CBLOCK 256              /* NHWC channel sub-block held in registers/L1 */
#define SBN_OMP_MIN_WORK (1 << 15)  /* below this many elements, stay on one thread */
#define SBN_RENORM_EVERY (1 << 29)  /* deposits between exactsum normalizations */

/* ---- per-sample partials of one (sample, channel) row, NCHW ---- */

/* p1 = sum x, p2 = sum x^2 over a contiguous row of S floats. */
static void row_x_x2(const float *x, int64_t S, double *p1, double *p2)
{
    double a[SBN_LANES] = {0}, b[SBN_LANES] = {0};
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES)
        for (int j = 0; j < SBN_LANES; j++) {
            double v = x[s + j];
            a[j] += v;
            b[j] += v * v; /* exact: a float squared fits in a double */
        }
    double t1 = 0, t2 = 0;
    for (int j = 0; j < SBN_LANES; j++)
        t1 += a[j], t2 += b[j];
    for (; s < S; s++) {
        double v = x[s];
        t1 += v, t2 += v * v;
    }
    *p1 = t1, *p2 = t2;
}

/* p1 = sum dy, p2 = sum dy*(x - m) over a contiguous row. */
static void row_dy_dyxm(const float *x, const float *dy, double m, int64_t S, double *p1, double *p2)
{
    double a[SBN_LANES] = {0}, b[SBN_LANES] = {0};
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES)
        for (int j = 0; j < SBN_LANES; j++) {
            double g = dy[s + j];
            a[j] += g;
            b[j] += g * ((double)x[s + j] - m);
        }
    double t1 = 0, t2 = 0;
    for (int j = 0; j < SBN_LANES; j++)
        t1 += a[j], t2 += b[j];
    for (; s < S; s++) {
        double g = dy[s];
        t1 += g, t2 += g * ((double)x[s] - m);
    }
    *p1 = t1, *p2 = t2;
}

/* Adds one sample's partials of channel c to the channel totals (FAST) or deposits
 * them exactly (REPRODUCIBLE). `i` counts deposits made so far into this channel. */
static inline void take_partial(int64_t c, int64_t i, double p1, double p2, double *s1, double *s2,
                                int64_t *acc1, int64_t *acc2)
{
    if (!acc1) {
        s1[c] += p1, s2[c] += p2;
        return;
    }
    int64_t *a1 = acc1 + c * sbx_words(SBX_LINEAR), *a2 = acc2 + c * sbx_words(SBX_QUADRATIC);
    sbx_add(a1, SBX_LINEAR, p1);
    sbx_add(a2, SBX_QUADRATIC, p2);
    if ((i + 1) % SBN_RENORM_EVERY == 0) {
        sbx_normalize(a1, SBX_LINEAR);
        sbx_normalize(a2, SBX_QUADRATIC);
    }
}

/* This thread's share [*c0, *c1) of C channels; chunk edges on vector boundaries. */
static void thread_channels(int64_t C, int64_t *c0, int64_t *c1)
{
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t per = (C + T - 1) / T;
    per = (per + SBN_LANES - 1) / SBN_LANES * SBN_LANES;
    *c0 = t * per < C ? t * per : C;
    *c1 = *c0 + per < C ? *c0 + per : C;
}

/* ---- sums ---- */

/* NHWC partials of channels [c0, c1) of one sample: the S positions are summed in
 * order, one channel per vector lane. kind 0: (x, x^2); kind 1: (dy, dy*(x-m)). */
static void nhwc_partials(int kind, const float *x, const float *dy, const double *mean, int64_t S,
                          int64_t C, int64_t c0, int64_t c1, double *p1, double *p2)
{
    int64_t w = c1 - c0;
    for (int64_t j = 0; j < w; j++)
        p1[j] = 0, p2[j] = 0;
    for (int64_t s = 0; s < S; s++) {
        const float *xs = x + s * C + c0;
        if (kind == 0) {
            for (int64_t j = 0; j < w; j++) {
                double v = xs[j];
                p1[j] += v, p2[j] += v * v;
            }
        } else {
            const float *gs = dy + s * C + c0;
            for (int64_t j = 0; j < w; j++) {
                double g = gs[j];
                p1[j] += g, p2[j] += g * ((double)xs[j] - mean[c0 + j]);
            }
        }
    }
}

static void sums(int kind, const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                 double *s2, int64_t *acc1, int64_t *acc2)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    if (!acc1)
        for (int64_t c = 0; c < C; c++)
            s1[c] = 0, s2[c] = 0;

    if (sh.layout == SYNCBN_NCHW) {
#pragma omp parallel for schedule(static) if (n * C * S >= SBN_OMP_MIN_WORK)
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < n; i++) {
                const int64_t off = (i * C + c) * S;
                double p1, p2;
                if (kind == 0)
                    row_x_x2(x + off, S, &p1, &p2);
                else
                    row_dy_dyxm(x + off, dy + off, mean[c], S, &p1, &p2);
                take_partial(c, i, p1, p2, s1, s2, acc1, acc2);
            }
        return;
    }

#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
    {
        int64_t t0, t1;
        thread_channels(C, &t0, &t1);
        double p1[SBN_CBLOCK], p2[SBN_CBLOCK];
        for (int64_t c0 = t0; c0 < t1; c0 += SBN_CBLOCK) {
            int64_t c1 = c0 + SBN_CBLOCK < t1 ? c0 + SBN_CBLOCK : t1;
            for (int64_t i = 0; i < n; i++) {
                const int64_t off = i * S * C;
                nhwc_partials(kind, x + off, kind ? dy + off : NULL, mean, S, C, c0, c1, p1, p2);
                for (int64_t c = c0; c < c1; c++)
                    take_partial(c, i, p1[c - c0], p2[c - c0], s1, s2, acc1, acc2);
            }
        }
    }
}

void sbn_forward_sums(const float *x, sbn_shape sh, double *s1, double *s2, int64_t *acc1, int64_t *acc2)
{
    sums(0, x, NULL, NULL, sh, s1, s2, acc1, acc2);
}

void sbn_backward_sums(const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                       double *s2, int64_t *acc1, int64_t *acc2)
{
    sums(1, x, dy, mean, sh, s1, s2, acc1, acc2);
}

/* ---- elementwise ---- */

void sbn_normalize(float *y, const float *x, const double *mean, const double *scale, const double *shift,
                   sbn_shape sh)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    if (sh.layout == SYNCBN_NCHW) {
#pragma omp parallel for collapse(2) schedule(static) if (n * C * S >= SBN_OMP_MIN_WORK)
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t off = (i * C + c) * S;
                const double m = mean[c], k = scale[c], b = shift[c];
                for (int64_t s = 0; s < S; s++)
                    y[off + s] = (float)(((double)x[off + s] - m) * k + b);
            }
        return;
    }
#pragma omp parallel for schedule(static) if (n * C * S >= SBN_OMP_MIN_WORK)
    for (int64_t r = 0; r < n * S; r++) {
        const float *xr = x + r * C;
        float *yr = y + r * C;
        for (int64_t c = 0; c < C; c++)
            yr[c] = (float)(((double)xr[c] - mean[c]) * scale[c] + shift[c]);
    }
}

void sbn_backward_dx(float *dx, const float *x, const float *dy, const double *mean, const double *k,
                     const double *a, const double *b, sbn_shape sh)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    if (sh.layout == SYNCBN_NCHW) {
#pragma omp parallel for collapse(2) schedule(static) if (n * C * S >= SBN_OMP_MIN_WORK)
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t off = (i * C + c) * S;
                const double m = mean[c], kc = k[c], ac = a[c], bc = b[c];
                for (int64_t s = 0; s < S; s++)
                    dx[off + s] = (float)(kc * ((double)dy[off + s] - ac - ((double)x[off + s] - m) * bc));
            }
        return;
    }
#pragma omp parallel for schedule(static) if (n * C * S >= SBN_OMP_MIN_WORK)
    for (int64_t r = 0; r < n * S; r++) {
        const float *xr = x + r * C, *gr = dy + r * C;
        float *dr = dx + r * C;
        for (int64_t c = 0; c < C; c++)
            dr[c] = (float)(k[c] * ((double)gr[c] - a[c] - ((double)xr[c] - mean[c]) * b[c]));
    }
}
