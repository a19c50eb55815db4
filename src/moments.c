/*
 * moments.c - local BN kernels: per-channel sums, normalization, input gradient.
 *
 * Memory-bound by design: each kernel streams its inputs once. Inner loops keep
 * SBN_LANES independent double accumulators as GNU vectors of 8 doubles (one AVX-512
 * register), so nothing is reassociated (no -ffast-math needed), and the lanes are
 * combined in a fixed order; vector bodies and scalar tails round identically. Large
 * outputs are written with streaming stores. None of this changes a result bit; see
 * moments.h for the reduction order and examples/bench.c to measure (issue 5).
 */
#include "moments.h"

#include <omp.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define SBN_LANES 16
#define SBN_CBLOCK 256              /* NHWC channel sub-block held in registers/L1 */
#define SBN_OMP_MIN_WORK (1 << 15)  /* below this many elements, stay on one thread */
#define SBN_RENORM_EVERY (1 << 29)  /* deposits between exactsum normalizations */
#define SBN_ROW_SPLIT_BYTES 256     /* NHWC: below this many bytes of a row per thread, split samples */
#define SBN_PART_MAX 4096           /* ... if n*C partials fit on the stack (64 KiB) */

/* ---- vector helpers ----
 * GNU vector types (not intrinsics): the compiler emits AVX-512, AVX2 or SSE as the
 * target allows, and each lane of a vector is an ordinary IEEE double operation, so
 * results are the same bits as the scalar loops they replace (no reassociation, and
 * -ffp-contract=off keeps a*b+c as two roundings). */
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors only cross static, inlined calls */
typedef double sbn_v8d __attribute__((vector_size(64)));
typedef float sbn_v8f __attribute__((vector_size(32)));

/* 8 floats at p (any alignment), widened exactly to double. With AVX-512 one
 * vcvtps2pd ymm->zmm; the generic conversion would be split into 128-bit halves and
 * re-inserted (GCC 12 prefers 256-bit vectors on this CPU), saturating port 5. */
static inline sbn_v8d load8(const float *p)
{
#ifdef __AVX512F__
    return (sbn_v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#else
    sbn_v8f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, sbn_v8d);
#endif
}

/* ---- per-sample partials of one (sample, channel) row, NCHW ---- */

/* Combines the SBN_LANES (= 16) lanes held in two vectors in lane order 0..15. */
static inline double lanes_sum(const sbn_v8d *lo, const sbn_v8d *hi)
{
    double t = 0;
    for (int j = 0; j < 8; j++)
        t += (*lo)[j];
    for (int j = 0; j < 8; j++)
        t += (*hi)[j];
    return t;
}

/* p1 = sum x, p2 = sum x^2 over a contiguous row of S floats. Lane j of the 16
 * accumulators takes positions s = j (mod 16); lanes are combined in order 0..15,
 * then the tail is added in order. */
static void row_x_x2(const float *x, int64_t S, double *p1, double *p2)
{
    sbn_v8d a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES) {
        sbn_v8d u = load8(x + s), w = load8(x + s + 8);
        a0 += u, a1 += w;
        b0 += u * u, b1 += w * w; /* exact: a float squared fits in a double */
    }
    double t1 = lanes_sum(&a0, &a1), t2 = lanes_sum(&b0, &b1);
    for (; s < S; s++) {
        double v = x[s];
        t1 += v, t2 += v * v;
    }
    *p1 = t1, *p2 = t2;
}

/* p1 = sum dy, p2 = sum dy*(x - m) over a contiguous row; same lane order. */
static void row_dy_dyxm(const float *x, const float *dy, double m, int64_t S, double *p1, double *p2)
{
    sbn_v8d a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
    const sbn_v8d mv = {m, m, m, m, m, m, m, m};
    int64_t s = 0;
    for (; s + SBN_LANES <= S; s += SBN_LANES) {
        sbn_v8d g = load8(dy + s), h = load8(dy + s + 8);
        a0 += g, a1 += h;
        b0 += g * (load8(x + s) - mv), b1 += h * (load8(x + s + 8) - mv);
    }
    double t1 = lanes_sum(&a0, &a1), t2 = lanes_sum(&b0, &b1);
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

/* NHWC partials of nq*8 channels starting at c0 of one sample, held in registers
 * across all S positions (one pass over the sample's rows). Each channel's partial is
 * summed over s in order, exactly as the scalar loop below. kind and nq are
 * compile-time constants at every call, so the arrays live in vector registers. */
static inline __attribute__((always_inline)) void nhwc_block(int kind, int nq, const float *x, const float *dy,
                                                             const double *mean, int64_t S, int64_t C,
                                                             int64_t c0, double *p1, double *p2)
{
    sbn_v8d P1[8], P2[8], M[8];
    for (int q = 0; q < nq; q++) {
        P1[q] = (sbn_v8d){0}, P2[q] = (sbn_v8d){0};
        if (kind)
            memcpy(&M[q], mean + c0 + 8 * q, sizeof M[q]);
    }
    for (int64_t s = 0; s < S; s++) {
        const float *xs = x + s * C + c0;
        if (kind == 0) {
            for (int q = 0; q < nq; q++) {
                sbn_v8d v = load8(xs + 8 * q);
                P1[q] += v, P2[q] += v * v;
            }
        } else {
            const float *gs = dy + s * C + c0;
            for (int q = 0; q < nq; q++) {
                sbn_v8d g = load8(gs + 8 * q);
                P1[q] += g, P2[q] += g * (load8(xs + 8 * q) - M[q]);
            }
        }
    }
    for (int q = 0; q < nq; q++) {
        memcpy(p1 + 8 * q, &P1[q], sizeof P1[q]);
        memcpy(p2 + 8 * q, &P2[q], sizeof P2[q]);
    }
}

/* NHWC partials of channels [c0, c1) of one sample: the S positions are summed in
 * order, one channel per vector lane. kind 0: (x, x^2); kind 1: (dy, dy*(x-m)).
 * Blocks of 64, then 32, 16, 8 channels in registers; a scalar tail for the rest. */
static void nhwc_partials(int kind, const float *x, const float *dy, const double *mean, int64_t S,
                          int64_t C, int64_t c0, int64_t c1, double *p1, double *p2)
{
    int64_t c = c0;
#define SBN_NHWC_BLOCK(nq)                                                                                    \
    for (; c + 8 * (nq) <= c1; c += 8 * (nq)) {                                                           \
        if (kind == 0)                                                                                    \
            nhwc_block(0, nq, x, dy, mean, S, C, c, p1 + (c - c0), p2 + (c - c0));                        \
        else                                                                                              \
            nhwc_block(1, nq, x, dy, mean, S, C, c, p1 + (c - c0), p2 + (c - c0));                        \
    }
    SBN_NHWC_BLOCK(8)
    SBN_NHWC_BLOCK(4)
    SBN_NHWC_BLOCK(2)
    SBN_NHWC_BLOCK(1)
#undef SBN_NHWC_BLOCK
    for (; c < c1; c++) {
        double t1 = 0, t2 = 0;
        for (int64_t s = 0; s < S; s++) {
            if (kind == 0) {
                double v = x[s * C + c];
                t1 += v, t2 += v * v;
            } else {
                double g = dy[s * C + c];
                t1 += g, t2 += g * ((double)x[s * C + c] - mean[c]);
            }
        }
        p1[c - c0] = t1, p2[c - c0] = t2;
    }
}

static void sums(int kind, const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                 double *s2, int64_t *acc1, int64_t *acc2)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    if (!acc1)
        for (int64_t c = 0; c < C; c++)
            s1[c] = 0, s2[c] = 0;

    /* FAST with S == 1: add each sample's row into the channel totals directly (a
     * vector loop over channels); the same additions, in the same sample order, as
     * the general path below with its one-element partials 0 + v. */
    if (!acc1 && S == 1) {
#pragma omp parallel if (n * C >= SBN_OMP_MIN_WORK)
        {
            int64_t t0, t1;
            thread_channels(C, &t0, &t1);
            for (int64_t i = 0; i < n; i++) {
                const float *xr = x + i * C;
                if (kind == 0) {
                    for (int64_t c = t0; c < t1; c++) {
                        const double v = xr[c];
                        s1[c] += 0.0 + v, s2[c] += 0.0 + v * v;
                    }
                } else {
                    const float *gr = dy + i * C;
                    for (int64_t c = t0; c < t1; c++) {
                        const double g = gr[c];
                        s1[c] += 0.0 + g, s2[c] += 0.0 + g * ((double)xr[c] - mean[c]);
                    }
                }
            }
        }
        return;
    }

    /* S == 1: NCHW and NHWC are the same memory, and a one-element partial is the
     * same value either way; the NHWC path vectorizes over channels. */
    if (sh.layout == SYNCBN_NCHW && S > 1) {
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

    /* NHWC with narrow rows: split channels and each thread would own a slice of
     * every row narrower than a few cache lines, and the adjacent-line prefetcher
     * pulls the neighbour's slice too (twice the DRAM traffic at 2 threads). Split
     * SAMPLES instead: each per-sample partial is still computed by one thread in
     * the same order, stored, and combined per channel in sample order afterwards,
     * so every sum is the same as with the channel split. */
    const int T = n * C * S >= SBN_OMP_MIN_WORK ? omp_get_max_threads() : 1;
    if (T > 1 && n >= T && C * (int64_t)sizeof(float) < SBN_ROW_SPLIT_BYTES * T && n * C <= SBN_PART_MAX) {
        double part[2 * SBN_PART_MAX]; /* [2][n][C]: p1 then p2 */
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const int64_t off = i * S * C;
            nhwc_partials(kind, x + off, kind ? dy + off : NULL, mean, S, C, 0, C, part + i * C,
                          part + (n + i) * C);
        }
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < n; i++)
                take_partial(c, i, part[i * C + c], part[(n + i) * C + c], s1, s2, acc1, acc2);
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

/* ---- elementwise ----
 * Vector bodies compute every element with the same double operations, in the same
 * order, as the scalar tails, so the output bits do not depend on where a vector
 * boundary falls. */

/* 8 consecutive doubles at p (any alignment). */
static inline sbn_v8d loadd8(const double *p)
{
    sbn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline sbn_v8d bcast8(double v) { return (sbn_v8d){v, v, v, v, v, v, v, v}; }

/* Outputs at least this large are written with non-temporal (streaming) stores: they
 * cannot stay in cache anyway, and streaming skips the read-for-ownership of every
 * destination line, so a pass moves 8 instead of 12 bytes per element of y (12 instead
 * of 16 for dx). Only the store instruction differs; the values are the same. */
#define SBN_NT_MIN_BYTES ((int64_t)16 << 20)

#ifdef __AVX512F__
#define SBN_HAVE_NT 1
/* Stores 8 doubles rounded to float (to nearest, as a C cast): streaming (p must be
 * 32-byte aligned) or not. A pointer argument: GCC notes a psABI change for 64-byte
 * vectors passed by value. */
static inline void put8(float *p, const sbn_v8d *v, int nt)
{
    const __m256 f = _mm512_cvtpd_ps((__m512d)*v);
    if (nt)
        _mm256_stream_ps(p, f);
    else
        _mm256_storeu_ps(p, f);
}
#else
#define SBN_HAVE_NT 0
static inline void put8(float *p, const sbn_v8d *v, int nt)
{
    (void)nt;
    sbn_v8f f = __builtin_convertvector(*v, sbn_v8f);
    memcpy(p, &f, sizeof f);
}
#endif

/* Elements to handle one by one before p + head is 32-byte aligned (0 unless nt). */
static inline int64_t nt_head(const float *p, int64_t len, int nt)
{
    if (!nt)
        return 0;
    int64_t h = (int64_t)((32 - ((uintptr_t)p & 31)) & 31) / (int64_t)sizeof(float);
    return h < len ? h : len;
}

/* Streaming stores are weakly ordered: each thread fences its own before the
 * region's closing barrier, so the data are visible to whoever reads them next. */
static inline void nt_fence(int nt)
{
#if SBN_HAVE_NT
    if (nt)
        _mm_sfence();
#else
    (void)nt;
#endif
}

void sbn_normalize(float *y, const float *x, const double *mean, const double *scale, const double *shift,
                   sbn_shape sh)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    const int nt = SBN_HAVE_NT && n * C * S * (int64_t)sizeof(float) >= SBN_NT_MIN_BYTES;
    if (sh.layout == SYNCBN_NCHW && S > 1) { /* S == 1: same memory as NHWC */
#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
        {
#pragma omp for collapse(2) schedule(static)
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < C; c++) {
                    const float *xr = x + (i * C + c) * S;
                    float *yr = y + (i * C + c) * S;
                    const double m = mean[c], k = scale[c], b = shift[c];
                    const sbn_v8d mv = bcast8(m), kv = bcast8(k), bv = bcast8(b);
                    int64_t s = 0;
                    for (const int64_t h = nt_head(yr, S, nt); s < h; s++)
                        yr[s] = (float)(((double)xr[s] - m) * k + b);
                    for (; s + 8 <= S; s += 8) {
                        const sbn_v8d v = (load8(xr + s) - mv) * kv + bv;
                        put8(yr + s, &v, nt);
                    }
                    for (; s < S; s++)
                        yr[s] = (float)(((double)xr[s] - m) * k + b);
                }
            nt_fence(nt);
        }
        return;
    }
#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * S; r++) {
            const float *xr = x + r * C;
            float *yr = y + r * C;
            int64_t c = 0;
            for (const int64_t h = nt_head(yr, C, nt); c < h; c++)
                yr[c] = (float)(((double)xr[c] - mean[c]) * scale[c] + shift[c]);
            for (; c + 8 <= C; c += 8) {
                const sbn_v8d v = (load8(xr + c) - loadd8(mean + c)) * loadd8(scale + c) + loadd8(shift + c);
                put8(yr + c, &v, nt);
            }
            for (; c < C; c++)
                yr[c] = (float)(((double)xr[c] - mean[c]) * scale[c] + shift[c]);
        }
        nt_fence(nt);
    }
}

void sbn_backward_dx(float *dx, const float *x, const float *dy, const double *mean, const double *k,
                     const double *a, const double *b, sbn_shape sh)
{
    const int64_t n = sh.n, C = sh.C, S = sh.S;
    const int nt = SBN_HAVE_NT && n * C * S * (int64_t)sizeof(float) >= SBN_NT_MIN_BYTES;
    if (sh.layout == SYNCBN_NCHW && S > 1) { /* S == 1: same memory as NHWC */
#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
        {
#pragma omp for collapse(2) schedule(static)
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < C; c++) {
                    const int64_t off = (i * C + c) * S;
                    const float *xr = x + off, *gr = dy + off;
                    float *dr = dx + off;
                    const double m = mean[c], kc = k[c], ac = a[c], bc = b[c];
                    const sbn_v8d mv = bcast8(m), kv = bcast8(kc), av = bcast8(ac), bv = bcast8(bc);
                    int64_t s = 0;
                    for (const int64_t h = nt_head(dr, S, nt); s < h; s++)
                        dr[s] = (float)(kc * ((double)gr[s] - ac - ((double)xr[s] - m) * bc));
                    for (; s + 8 <= S; s += 8) {
                        const sbn_v8d v = kv * (load8(gr + s) - av - (load8(xr + s) - mv) * bv);
                        put8(dr + s, &v, nt);
                    }
                    for (; s < S; s++)
                        dr[s] = (float)(kc * ((double)gr[s] - ac - ((double)xr[s] - m) * bc));
                }
            nt_fence(nt);
        }
        return;
    }
#pragma omp parallel if (n * C * S >= SBN_OMP_MIN_WORK)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * S; r++) {
            const float *xr = x + r * C, *gr = dy + r * C;
            float *dr = dx + r * C;
            int64_t c = 0;
            for (const int64_t h = nt_head(dr, C, nt); c < h; c++)
                dr[c] = (float)(k[c] * ((double)gr[c] - a[c] - ((double)xr[c] - mean[c]) * b[c]));
            for (; c + 8 <= C; c += 8) {
                const sbn_v8d v =
                    loadd8(k + c) * (load8(gr + c) - loadd8(a + c) - (load8(xr + c) - loadd8(mean + c)) * loadd8(b + c));
                put8(dr + c, &v, nt);
            }
            for (; c < C; c++)
                dr[c] = (float)(k[c] * ((double)gr[c] - a[c] - ((double)xr[c] - mean[c]) * b[c]));
        }
        nt_fence(nt);
    }
}
