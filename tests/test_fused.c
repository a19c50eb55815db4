/*
 * test_fused.c - fused epilogues and bfloat16 under real mpirun at any rank count: the fused activation
 * (SYNCBN_ACT_RELU), the residual input z (BN + add [+ ReLU]) and bfloat16 tensors,
 * through syncbn_forward_ex / syncbn_backward_ex.
 *
 * Every rank builds the WHOLE global batch from global indices and computes a float64
 * reference from the documented definitions (written here, sharing nothing with
 * the library); each rank passes its slice (even, uneven, empty, all on one rank) to
 * the library and checks what it got:
 *   - f32 outputs to a relative 1e-5 (as test_layer.c);
 *   - bf16 outputs within one bf16 ulp of the reference rounded once to bf16
 *     (round-to-nearest-even from double, written here: bf16_round);
 *   - outputs of non-positive ReLU pre-activations, and dz everywhere, bit for bit;
 *   - elements whose pre-activation is known exactly (x equal to an exactly
 *     representable batch mean) bit for bit, including pre-activations of exactly 0
 *     (y = +0, mask 0) and a double-rounding trap for bf16.
 * Also: finite differences through the ReLU away from its kink; fused == BN followed
 * by a separate ReLU done here (bitwise, f32 and bf16); aliased and odd-aligned
 * buffers; every error path (dz without z, bf16 through the float API, ENOMEM on
 * mask growth injected on one rank, invalid or disagreeing dtype/activation); and
 * SYNCBN_REPRODUCIBLE's bitwise invariance across rank counts, splits and thread
 * counts for every dtype x activation x z x layout.
 *
 * What it does not do: time anything, or re-test the plain f32 paths beyond their
 * bitwise equality with the new entry points (test_layer.c and test_reproducible.c
 * cover them).
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h" /* sbn_test_fail_alloc: fault injection, not in the public header */
#include "syncbn.h"
#include "testutil.h"

#define RTOL 1e-5

/* ---- element types: bfloat16 written here, independently of the library ---- */

static double bf16_value(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t high_half(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

/* d rounded to nearest-even bfloat16 in ONE step from double (not via float, which
 * would round twice). Overflow gives Inf, NaN stays NaN. */
static uint16_t bf16_round(double d)
{
    if (isnan(d))
        return (uint16_t)(signbit(d) ? 0xffc0 : 0x7fc0);
    if (d == 0 || isinf(d))
        return high_half((float)d);
    int e = ilogb(d); /* |d| = 1.f * 2^e */
    if (e < -126)
        e = -126; /* subnormals: fixed spacing 2^-133 */
    const double ulp = ldexp(1.0, e - 7);
    const double r = nearbyint(d / ulp) * ulp; /* default rounding mode: ties to even; exact scaling */
    if (fabs(r) >= 0x1p128)
        return (uint16_t)(signbit(d) ? 0xff80 : 0x7f80);
    return high_half((float)r); /* r has at most 8 significant bits: exact in float */
}

static size_t esize(syncbn_dtype t) { return t == SYNCBN_BF16 ? 2 : 4; }

/* Element i of a buffer of type t, widened exactly. */
static double get(syncbn_dtype t, const void *b, int64_t i)
{
    return t == SYNCBN_BF16 ? bf16_value(((const uint16_t *)b)[i]) : (double)((const float *)b)[i];
}

/* The bits of element i (16 or 32 of them). */
static uint32_t bits_at(syncbn_dtype t, const void *b, int64_t i)
{
    if (t == SYNCBN_BF16)
        return ((const uint16_t *)b)[i];
    uint32_t u;
    memcpy(&u, (const float *)b + i, sizeof u);
    return u;
}

/* v rounded once to type t: its bits, and its value. */
static uint32_t round_bits(syncbn_dtype t, double v)
{
    if (t == SYNCBN_BF16)
        return bf16_round(v);
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static double round_to(syncbn_dtype t, double v) { return t == SYNCBN_BF16 ? bf16_value(bf16_round(v)) : (double)(float)v; }

/* Stores v rounded to type t as element i. */
static void put(syncbn_dtype t, void *b, int64_t i, double v)
{
    if (t == SYNCBN_BF16)
        ((uint16_t *)b)[i] = bf16_round(v);
    else
        ((float *)b)[i] = (float)v;
}

/* bfloat16 bit patterns as integers in the order of their values (+0 and -0 both 0). */
static int32_t bf16_order(uint32_t h) { return h & 0x8000 ? -(int32_t)(h & 0x7fff) : (int32_t)h; }

/* Is element i of `got` (type t) the float64 reference `ref`, to the type's
 * tolerance? bf16: within one ulp of ref rounded to bf16; f32: |got - ref| <=
 * RTOL * max(|ref|, floor). A reference that rounds to a non-finite value must be
 * matched exactly (NaN by any NaN). */
static int close_to(syncbn_dtype t, const void *got, int64_t i, double ref, double floor)
{
    const double g = get(t, got, i), r = round_to(t, ref);
    if (isnan(r))
        return isnan(g);
    if (isinf(r))
        return g == r;
    if (t == SYNCBN_BF16) {
        int32_t d = bf16_order(bits_at(t, got, i)) - bf16_order(bf16_round(ref));
        return !isnan(g) && d >= -1 && d <= 1;
    }
    return tu_close(g, ref, RTOL, floor);
}

/* A zero-filled allocation of `count` elements of `size` bytes, never NULL-for-zero. */
static void *zalloc(int64_t count, size_t size)
{
    void *p = calloc((size_t)count + 1, size);
    if (!p)
        abort();
    return p;
}

/* The reference rounding itself, on cases with a known answer. */
START_TEST(bf16_reference_rounding)
{
    TU_EXPECT(bf16_round(1.0) == 0x3f80 && bf16_round(-2.0) == 0xc000, "exact values");
    TU_EXPECT(bf16_round(1 + 0x1p-8) == 0x3f80, "tie to even (down)");
    TU_EXPECT(bf16_round(1 + 3 * 0x1p-8) == 0x3f82, "tie to even (up)");
    TU_EXPECT(bf16_round(1 + 0x1p-8 + 0x1p-31) == 0x3f81, "just above a tie: one rounding, not via float");
    TU_EXPECT(high_half((float)(1 + 0x1p-8 + 0x1p-31)) == 0x3f80, "the same value via float lands on the tie");
    TU_EXPECT(bf16_round(0x1.fep127) == 0x7f7f && bf16_round(0x1.ffp127) == 0x7f80 &&
                  bf16_round(-0x1p200) == 0xff80,
              "largest finite, overflow to Inf");
    TU_EXPECT(bf16_round(0x1p-133) == 0x0001 && bf16_round(0x1p-134) == 0x0000 &&
                  bf16_round(0x1.8p-134) == 0x0001 && bf16_round(-0x1p-140) == 0x8000,
              "subnormals and underflow to signed zero");
    TU_EXPECT((bf16_round(NAN) & 0x7fc0) == 0x7fc0 && bf16_round(-0.0) == 0x8000, "NaN, -0");
    TU_EXPECT(bf16_order(0x3f81) - bf16_order(0x3f80) == 1 && bf16_order(0x0001) - bf16_order(0x8001) == 2 &&
                  bf16_order(0x8000) == 0,
              "ulp order");
    tu_verdict();
}
END_TEST

/* ---- test problems: a global batch built from global indices ---- */

enum { DATA_RANDOM, DATA_EDGE };

typedef struct {
    int64_t B, C, S;    /* global batch, channels, spatial */
    syncbn_config cfg;  /* dtype, activation, layout, reduction */
    int z, dz;          /* pass a residual z to the forward; ask the backward for dz */
    int data;           /* DATA_RANDOM or DATA_EDGE */
    double offset;      /* DATA_RANDOM: x = offset + (1 + c%3) N(0,1) */
} problem;

static uint64_t key(unsigned what, int step, int64_t i, int64_t c, int64_t s)
{
    return (uint64_t)what << 56 ^ ((((uint64_t)step * 1000003u + (uint64_t)i) * 4099u + (uint64_t)c) * 65537u + (uint64_t)s);
}

/* Offset of element (i, c, s) in a local buffer of the problem's layout. */
static int64_t at(const problem *p, int64_t i, int64_t c, int64_t s)
{
    return p->cfg.layout == SYNCBN_NCHW ? (i * p->C + c) * p->S + s : (i * p->S + s) * p->C + c;
}

/* Offset of global element (i, c, s) in the global arrays (always [B][C][S]). */
static int64_t lg(const problem *p, int64_t i, int64_t c, int64_t s) { return (i * p->C + c) * p->S + s; }

/* DATA_EDGE: x = 4 + d, with small integers d paired across samples i and B-1-i (d
 * and -d), so every channel's sum is exactly 4N and its mean exactly 4 in any
 * summation order (N a power of two, so even sum * (1/N) is exact), and about a third
 * of the elements equal the mean: their BN(x) is exactly +-0, and their
 * pre-activation is exactly bias + z. Per channel: */
static const float EDGE_W[7] = {0.75f, -1.25f, 1.5f, 1.0f, 0.5f, 1.0f, 3e-39f};
static const float EDGE_B[7] = {
    0.0f,                /* 0: pre = +0 (z = +-0 there) */
    -0.0f,               /* 1: negative weight, bias -0: pre = -0 + -0 = -0 (ReLU: y must be +0) */
    0.375f,              /* 2: z = -0.375 there: pre = +0 */
    0x1p-8f + 0x1p-31f,  /* 3: z = 1 there: pre = 1 + 2^-8 + 2^-31, bf16 0x3f81 (via float: 0x3f80) */
    1e38f,               /* 4: z = bf16 max at some elements: pre overflows to +Inf */
    0.25f,               /* 5: z = NaN, +Inf, -Inf at some elements */
    0.0f,                /* 6: weight 3e-39 (a float subnormal), z ~ 1e-39: outputs are bf16 subnormals */
};

static int edge_d(const problem *p, int step, int64_t i, int64_t c, int64_t s)
{
    const int64_t j = i < p->B / 2 ? i : p->B - 1 - i;
    const uint64_t h = tu_hash(key(5, step, j, c, s));
    const int d = h % 3 == 0 ? 0 : (int)((h >> 8) % 7) - 3;
    return i < p->B / 2 ? d : -d;
}

static double x_raw(const problem *p, int step, int64_t i, int64_t c, int64_t s)
{
    if (p->data == DATA_EDGE)
        return 4 + edge_d(p, step, i, c, s);
    return p->offset + (1 + c % 3) * tu_normal(key(1, step, i, c, s));
}

static double z_raw(const problem *p, int step, int64_t i, int64_t c, int64_t s)
{
    const double normal = 1.5 * tu_normal(key(2, step, i, c, s));
    if (p->data != DATA_EDGE || c > 6)
        return normal;
    const int zero = edge_d(p, step, i, c, s) == 0;
    const uint64_t h = tu_hash(key(6, step, i, c, s));
    switch (c) {
    case 0: return zero ? (h & 1 ? -0.0 : 0.0) : normal;
    case 1: return zero ? -0.0 : normal;
    case 2: return zero ? -0.375 : normal;
    case 3: return zero ? (h & 1 ? 1.0 : -1.0) : normal;
    case 4: return h % 4 == 0 ? 0x1.fep127 : normal;
    case 5: return h % 8 == 0 ? NAN : h % 8 == 1 ? INFINITY : h % 8 == 2 ? -INFINITY : normal;
    default: return 1e-39 * normal;
    }
}

static double dy_raw(int step, int64_t i, int64_t c, int64_t s) { return tu_normal(key(3, step, i, c, s)); }

static float weight_of(const problem *p, int64_t c)
{
    if (p->data == DATA_EDGE && c < 7)
        return EDGE_W[c];
    return (float)(0.5 + tu_uniform(31u * (uint64_t)c + 7));
}

static float bias_of(const problem *p, int64_t c)
{
    if (p->data == DATA_EDGE && c < 7)
        return EDGE_B[c];
    return (float)(tu_uniform(37u * (uint64_t)c + 5) - 0.5);
}

/* The global batch of one step, in [B][C][S] order, values already in the element type. */
typedef struct {
    double *x, *z, *dy;
} gbatch;

static void make_batch(const problem *p, int step, gbatch *g)
{
    const syncbn_dtype t = p->cfg.dtype;
    for (int64_t i = 0; i < p->B; i++)
        for (int64_t c = 0; c < p->C; c++)
            for (int64_t s = 0; s < p->S; s++) {
                const int64_t e = lg(p, i, c, s);
                g->x[e] = round_to(t, x_raw(p, step, i, c, s));
                g->z[e] = round_to(t, z_raw(p, step, i, c, s));
                g->dy[e] = round_to(t, dy_raw(step, i, c, s));
            }
}

/* This rank's samples [lo, lo+n) of the global batch into local buffers of the layout. */
static void scatter(const problem *p, const gbatch *g, int64_t lo, int64_t n, void *x, void *z, void *dy)
{
    const syncbn_dtype t = p->cfg.dtype;
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < p->C; c++)
            for (int64_t s = 0; s < p->S; s++) {
                const int64_t a = at(p, i, c, s), e = lg(p, lo + i, c, s);
                put(t, x, a, g->x[e]), put(t, z, a, g->z[e]), put(t, dy, a, g->dy[e]);
            }
}

/* ---- the float64 reference, from the definitions ---- */

typedef struct {
    double *mean, *var, *invstd; /* [C] biased statistics of the global batch */
    double *dw, *db;             /* [C] dweight = sum g*xhat, dbias = sum g */
    double *rm, *rv;             /* [C] running statistics after the step */
    double *w, *b;               /* [C] the layer's weight and bias (float values) */
    double *buf;
} reference;

static reference reference_alloc(int64_t C)
{
    double *buf = zalloc(9 * C, sizeof(double));
    return (reference){buf, buf + C, buf + 2 * C, buf + 3 * C, buf + 4 * C, buf + 5 * C, buf + 6 * C,
                       buf + 7 * C, buf + 8 * C, buf};
}

/* BN(x) + z of global element e of channel c, in double (z only if the problem has one). */
static double pre_ref(const problem *p, const reference *r, const gbatch *g, int64_t e, int64_t c)
{
    const double v = (g->x[e] - r->mean[c]) * r->invstd[c] * r->w[c] + r->b[c];
    return p->z ? v + g->z[e] : v;
}

/* The ReLU mask: the pre-activation rounded to the element type, > 0 (NaN: 0). */
static int mask_ref(const problem *p, double pre)
{
    return p->cfg.activation == SYNCBN_ACT_NONE || round_to(p->cfg.dtype, pre) > 0;
}

/* Is the element's pre-activation exactly known (x equal to the exact batch mean)? */
static int exact_elem(const problem *p, int step, int64_t i, int64_t c, int64_t s)
{
    return p->data == DATA_EDGE && edge_d(p, step, i, c, s) == 0;
}

/* Fills r with the statistics and gradient sums of one training step; returns the
 * number of "ambiguous" elements, whose pre-activation is so close to 0 that the
 * library's rounding of the statistics could flip the mask (the test data must
 * have none). */
static int reference_step(const problem *p, int step, const gbatch *g, reference *r, int64_t nbt)
{
    const double N = (double)(p->B * p->S);
    int ambiguous = 0;
    for (int64_t c = 0; c < p->C; c++) {
        double m = 0, v = 0, sg = 0, sgx = 0;
        for (int64_t i = 0; i < p->B; i++)
            for (int64_t s = 0; s < p->S; s++)
                m += g->x[lg(p, i, c, s)];
        m /= N;
        for (int64_t i = 0; i < p->B; i++)
            for (int64_t s = 0; s < p->S; s++) {
                const double d = g->x[lg(p, i, c, s)] - m;
                v += d * d;
            }
        v /= N;
        r->mean[c] = m, r->var[c] = v, r->invstd[c] = 1 / sqrt(v + p->cfg.eps);
        for (int64_t i = 0; i < p->B; i++)
            for (int64_t s = 0; s < p->S; s++) {
                const int64_t e = lg(p, i, c, s);
                const double pre = pre_ref(p, r, g, e, c);
                const double terms = fabs((g->x[e] - m) * r->invstd[c] * r->w[c]) + fabs(r->b[c]) +
                                     (p->z ? fabs(g->z[e]) : 0);
                if (p->cfg.activation == SYNCBN_ACT_RELU && pre != 0 && fabs(pre) < 1e-10 * terms &&
                    !exact_elem(p, step, i, c, s))
                    ambiguous++;
                const double gg = mask_ref(p, pre) ? g->dy[e] : 0.0;
                sg += gg, sgx += gg * (g->x[e] - m);
            }
        r->dw[c] = sgx * r->invstd[c], r->db[c] = sg;
        const double f = isnan(p->cfg.momentum) ? 1.0 / (double)nbt : p->cfg.momentum;
        r->rm[c] = (1 - f) * r->rm[c] + f * m;
        r->rv[c] = (1 - f) * r->rv[c] + f * v * N / (N - 1);
    }
    return ambiguous;
}

/* ---- splits of the global batch over the ranks (as test_layer.c) ---- */

enum { SPLIT_EVEN, SPLIT_FIRST, SPLIT_LAST, SPLIT_HOLES, SPLIT_RANDOM, NSPLITS };

static void split(int k, int64_t B, int64_t *lo, int64_t *n)
{
    const int P = tu_nranks;
    int64_t cnt[64] = {0};
    switch (k) {
    case SPLIT_EVEN:
        for (int q = 0; q < P; q++)
            cnt[q] = (q + 1) * B / P - q * B / P;
        break;
    case SPLIT_FIRST: cnt[0] = B; break;
    case SPLIT_LAST: cnt[P - 1] = B; break;
    default: { /* HOLES: every other rank empty, the rest uneven; RANDOM: uneven */
        int64_t left = B;
        for (int q = 0; q < P; q++) {
            int64_t take = (k == SPLIT_HOLES && q % 2 == 1) ? 0 : (int64_t)(tu_uniform(977u * q + k) * (double)(left + 1));
            if (q == P - 1 || (k == SPLIT_HOLES && q == P - 2 && q % 2 == 0))
                take = left;
            cnt[q] = take, left -= take;
        }
        cnt[0] += left;
    }
    }
    *lo = 0;
    for (int q = 0; q < tu_rank; q++)
        *lo += cnt[q];
    *n = cnt[tu_rank];
}

static const char *describe(const problem *p, int k)
{
    static char buf[240];
    snprintf(buf, sizeof buf, "B=%lld C=%lld S=%lld %s %s %s %s%s%s%s%s%s%s split=%d", (long long)p->B, (long long)p->C,
             (long long)p->S, p->cfg.dtype == SYNCBN_BF16 ? "bf16" : "f32",
             p->cfg.activation == SYNCBN_ACT_RELU ? "relu" : "none", p->cfg.layout ? "NHWC" : "NCHW",
             p->cfg.reduction ? "repro" : "fast", p->z ? " +z" : "", p->dz ? " dz" : "",
             p->data == DATA_EDGE ? " edge-data" : "", p->offset != 0 ? " offset" : "",
             p->cfg.affine ? "" : " no-affine", p->cfg.track_running_stats ? "" : " untracked", k);
    return buf;
}

/* ---- the core property: every output against the reference ---- */

/* Checks y element a (global (gi, c, s)) against the pre-activation `pre`. */
static void check_y(const problem *p, const void *y, int64_t a, double pre, double floor, int exact, const char *name,
                    int64_t gi, int64_t c, int64_t s, const char *what)
{
    const syncbn_dtype t = p->cfg.dtype;
    const double rp = round_to(t, pre), got = get(t, y, a);
    const uint32_t bits = bits_at(t, y, a);
    if (p->cfg.activation == SYNCBN_ACT_RELU && !(rp > 0) && !isnan(rp)) {
        TU_EXPECT(bits == 0, "%s[%lld,%lld,%lld] = %.9g (bits %#x), expected +0: pre-activation %.9g (%s)", name,
                  (long long)gi, (long long)c, (long long)s, got, (unsigned)bits, pre, what);
    } else if (exact) { /* the pre-activation is exact: one rounding of it, bit for bit (either zero for ACT_NONE) */
        const int ok = isnan(rp) ? isnan(got) : rp == 0 ? got == 0 : bits == round_bits(t, pre);
        TU_EXPECT(ok, "%s[%lld,%lld,%lld] bits %#x, expected %#x exactly: pre-activation %.17g (%s)", name,
                  (long long)gi, (long long)c, (long long)s, (unsigned)bits, (unsigned)round_bits(t, pre), pre, what);
    } else {
        TU_EXPECT(close_to(t, y, a, pre, floor), "%s[%lld,%lld,%lld] %.9g vs reference %.9g (%s)", name,
                  (long long)gi, (long long)c, (long long)s, got, pre, what);
    }
}

/* Runs `steps` training steps (forward_ex, backward_ex) and one eval forward of p
 * under split k, and checks every output of this rank against the reference. */
static void run_case(const problem *p, int k, int steps)
{
    const syncbn_dtype t = p->cfg.dtype;
    const size_t es = esize(t);
    int64_t lo, n;
    split(k, p->B, &lo, &n);
    const int64_t C = p->C, S = p->S, len = n * C * S, all = p->B * C * S;
    const double N = (double)(p->B * S);
    void *x = zalloc(len, es), *z = zalloc(len, es), *dy = zalloc(len, es), *y = zalloc(len, es);
    void *dx = zalloc(len, es), *dz = zalloc(len, es);
    float *dw = zalloc(C, sizeof(float)), *db = zalloc(C, sizeof(float));
    gbatch g = {zalloc(all, sizeof(double)), zalloc(all, sizeof(double)), zalloc(all, sizeof(double))};
    reference r = reference_alloc(C);
    const char *what = describe(p, k);

    syncbn_layer *l = NULL;
    int rc = syncbn_create(&p->cfg, MPI_COMM_WORLD, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create: %s (%s)", syncbn_strerror(rc), what);
    if (rc != SYNCBN_OK) /* the same code on every rank: all leave together */
        goto out;
    const int affine = p->cfg.affine, track = p->cfg.track_running_stats;
    for (int64_t c = 0; c < C; c++) {
        if (affine)
            syncbn_weight(l)[c] = weight_of(p, c), syncbn_bias(l)[c] = bias_of(p, c);
        r.w[c] = affine ? weight_of(p, c) : 1.0, r.b[c] = affine ? bias_of(p, c) : 0.0, r.rm[c] = 0, r.rv[c] = 1;
    }

    for (int step = 0; step < steps; step++) {
        make_batch(p, step, &g);
        scatter(p, &g, lo, n, x, z, dy);
        memset(y, 0xff, (size_t)len * es), memset(dx, 0xff, (size_t)len * es), memset(dz, 0xff, (size_t)len * es);
        /* A rank that holds none of the batch passes NULL buffers (z and dz too). */
        rc = syncbn_forward_ex(l, n ? x : NULL, p->z && n ? z : NULL, n, S, 1, n ? y : NULL);
        TU_EXPECT(rc == SYNCBN_OK, "forward_ex: %s (%s)", syncbn_strerror(rc), what);
        rc = syncbn_backward_ex(l, n ? x : NULL, n ? dy : NULL, n, S, n ? dx : NULL, p->dz && n ? dz : NULL,
                                affine ? dw : NULL, affine ? db : NULL);
        TU_EXPECT(rc == SYNCBN_OK, "backward_ex: %s (%s)", syncbn_strerror(rc), what);
        const int ambiguous = reference_step(p, step, &g, &r, step + 1);
        TU_EXPECT(ambiguous == 0, "test data: %d pre-activations within rounding of 0 (%s)", ambiguous, what);

        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < C; c++)
                for (int64_t s = 0; s < S; s++) {
                    const int64_t a = at(p, i, c, s), e = lg(p, lo + i, c, s), gi = lo + i;
                    const double pre = pre_ref(p, &r, &g, e, c);
                    const int m = mask_ref(p, pre);
                    check_y(p, y, a, pre, 1 + (p->z ? fabs(g.z[e]) : 0), exact_elem(p, step, gi, c, s), "y", gi, c,
                            s, what);
                    if (p->dz) { /* dz = g exactly: dy or +0 */
                        const uint32_t want = m ? bits_at(t, dy, a) : 0;
                        TU_EXPECT(bits_at(t, dz, a) == want, "dz[%lld,%lld,%lld] bits %#x, expected %#x (%s)",
                                  (long long)gi, (long long)c, (long long)s, (unsigned)bits_at(t, dz, a),
                                  (unsigned)want, what);
                    }
                    /* dx is O(invstd |w| |dy| / sqrt(N)) smaller than its terms: compare on their scale */
                    const double gg = m ? g.dy[e] : 0.0, xm = g.x[e] - r.mean[c];
                    const double rdx = r.w[c] * r.invstd[c] * (gg - r.db[c] / N - xm * r.invstd[c] * r.dw[c] / N);
                    TU_EXPECT(close_to(t, dx, a, rdx, r.invstd[c] * fabs(r.w[c])),
                              "dx[%lld,%lld,%lld] %.9g vs reference %.9g (%s)", (long long)gi, (long long)c,
                              (long long)s, get(t, dx, a), rdx, what);
                }
        for (int64_t c = 0; c < C; c++) {
            if (affine) {
                TU_EXPECT(tu_close(dw[c], r.dw[c], RTOL, sqrt(N)), "dweight[%lld] %.9g vs %.9g (%s)", (long long)c,
                          dw[c], r.dw[c], what);
                TU_EXPECT(tu_close(db[c], r.db[c], RTOL, sqrt(N)), "dbias[%lld] %.9g vs %.9g (%s)", (long long)c,
                          db[c], r.db[c], what);
            }
            if (!track)
                continue;
            TU_EXPECT(tu_close(syncbn_running_mean(l)[c], r.rm[c], RTOL, 1 + fabs(p->offset)),
                      "running_mean[%lld] %.9g vs %.9g (%s)", (long long)c, syncbn_running_mean(l)[c], r.rm[c], what);
            TU_EXPECT(tu_close(syncbn_running_var(l)[c], r.rv[c], RTOL, 1), "running_var[%lld] %.9g vs %.9g (%s)",
                      (long long)c, syncbn_running_var(l)[c], r.rv[c], what);
        }
        TU_EXPECT(syncbn_num_batches_tracked(l) == step + 1, "num_batches_tracked %lld (%s)",
                  (long long)syncbn_num_batches_tracked(l), what);
    }

    /* Eval: the same formula with the running statistics as stored (float32), or
     * (untracked) this rank's own batch statistics. Never communicates; a rank holding
     * nothing passes NULLs. */
    make_batch(p, steps, &g);
    scatter(p, &g, lo, n, x, z, dy);
    memset(y, 0xff, (size_t)len * es);
    rc = syncbn_forward_ex(l, n ? x : NULL, p->z && n ? z : NULL, n, S, 0, n ? y : NULL);
    TU_EXPECT(rc == SYNCBN_OK, "eval forward_ex: %s (%s)", syncbn_strerror(rc), what);
    for (int64_t c = 0; c < C && n > 0; c++) {
        if (track) {
            r.mean[c] = syncbn_running_mean(l)[c];
            r.invstd[c] = 1 / sqrt((double)syncbn_running_var(l)[c] + p->cfg.eps);
            continue;
        }
        double m = 0, v = 0;
        for (int64_t i = 0; i < n; i++)
            for (int64_t s = 0; s < S; s++)
                m += g.x[lg(p, lo + i, c, s)];
        m /= (double)(n * S);
        for (int64_t i = 0; i < n; i++)
            for (int64_t s = 0; s < S; s++)
                v += pow(g.x[lg(p, lo + i, c, s)] - m, 2);
        r.mean[c] = m, r.invstd[c] = 1 / sqrt(v / (double)(n * S) + p->cfg.eps);
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t e = lg(p, lo + i, c, s);
                const double pre = pre_ref(p, &r, &g, e, c);
                const double terms = fabs(pre - r.b[c]) + fabs(r.b[c]) + (p->z ? fabs(g.z[e]) : 0);
                if (pre != 0 && fabs(pre) < 1e-10 * terms)
                    continue; /* too close to 0 to say which side the library lands on */
                check_y(p, y, at(p, i, c, s), pre, 1 + (p->z ? fabs(g.z[e]) : 0), 0, "eval y", lo + i, c, s, what);
            }
    rc = syncbn_backward_ex(l, n ? x : NULL, n ? dy : NULL, n, S, n ? dx : NULL, NULL, affine ? dw : NULL,
                            affine ? db : NULL);
    TU_EXPECT(rc == SYNCBN_ESTATE, "backward_ex after eval: %s (%s)", syncbn_strerror(rc), what);
    syncbn_destroy(l);
out:
    free(x), free(z), free(dy), free(y), free(dx), free(dz), free(dw), free(db);
    free(g.x), free(g.z), free(g.dy), free(r.buf);
}

/* The activation / residual variants (plain ACT_NONE too: new for bf16). */
static const struct {
    syncbn_activation act;
    int z, dz;
} VARIANTS[] = {{SYNCBN_ACT_NONE, 0, 0}, {SYNCBN_ACT_RELU, 0, 0}, {SYNCBN_ACT_NONE, 1, 0},
                {SYNCBN_ACT_NONE, 1, 1}, {SYNCBN_ACT_RELU, 1, 0}, {SYNCBN_ACT_RELU, 1, 1}};
enum { NVARIANTS = sizeof VARIANTS / sizeof VARIANTS[0] };

static problem make_problem(int64_t B, int64_t C, int64_t S, syncbn_dtype t, int variant, syncbn_layout layout,
                            syncbn_reduction red, int data)
{
    problem p = {B, C, S, syncbn_config_default(C), VARIANTS[variant].z, VARIANTS[variant].dz, data, 0};
    p.cfg.dtype = t, p.cfg.activation = VARIANTS[variant].act;
    p.cfg.layout = layout, p.cfg.reduction = red;
    return p;
}

/* Splits used by the sweeps: even, uneven, empty ranks, all on the last rank (at one
 * rank they are all the same, so only one runs). */
static const int SPLITS[] = {SPLIT_EVEN, SPLIT_RANDOM, SPLIT_HOLES, SPLIT_LAST};

/* dtype x variant x layout x reduction x split, for one shape and option set. */
static void sweep_opts(int64_t B, int64_t C, int64_t S, int data, double offset, int affine, int track)
{
    const int nsplits = tu_nranks == 1 ? 1 : (int)(sizeof SPLITS / sizeof SPLITS[0]);
    for (int t = 0; t < 2; t++)
        for (int v = 0; v < NVARIANTS; v++)
            for (int layout = 0; layout < 2; layout++)
                for (int red = 0; red < 2; red++)
                    for (int k = 0; k < nsplits; k++) {
                        problem p = make_problem(B, C, S, (syncbn_dtype)t, v, (syncbn_layout)layout,
                                                 (syncbn_reduction)red, data);
                        p.offset = offset, p.cfg.affine = affine, p.cfg.track_running_stats = track;
                        run_case(&p, SPLITS[k], 2);
                    }
    tu_verdict();
}

static void sweep(int64_t B, int64_t C, int64_t S, int data, double offset)
{
    sweep_opts(B, C, S, data, offset, 1, 1);
}

START_TEST(reference_small) { sweep(7, 5, 9, DATA_RANDOM, 0); }
END_TEST
START_TEST(reference_spatial_one) { sweep(13, 19, 1, DATA_RANDOM, 0); } /* [n][C] input, C odd */
END_TEST
START_TEST(reference_nhwc_tails) { sweep(6, 37, 4, DATA_RANDOM, 0); }  /* lanes + a tail of channels */
END_TEST
START_TEST(reference_wide_rows) { sweep(5, 3, 67, DATA_RANDOM, 0); }   /* S not a multiple of the lanes */
END_TEST
START_TEST(reference_offset) { sweep(8, 6, 49, DATA_RANDOM, 100); }    /* x = 100 + N(0,1) */
END_TEST
/* Without weight and bias (k = invstd, shift 0), and untracked (eval normalizes with
 * this rank's own batch). */
START_TEST(reference_no_affine_untracked) { sweep_opts(6, 5, 7, DATA_RANDOM, 0, 0, 0); }
END_TEST

/* Pre-activations exactly 0 (+0 and -0), the double-rounding trap, overflow to Inf,
 * NaN/Inf residuals and bf16-subnormal outputs: see EDGE_B. N = 32 and N = 8 (powers
 * of two). */
START_TEST(reference_exact_zero_and_specials)
{
    sweep(8, 7, 4, DATA_EDGE, 0);
    sweep(8, 8, 1, DATA_EDGE, 0); /* the subnormal channel 6, and a plain one after it */
}
END_TEST

/* Tensors large enough (> 2^15 elements) for the kernels to split work over two
 * OpenMP threads: the fused variants with z and dz, and ReLU alone. */
START_TEST(reference_two_threads)
{
    const int threads = omp_get_max_threads();
    omp_set_num_threads(2);
    static const int variants[] = {1, 5};
    for (int t = 0; t < 2; t++)
        for (int v = 0; v < 2; v++)
            for (int layout = 0; layout < 2; layout++)
                for (int red = 0; red < 2; red++) {
                    problem p = make_problem(10, layout ? 40 : 12, layout ? 100 : 300, (syncbn_dtype)t, variants[v],
                                             (syncbn_layout)layout, (syncbn_reduction)red, DATA_RANDOM);
                    run_case(&p, tu_nranks == 1 ? SPLIT_EVEN : SPLIT_RANDOM, 1);
                }
    omp_set_num_threads(threads);
    tu_verdict();
}
END_TEST

/* ---- finite differences through the ReLU, away from its kink ---- */

/* Collective: L = sum over the global batch of wt_e * y_e (a fixed weighting), in
 * double, from one training forward; *positive gets the global count of y > 0. */
static double fd_loss(syncbn_layer *l, const problem *p, const float *x, const float *z, int64_t n, float *y,
                      const float *wt, int64_t *positive)
{
    int rc = syncbn_forward_ex(l, n ? x : NULL, z && n ? z : NULL, n, p->S, 1, n ? y : NULL);
    TU_EXPECT(rc == SYNCBN_OK, "fd forward_ex: %s", syncbn_strerror(rc));
    double v[2] = {0, 0}, all[2];
    for (int64_t e = 0; e < n * p->C * p->S; e++)
        v[0] += (double)y[e] * wt[e], v[1] += y[e] > 0;
    MPI_Allreduce(v, all, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    *positive = (int64_t)all[1];
    return all[0];
}

/* f32 ReLU layer, with and without z: dx, dz, dweight and dbias from backward_ex
 * against central differences of the loss, each evaluated by two training forwards.
 * Without z, x is bimodal (|x| in [1, 2]) and the bias small, so |BN(x)| > 0.4; with
 * z, z is set from the reference BN(x) so that every pre-activation is
 * +-(0.6 .. 1.4). A perturbation moves pre-activations by at most ~0.03, and the
 * count of positive outputs is checked to stay the same under every perturbation. */
START_TEST(backward_finite_differences)
{
    for (int use_z = 0; use_z < 2; use_z++)
        for (int layout = 0; layout < 2; layout++) {
            problem p = make_problem(6, 3, 5, SYNCBN_F32, use_z ? 5 : 1, (syncbn_layout)layout, SYNCBN_FAST,
                                     DATA_RANDOM);
            p.cfg.track_running_stats = 0;
            int64_t lo, n;
            split(SPLIT_RANDOM, p.B, &lo, &n);
            const int64_t C = p.C, S = p.S, len = n * C * S;
            float *x = zalloc(len, 4), *z = zalloc(len, 4), *wt = zalloc(len, 4), *y = zalloc(len, 4);
            float *dx = zalloc(len, 4), *dz = zalloc(len, 4), dw[3], db[3];
            double w[3], b[3];
            /* the global x (every rank), then z from the reference BN of it */
            double *gx = zalloc(p.B * C * S, sizeof(double));
            for (int64_t i = 0; i < p.B; i++)
                for (int64_t c = 0; c < C; c++)
                    for (int64_t s = 0; s < S; s++) {
                        const uint64_t k = key(7, use_z, i, c, s);
                        const double u = tu_uniform(k);
                        gx[lg(&p, i, c, s)] = (float)(use_z ? (1 + c) * tu_normal(k) : (u < 0.5 ? -1 : 1) * (1 + tu_uniform(k + 1)));
                    }
            for (int64_t c = 0; c < C; c++) {
                w[c] = (float)(0.7 + 0.3 * (double)c), b[c] = (float)(0.05 * (double)c);
                double m = 0, v = 0;
                for (int64_t i = 0; i < p.B; i++)
                    for (int64_t s = 0; s < S; s++)
                        m += gx[lg(&p, i, c, s)] / (double)(p.B * S);
                for (int64_t i = 0; i < p.B; i++)
                    for (int64_t s = 0; s < S; s++)
                        v += pow(gx[lg(&p, i, c, s)] - m, 2) / (double)(p.B * S);
                for (int64_t i = 0; i < n; i++)
                    for (int64_t s = 0; s < S; s++) {
                        const int64_t a = at(&p, i, c, s), e = lg(&p, lo + i, c, s);
                        const uint64_t k = key(8, use_z, lo + i, c, s);
                        const double bn = (gx[e] - m) / sqrt(v + p.cfg.eps) * w[c] + b[c];
                        x[a] = (float)gx[e];
                        z[a] = (float)((tu_uniform(k) < 0.5 ? -1 : 1) * (0.6 + 0.8 * tu_uniform(k + 1)) - bn);
                        wt[a] = (float)tu_normal(k + 2);
                    }
            }
            const float *zz = use_z ? z : NULL;
            syncbn_layer *l;
            ck_assert_int_eq(syncbn_create(&p.cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
            for (int64_t c = 0; c < C; c++)
                syncbn_weight(l)[c] = (float)w[c], syncbn_bias(l)[c] = (float)b[c];
            int64_t pos0, pos;
            fd_loss(l, &p, x, zz, n, y, wt, &pos0);
            int rc = syncbn_backward_ex(l, n ? x : NULL, n ? wt : NULL, n, S, n ? dx : NULL, use_z && n ? dz : NULL,
                                        dw, db);
            TU_EXPECT(rc == SYNCBN_OK, "fd backward_ex: %s", syncbn_strerror(rc));
            TU_EXPECT(pos0 > 0 && pos0 < p.B * C * S, "fd data: %lld of %lld outputs positive: no kink to cross",
                      (long long)pos0, (long long)(p.B * C * S));

            const double h = 1e-2;
            /* d/dx and d/dz at a few global elements: the owning rank perturbs, all evaluate. */
            for (int which = 0; which < 1 + use_z; which++)
                for (int probe = 0; probe < 8; probe++) {
                    const int64_t gi = (int64_t)(tu_uniform(100u + 10u * (unsigned)which + (unsigned)probe) * (double)p.B);
                    const int64_t c = probe % C, s = (probe * 2) % S;
                    const int mine = gi >= lo && gi < lo + n;
                    float *v = mine ? &(which ? z : x)[at(&p, gi - lo, c, s)] : NULL;
                    const float keep = mine ? *v : 0, up = (float)(keep + h), down = (float)(keep - h);
                    if (mine)
                        *v = up;
                    const double lp = fd_loss(l, &p, x, zz, n, y, wt, &pos);
                    TU_EXPECT(pos == pos0, "fd: perturbing %s crossed the ReLU kink", which ? "z" : "x");
                    if (mine)
                        *v = down;
                    const double lm = fd_loss(l, &p, x, zz, n, y, wt, &pos);
                    TU_EXPECT(pos == pos0, "fd: perturbing %s crossed the ReLU kink", which ? "z" : "x");
                    if (mine)
                        *v = keep;
                    double step = mine ? (double)up - (double)down : 0, an = mine ? (which ? dz : dx)[at(&p, gi - lo, c, s)] : 0;
                    MPI_Allreduce(MPI_IN_PLACE, &step, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
                    MPI_Allreduce(MPI_IN_PLACE, &an, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
                    const double fd = (lp - lm) / step;
                    TU_EXPECT(fabs(fd - an) <= 2e-3 * (1 + fabs(an)), "%s[%lld,%lld,%lld] fd %.6g vs analytic %.6g (%s)",
                              which ? "dz" : "dx", (long long)gi, (long long)c, (long long)s, fd, an,
                              describe(&p, SPLIT_RANDOM));
                }
            /* d/dweight and d/dbias: every rank perturbs its copy (they are replicated). */
            for (int64_t c = 0; c < C; c++) {
                float *ps[2] = {syncbn_weight(l) + c, syncbn_bias(l) + c};
                const float an[2] = {dw[c], db[c]};
                for (int k = 0; k < 2; k++) {
                    const float keep = *ps[k], up = (float)(keep + h), down = (float)(keep - h);
                    *ps[k] = up;
                    const double lp = fd_loss(l, &p, x, zz, n, y, wt, &pos);
                    TU_EXPECT(pos == pos0, "fd: perturbing a parameter crossed the ReLU kink");
                    *ps[k] = down;
                    const double lm = fd_loss(l, &p, x, zz, n, y, wt, &pos);
                    TU_EXPECT(pos == pos0, "fd: perturbing a parameter crossed the ReLU kink");
                    *ps[k] = keep;
                    const double fd = (lp - lm) / ((double)up - (double)down);
                    TU_EXPECT(fabs(fd - an[k]) <= 2e-3 * (1 + fabs(an[k])), "%s[%lld] fd %.6g vs analytic %.6g (%s)",
                              k ? "dbias" : "dweight", (long long)c, fd, an[k], describe(&p, SPLIT_RANDOM));
                }
            }
            syncbn_destroy(l);
            free(x), free(z), free(wt), free(y), free(dx), free(dz), free(gx);
        }
    tu_verdict();
}
END_TEST

/* ---- fused == BN followed by a separate ReLU, bit for bit ---- */

/* y > 0 ? y : +0 in type t (NaN stays), as a separate ReLU layer computes it. */
static void relu_inplace(syncbn_dtype t, void *y, int64_t len)
{
    for (int64_t e = 0; e < len; e++) {
        const double v = get(t, y, e);
        if (!(v > 0) && !isnan(v))
            put(t, y, e, 0.0);
    }
}

/* PyTorch's threshold_backward: dy where the ReLU's input was > 0, else +0. */
static void relu_backward(syncbn_dtype t, const void *in, const void *dy, void *out, int64_t len)
{
    const size_t es = esize(t);
    for (int64_t e = 0; e < len; e++) {
        if (get(t, in, e) > 0)
            memcpy((char *)out + e * (int64_t)es, (const char *)dy + e * (int64_t)es, es);
        else
            put(t, out, e, 0.0);
    }
}

static int same_bytes(const void *a, const void *b, int64_t len, size_t es)
{
    return memcmp(a, b, (size_t)len * es) == 0;
}

/* An ACT_NONE layer (then a ReLU here) and an ACT_RELU layer with the same
 * parameters on the same data, two steps: y, dx, dz, dweight, dbias and the running
 * statistics must be the same bits. For f32 without z, also the float API
 * (syncbn_forward / syncbn_backward) on both layers. */
static void fused_vs_unfused(problem p, int k)
{
    const syncbn_dtype t = p.cfg.dtype;
    const size_t es = esize(t);
    int64_t lo, n;
    split(k, p.B, &lo, &n);
    const int64_t C = p.C, len = n * C * p.S, all = p.B * C * p.S;
    const int float_api = t == SYNCBN_F32 && !p.z;
    void *x = zalloc(len, es), *z = zalloc(len, es), *dy = zalloc(len, es), *g = zalloc(len, es);
    void *y0 = zalloc(len, es), *y1 = zalloc(len, es), *y2 = zalloc(len, es);
    void *dx0 = zalloc(len, es), *dx1 = zalloc(len, es), *dx2 = zalloc(len, es);
    void *dz0 = zalloc(len, es), *dz1 = zalloc(len, es);
    float dw[3][64], db[3][64];
    gbatch gb = {zalloc(all, sizeof(double)), zalloc(all, sizeof(double)), zalloc(all, sizeof(double))};
    const char *what = describe(&p, k);
    syncbn_layer *l[4] = {NULL, NULL, NULL, NULL}; /* none (ex), relu (ex), relu (float API), none (float API) */
    for (int q = 0; q < 4; q++) {
        syncbn_config cfg = p.cfg;
        cfg.activation = q == 1 || q == 2 ? SYNCBN_ACT_RELU : SYNCBN_ACT_NONE;
        if (q >= 2 && !float_api)
            continue;
        int rc = syncbn_create(&cfg, MPI_COMM_WORLD, &l[q]);
        TU_EXPECT(rc == SYNCBN_OK, "create: %s", syncbn_strerror(rc));
        for (int64_t c = 0; c < C; c++)
            syncbn_weight(l[q])[c] = weight_of(&p, c), syncbn_bias(l[q])[c] = bias_of(&p, c);
    }
    for (int step = 0; step < 2; step++) {
        make_batch(&p, step, &gb);
        scatter(&p, &gb, lo, n, x, z, dy);
        const void *xx = n ? x : NULL, *zz = p.z && n ? z : NULL;
        int rc = syncbn_forward_ex(l[0], xx, zz, n, p.S, 1, n ? y0 : NULL);
        rc |= syncbn_forward_ex(l[1], xx, zz, n, p.S, 1, n ? y1 : NULL);
        relu_backward(t, y0, dy, g, len); /* the separate ReLU's backward, from its input y0 */
        rc |= syncbn_backward_ex(l[0], xx, n ? g : NULL, n, p.S, n ? dx0 : NULL, p.z && n ? dz0 : NULL, dw[0], db[0]);
        rc |= syncbn_backward_ex(l[1], xx, n ? dy : NULL, n, p.S, n ? dx1 : NULL, p.z && n ? dz1 : NULL, dw[1], db[1]);
        TU_EXPECT(rc == SYNCBN_OK, "fused/unfused calls failed (%s)", what);
        if (float_api) { /* the float API applies the configured activation */
            rc = syncbn_forward(l[2], xx, n, p.S, 1, n ? y2 : NULL);
            rc |= syncbn_backward(l[2], xx, n ? dy : NULL, n, p.S, n ? dx2 : NULL, dw[2], db[2]);
            TU_EXPECT(rc == SYNCBN_OK, "float API on a ReLU layer failed (%s)", what);
            TU_EXPECT(same_bytes(y2, y1, len, es) && same_bytes(dx2, dx1, len, es) &&
                          memcmp(dw[2], dw[1], sizeof(float) * (size_t)C) == 0 &&
                          memcmp(db[2], db[1], sizeof(float) * (size_t)C) == 0,
                      "syncbn_forward/backward on an ACT_RELU layer differ from the _ex calls (%s)", what);
            rc = syncbn_forward(l[3], xx, n, p.S, 1, n ? y2 : NULL);
            rc |= syncbn_backward(l[3], xx, n ? g : NULL, n, p.S, n ? dx2 : NULL, dw[2], db[2]);
            TU_EXPECT(rc == SYNCBN_OK, "float API on an ACT_NONE layer failed (%s)", what);
            TU_EXPECT(same_bytes(y2, y0, len, es) && same_bytes(dx2, dx0, len, es) &&
                          memcmp(dw[2], dw[0], sizeof(float) * (size_t)C) == 0 &&
                          memcmp(db[2], db[0], sizeof(float) * (size_t)C) == 0,
                      "syncbn_forward/backward differ from forward_ex/backward_ex with z = NULL (%s)", what);
        }
        relu_inplace(t, y0, len);
        TU_EXPECT(same_bytes(y0, y1, len, es), "fused y differs from BN then ReLU (%s, step %d)", what, step);
        TU_EXPECT(same_bytes(dx0, dx1, len, es), "fused dx differs from BN then ReLU (%s, step %d)", what, step);
        TU_EXPECT(!p.z || same_bytes(dz0, dz1, len, es), "fused dz differs from BN then ReLU (%s)", what);
        TU_EXPECT(memcmp(dw[0], dw[1], sizeof(float) * (size_t)C) == 0 &&
                      memcmp(db[0], db[1], sizeof(float) * (size_t)C) == 0,
                  "fused dweight/dbias differ from BN then ReLU (%s, step %d)", what, step);
        TU_EXPECT(memcmp(syncbn_running_mean(l[0]), syncbn_running_mean(l[1]), sizeof(float) * (size_t)C) == 0 &&
                      memcmp(syncbn_running_var(l[0]), syncbn_running_var(l[1]), sizeof(float) * (size_t)C) == 0,
                  "running statistics differ (%s)", what);
    }
    for (int q = 0; q < 4; q++)
        syncbn_destroy(l[q]);
    free(x), free(z), free(dy), free(g), free(y0), free(y1), free(y2), free(dx0), free(dx1), free(dx2);
    free(dz0), free(dz1), free(gb.x), free(gb.z), free(gb.dy);
}

START_TEST(fused_equals_bn_then_relu)
{
    const int threads = omp_get_max_threads();
    for (int big = 0; big < 2; big++) {
        omp_set_num_threads(big ? 2 : 1);
        for (int t = 0; t < 2; t++)
            for (int use_z = 0; use_z < 2; use_z++)
                for (int layout = 0; layout < 2; layout++)
                    for (int red = 0; red < 2; red++) {
                        problem p = make_problem(big ? 10 : 7, big ? 40 : 13, big ? 100 : 49, (syncbn_dtype)t,
                                                 use_z ? 4 : 1, (syncbn_layout)layout, (syncbn_reduction)red,
                                                 DATA_RANDOM);
                        fused_vs_unfused(p, tu_nranks == 1 ? SPLIT_EVEN : SPLIT_RANDOM);
                        if (big)
                            continue;
                        /* exact zeros (+0 and -0), NaN and Inf pre-activations */
                        p = make_problem(8, 6, 4, (syncbn_dtype)t, use_z ? 4 : 1, (syncbn_layout)layout,
                                         (syncbn_reduction)red, DATA_EDGE);
                        fused_vs_unfused(p, tu_nranks == 1 ? SPLIT_EVEN : SPLIT_HOLES);
                    }
    }
    omp_set_num_threads(threads);
    tu_verdict();
}
END_TEST

/* ---- aliasing and element-aligned buffers give the same bits ---- */

/* One training step of a ReLU+z layer; buffers as `mode` says:
 *   0: separate, aligned (the reference)     1: y = x (x kept for backward), dx = dy
 *   2: y = z, dz = dy                          3: dx = x
 *   4: every buffer at an odd element offset (2-byte aligned for bf16)
 * Outputs copied to yo, dxo, dzo, dwo, dbo. */
static void alias_run(const problem *p, int64_t lo, int64_t n, int mode, void *yo, void *dxo, void *dzo, float *dwo,
                      float *dbo)
{
    const syncbn_dtype t = p->cfg.dtype;
    const size_t es = esize(t);
    const int64_t len = n * p->C * p->S, all = p->B * p->C * p->S;
    gbatch gb = {zalloc(all, sizeof(double)), zalloc(all, sizeof(double)), zalloc(all, sizeof(double))};
    make_batch(p, 0, &gb);
    char *base[7];
    for (int b = 0; b < 7; b++)
        base[b] = zalloc(len + 8, es);
    const int64_t off = mode == 4 ? 1 : 0;
    char *x = base[0] + (off + 0) * (int64_t)es, *z = base[1] + (off + 2) * (int64_t)es, *dy = base[2] + (off + 4) * (int64_t)es;
    char *y = base[3] + (off + 6) * (int64_t)es, *dx = base[4] + off * (int64_t)es, *dz = base[5] + (off + 2) * (int64_t)es;
    char *xkeep = base[6];
    scatter(p, &gb, lo, n, x, z, dy);
    memcpy(xkeep, x, (size_t)len * es);
    if (mode == 1)
        y = x, dx = dy;
    if (mode == 2)
        y = z, dz = dy;
    if (mode == 3)
        dx = x;
    syncbn_layer *l;
    int rc = syncbn_create(&p->cfg, MPI_COMM_WORLD, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create: %s", syncbn_strerror(rc));
    for (int64_t c = 0; c < p->C; c++)
        syncbn_weight(l)[c] = weight_of(p, c), syncbn_bias(l)[c] = bias_of(p, c);
    rc = syncbn_forward_ex(l, n ? x : NULL, n ? z : NULL, n, p->S, 1, n ? y : NULL);
    memcpy(yo, y, (size_t)len * es);
    const char *xb = mode == 1 ? xkeep : x; /* mode 1 overwrote x with y: the backward needs the original */
    rc |= syncbn_backward_ex(l, n ? xb : NULL, n ? dy : NULL, n, p->S, n ? dx : NULL, n ? dz : NULL, dwo, dbo);
    TU_EXPECT(rc == SYNCBN_OK, "aliased calls (mode %d) failed", mode);
    memcpy(dxo, dx, (size_t)len * es), memcpy(dzo, dz, (size_t)len * es);
    syncbn_destroy(l);
    for (int b = 0; b < 7; b++)
        free(base[b]);
    free(gb.x), free(gb.z), free(gb.dy);
}

START_TEST(aliasing_and_element_alignment)
{
    for (int t = 0; t < 2; t++)
        for (int layout = 0; layout < 2; layout++) {
            problem p = make_problem(7, 13, 49, (syncbn_dtype)t, 5, (syncbn_layout)layout, SYNCBN_FAST, DATA_RANDOM);
            int64_t lo, n;
            split(tu_nranks == 1 ? SPLIT_EVEN : SPLIT_RANDOM, p.B, &lo, &n);
            const int64_t len = n * p.C * p.S;
            const size_t es = esize(p.cfg.dtype);
            void *y[2] = {zalloc(len, es), zalloc(len, es)}, *dx[2] = {zalloc(len, es), zalloc(len, es)};
            void *dz[2] = {zalloc(len, es), zalloc(len, es)};
            float dw[2][13], db[2][13];
            alias_run(&p, lo, n, 0, y[0], dx[0], dz[0], dw[0], db[0]);
            for (int mode = 1; mode <= 4; mode++) {
                alias_run(&p, lo, n, mode, y[1], dx[1], dz[1], dw[1], db[1]);
                TU_EXPECT(same_bytes(y[0], y[1], len, es) && same_bytes(dx[0], dx[1], len, es) &&
                              same_bytes(dz[0], dz[1], len, es) && memcmp(dw[0], dw[1], sizeof dw[0]) == 0 &&
                              memcmp(db[0], db[1], sizeof db[0]) == 0,
                          "aliased/offset buffers (mode %d) give other bits (%s)", mode, describe(&p, 0));
            }
            for (int q = 0; q < 2; q++)
                free(y[q]), free(dx[q]), free(dz[q]);
        }
    tu_verdict();
}
END_TEST

/* ---- errors: the same code on every rank, and nothing changed ---- */

#define EXPECT_CODE(call, code)                                                                                      \
    do {                                                                                                             \
        int rc_ = (call);                                                                                            \
        TU_EXPECT(rc_ == (code), "%s returned %s, expected %s", #call, syncbn_strerror(rc_), syncbn_strerror(code)); \
    } while (0)

/* Local data of n samples of C = 4 channels and S positions, in type t. */
static void local_data_s(syncbn_dtype t, void *x, void *z, void *dy, int64_t n, int64_t S, uint64_t salt)
{
    for (int64_t e = 0; e < n * 4 * S; e++) {
        put(t, x, e, tu_normal(salt + 3 * (uint64_t)e + 1000003 * (uint64_t)tu_rank));
        put(t, z, e, tu_normal(salt + 3 * (uint64_t)e + 1 + 1000003 * (uint64_t)tu_rank));
        put(t, dy, e, tu_normal(salt + 3 * (uint64_t)e + 2 + 1000003 * (uint64_t)tu_rank));
    }
}

static void local_data(syncbn_dtype t, void *x, void *z, void *dy, int64_t n, uint64_t salt)
{
    local_data_s(t, x, z, dy, n, 3, salt);
}

/* dz may be non-NULL only if the training forward had a z: EINVAL on every rank,
 * also when only one rank asks for dz; nothing changes. */
START_TEST(errors_dz_without_z)
{
    for (int t = 0; t < 2; t++)
        for (int act = 0; act < 2; act++) {
            syncbn_config cfg = syncbn_config_default(4);
            cfg.dtype = (syncbn_dtype)t, cfg.activation = (syncbn_activation)act;
            float x[48], z[48], dy[48], y[48], dx[48], dz[48], dw[4], db[4]; /* room for f32 or bf16 */
            const int64_t n = 4, S = 3;
            local_data(cfg.dtype, x, z, dy, n, 77);
            syncbn_layer *l;
            EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
            EXPECT_CODE(syncbn_forward_ex(l, x, NULL, n, S, 1, y), SYNCBN_OK);
            tu_image before = tu_take_image(l);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, dx, dz, dw, db), SYNCBN_EINVAL);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, dx, tu_rank == tu_nranks - 1 ? dz : NULL, dw, db),
                        SYNCBN_EINVAL);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, NULL, tu_rank == 0 ? dz : NULL, NULL, NULL), SYNCBN_EINVAL);
            tu_image after = tu_take_image(l);
            TU_EXPECT(tu_same_image(before, after), "a refused backward changed the layer (%s)", t ? "bf16" : "f32");
            free(before.bytes), free(after.bytes);
            /* the layer still works, with and without z */
            EXPECT_CODE(syncbn_forward_ex(l, x, NULL, n, S, 1, y), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, dx, NULL, dw, db), SYNCBN_OK);
            EXPECT_CODE(syncbn_forward_ex(l, x, z, n, S, 1, y), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, dx, dz, dw, db), SYNCBN_OK);
            /* dx and dz both NULL: dweight and dbias only */
            EXPECT_CODE(syncbn_forward_ex(l, x, z, n, S, 1, y), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, NULL, NULL, dw, db), SYNCBN_OK);
            /* bad arguments of the new calls, on one rank */
            EXPECT_CODE(syncbn_forward_ex(l, tu_rank == 0 ? NULL : x, z, n, S, 1, y), SYNCBN_EINVAL);
            EXPECT_CODE(syncbn_forward_ex(l, x, z, n, S, 1, tu_rank == tu_nranks - 1 ? NULL : y), SYNCBN_EINVAL);
            syncbn_destroy(l);
        }
    tu_verdict();
}
END_TEST

/* A bf16 layer through syncbn_forward / syncbn_backward: EINVAL on every rank (no
 * collective), before and after a training forward_ex, with nothing changed. */
START_TEST(errors_bf16_through_float_api)
{
    syncbn_config cfg = syncbn_config_default(4);
    cfg.dtype = SYNCBN_BF16;
    for (int act = 0; act < 2; act++) {
        cfg.activation = (syncbn_activation)act;
        uint16_t x[48], z[48], dy[48], y[48], dx[48];
        float buf[48], dw[4], db[4];
        const int64_t n = 4, S = 3;
        local_data(SYNCBN_BF16, x, z, dy, n, 99);
        for (int e = 0; e < 48; e++)
            buf[e] = (float)bf16_value(x[e]);
        syncbn_layer *l;
        EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
        tu_image before = tu_take_image(l);
        EXPECT_CODE(syncbn_forward(l, buf, n, S, 1, buf), SYNCBN_EINVAL);
        EXPECT_CODE(syncbn_forward(l, buf, n, S, 0, buf), SYNCBN_EINVAL);
        EXPECT_CODE(syncbn_backward(l, buf, buf, n, S, buf, dw, db), SYNCBN_EINVAL);
        tu_image after = tu_take_image(l);
        TU_EXPECT(tu_same_image(before, after), "refused float calls changed a bf16 layer");
        free(after.bytes);
        EXPECT_CODE(syncbn_forward_ex(l, x, z, n, S, 1, y), SYNCBN_OK);
        free(before.bytes);
        before = tu_take_image(l);
        EXPECT_CODE(syncbn_backward(l, buf, buf, n, S, buf, dw, db), SYNCBN_EINVAL);
        EXPECT_CODE(syncbn_forward(l, buf, n, S, 1, buf), SYNCBN_EINVAL);
        after = tu_take_image(l);
        TU_EXPECT(tu_same_image(before, after), "refused float calls changed a bf16 layer");
        free(before.bytes), free(after.bytes);
        EXPECT_CODE(syncbn_forward_ex(l, x, z, n, S, 1, y), SYNCBN_OK);
        EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, dx, NULL, dw, db), SYNCBN_OK);
        syncbn_destroy(l);
    }
    tu_verdict();
}
END_TEST

/* Mask growth failing on ONE rank (injected with sbn_test_fail_alloc): ENOMEM on
 * every rank, the layer's parameters, running statistics and num_batches_tracked
 * unchanged bit for bit, the next backward ESTATE; the old mask still serves
 * batches no larger than before (same bits as before the failure), and once the
 * injection is off a larger forward works. */
START_TEST(errors_enomem_on_mask_growth)
{
    const int victim = tu_nranks - 1;
    for (int t = 0; t < 2; t++)
        for (int use_z = 0; use_z < 2; use_z++) {
            syncbn_config cfg = syncbn_config_default(4);
            cfg.dtype = (syncbn_dtype)t, cfg.activation = SYNCBN_ACT_RELU;
            cfg.layout = use_z ? SYNCBN_NHWC : SYNCBN_NCHW;
            const size_t es = esize(cfg.dtype);
            /* mask sizes 4 KiB, 10 KiB, 24 KiB at one bit per element: each growth more
             * than doubles, so no capacity rounding or doubling can absorb one */
            const int64_t S = 4096, small = 2, medium = 5, big = 12, most = big * 4 * S;
            char *x = zalloc(most, es), *z = zalloc(most, es), *dy = zalloc(most, es), *y = zalloc(most, es);
            char *dx = zalloc(most, es), *dz = zalloc(most, es), *y_ok = zalloc(most, es), *dx_ok = zalloc(most, es);
            char *dz_ok = zalloc(most, es);
            float dw[4], db[4], dw_ok[4], db_ok[4];
            local_data_s(cfg.dtype, x, z, dy, big, S, 55 + (uint64_t)use_z);
            const void *zz = use_z ? z : NULL;
            void *dzz = use_z ? dz : NULL;
            const char *what = t ? (use_z ? "bf16 relu+z" : "bf16 relu") : (use_z ? "f32 relu+z" : "f32 relu");
            syncbn_layer *l;
            EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
            for (int c = 0; c < 4; c++)
                syncbn_weight(l)[c] = 0.5f + 0.25f * (float)c, syncbn_bias(l)[c] = 0.125f * (float)c - 0.25f;

            /* 1. the very first mask allocation fails on one rank */
            tu_image before = tu_take_image(l);
            if (tu_rank == victim)
                sbn_test_fail_alloc(0);
            EXPECT_CODE(syncbn_forward_ex(l, x, zz, small, S, 1, y), SYNCBN_ENOMEM);
            tu_image after = tu_take_image(l);
            TU_EXPECT(tu_same_image(before, after), "ENOMEM changed the layer (first allocation, %s)", what);
            free(after.bytes);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, small, S, dx, NULL, dw, db), SYNCBN_ESTATE);
            /* also when asking for dz: the failed forward WAS given a z, and there is no
             * matching forward at all, so the answer is the order (ESTATE), not "dz without
             * z" (EINVAL; the library said so before 27d11bd) */
            if (use_z)
                EXPECT_CODE(syncbn_backward_ex(l, x, dy, small, S, dx, dz, dw, db), SYNCBN_ESTATE);
            sbn_test_fail_alloc(-1);
            EXPECT_CODE(syncbn_forward_ex(l, x, zz, small, S, 1, y_ok), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, small, S, dx_ok, dzz ? dz_ok : NULL, dw_ok, db_ok), SYNCBN_OK);

            /* 2. one more growth succeeds (on the victim only), the next one fails */
            if (tu_rank == victim)
                sbn_test_fail_alloc(1);
            const int64_t n_med = tu_rank == victim ? medium : small, n_big = tu_rank == victim ? big : small;
            EXPECT_CODE(syncbn_forward_ex(l, x, zz, n_med, S, 1, y), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n_med, S, dx, dzz, dw, db), SYNCBN_OK);
            free(before.bytes);
            before = tu_take_image(l);
            EXPECT_CODE(syncbn_forward_ex(l, x, zz, n_big, S, 1, y), SYNCBN_ENOMEM);
            after = tu_take_image(l);
            TU_EXPECT(tu_same_image(before, after), "ENOMEM changed the layer (growth, %s)", what);
            free(after.bytes);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n_big, S, dx, NULL, dw, db), SYNCBN_ESTATE);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n_med, S, dx, NULL, dw, db), SYNCBN_ESTATE);

            /* 3. injection still armed: batches that need no growth work, with the bits of step 1 */
            EXPECT_CODE(syncbn_forward_ex(l, x, zz, small, S, 1, y), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, small, S, dx, dzz, dw, db), SYNCBN_OK);
            TU_EXPECT(same_bytes(y, y_ok, small * 4 * S, es) && same_bytes(dx, dx_ok, small * 4 * S, es) &&
                          (!use_z || same_bytes(dz, dz_ok, small * 4 * S, es)) && memcmp(dw, dw_ok, sizeof dw) == 0 &&
                          memcmp(db, db_ok, sizeof db) == 0,
                      "after ENOMEM the old mask gives other results (%s)", what);

            /* 4. injection off: the larger batch works */
            sbn_test_fail_alloc(-1);
            EXPECT_CODE(syncbn_forward_ex(l, x, zz, n_big, S, 1, y), SYNCBN_OK);
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n_big, S, dx, dzz, dw, db), SYNCBN_OK);
            free(before.bytes);
            syncbn_destroy(l);
            free(x), free(z), free(dy), free(y), free(dx), free(dz), free(y_ok), free(dx_ok), free(dz_ok);
        }

    /* An ACT_NONE layer keeps no mask: an armed injection does not touch it. */
    for (int t = 0; t < 2; t++) {
        syncbn_config cfg = syncbn_config_default(4);
        cfg.dtype = (syncbn_dtype)t;
        float x[72], z[72], dy[72], y[72], dx[72], dz[72]; /* 6 samples x 12, f32 or bf16 */
        local_data(cfg.dtype, x, z, dy, 6, 66);
        syncbn_layer *l;
        EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
        sbn_test_fail_alloc(0);
        EXPECT_CODE(syncbn_forward_ex(l, x, z, 6, 3, 1, y), SYNCBN_OK);
        EXPECT_CODE(syncbn_backward_ex(l, x, dy, 6, 3, dx, dz, NULL, NULL), SYNCBN_OK);
        sbn_test_fail_alloc(-1);
        syncbn_destroy(l);
    }
    tu_verdict();
}
END_TEST

/* Invalid dtype or activation: EINVAL at create, on every rank even if one rank
 * has it; ranks disagreeing on either: EMISMATCH. */
START_TEST(errors_config)
{
    const syncbn_config good = syncbn_config_default(4);
    syncbn_layer *l = (syncbn_layer *)&l;
    static const int bad_dtype[] = {2, -1, 255}, bad_act[] = {2, -1, 7};
    for (int q = 0; q < 3; q++) {
        for (int everywhere = 0; everywhere < 2; everywhere++) {
            const int mine = everywhere || tu_rank == tu_nranks - 1;
            syncbn_config c = good;
            if (mine)
                c.dtype = (syncbn_dtype)bad_dtype[q];
            EXPECT_CODE(syncbn_create(&c, MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
            TU_EXPECT(l == NULL, "failed create must set *out to NULL");
            c = good;
            if (mine)
                c.activation = (syncbn_activation)bad_act[q];
            EXPECT_CODE(syncbn_create(&c, MPI_COMM_WORLD, &l), SYNCBN_EINVAL);
            TU_EXPECT(l == NULL, "failed create must set *out to NULL");
        }
    }
    if (tu_nranks > 1) {
        syncbn_config c = good;
        c.dtype = tu_rank == 1 ? SYNCBN_BF16 : SYNCBN_F32;
        EXPECT_CODE(syncbn_create(&c, MPI_COMM_WORLD, &l), SYNCBN_EMISMATCH);
        c = good;
        c.activation = tu_rank == 0 ? SYNCBN_ACT_RELU : SYNCBN_ACT_NONE;
        EXPECT_CODE(syncbn_create(&c, MPI_COMM_WORLD, &l), SYNCBN_EMISMATCH);
        c = good;
        c.dtype = SYNCBN_BF16, c.activation = tu_rank == tu_nranks - 1 ? SYNCBN_ACT_NONE : SYNCBN_ACT_RELU;
        EXPECT_CODE(syncbn_create(&c, MPI_COMM_WORLD, &l), SYNCBN_EMISMATCH);
        TU_EXPECT(l == NULL, "failed create must set *out to NULL");
    }
    /* the new fields round-trip through syncbn_get_config */
    syncbn_config c = good, back;
    c.dtype = SYNCBN_BF16, c.activation = SYNCBN_ACT_RELU;
    EXPECT_CODE(syncbn_create(&c, MPI_COMM_WORLD, &l), SYNCBN_OK);
    EXPECT_CODE(syncbn_get_config(l, &back), SYNCBN_OK);
    TU_EXPECT(back.dtype == SYNCBN_BF16 && back.activation == SYNCBN_ACT_RELU, "get_config lost dtype/activation");
    syncbn_destroy(l);
    TU_EXPECT(good.dtype == SYNCBN_F32 && good.activation == SYNCBN_ACT_NONE, "defaults: F32, ACT_NONE");
    tu_verdict();
}
END_TEST

/* ---- reproducible mode: bitwise invariance for every combination ---- */

/* As test_reproducible.c: channel 0 cancels (+-1e16 pairs around 1000 N(0,1)), the
 * others are 1000 + N(0,1) scaled by powers of ten; z ~ 1.5 N(0,1) (of the order of
 * BN(x), so the ReLU cuts about half); dy ~ N(0,1). All rounded to the element type. */
static double repro_x(int step, int64_t i, int64_t c, int64_t s)
{
    const double zz = tu_normal(key(9, step, i, c, s));
    if (c == 0 && i % 3 == 1)
        return 1000 * zz;
    if (c == 0)
        return s == 0 ? (i % 3 ? -1e16 : 1e16) * (1 + 8 * tu_uniform((uint64_t)(i / 3))) : 1e-3 * zz;
    return pow(10.0, (double)(c % 7) - 3) * (1000 + zz);
}

typedef struct {
    int64_t B, C, S;
    syncbn_layout layout;
} shape;

typedef struct {
    char *y, *dx, *dz, *ye; /* [STEPS][n*C*S] (ye: the eval forward after them, [n*C*S]) */
    float *dw, *db;         /* [STEPS][C] */
    float *rm, *rv;         /* [C] after the last step */
} outputs;

enum { STEPS = 2 };

static void outputs_alloc(outputs *o, int64_t len, int64_t C, size_t es)
{
    o->y = zalloc(STEPS * len, es), o->dx = zalloc(STEPS * len, es), o->dz = zalloc(STEPS * len, es);
    o->ye = zalloc(len, es);
    o->dw = zalloc(STEPS * C, sizeof(float)), o->db = zalloc(STEPS * C, sizeof(float));
    o->rm = zalloc(C, sizeof(float)), o->rv = zalloc(C, sizeof(float));
}

static void outputs_free(outputs *o)
{
    free(o->y), free(o->dx), free(o->dz), free(o->ye), free(o->dw), free(o->db), free(o->rm), free(o->rv);
}

/* STEPS training steps and an eval forward on samples [lo, lo+n) over comm. */
static void repro_run(shape sh, syncbn_dtype t, int variant, MPI_Comm comm, int64_t lo, int64_t n, outputs *o)
{
    syncbn_config cfg = syncbn_config_default(sh.C);
    cfg.layout = sh.layout, cfg.reduction = SYNCBN_REPRODUCIBLE, cfg.dtype = t;
    cfg.activation = VARIANTS[variant].act;
    const int use_z = VARIANTS[variant].z, use_dz = VARIANTS[variant].dz;
    const size_t es = esize(t);
    syncbn_layer *l;
    int rc = syncbn_create(&cfg, comm, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create: %s", syncbn_strerror(rc));
    if (rc != SYNCBN_OK)
        return;
    for (int64_t c = 0; c < sh.C; c++)
        syncbn_weight(l)[c] = (float)(0.5 + tu_uniform((uint64_t)c)), syncbn_bias(l)[c] = (float)c / 8 - 0.25f;
    const int64_t len = n * sh.C * sh.S;
    char *x = zalloc(len, es), *z = zalloc(len, es), *dy = zalloc(len, es);
    for (int step = 0; step <= STEPS; step++) {
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < sh.C; c++)
                for (int64_t s = 0; s < sh.S; s++) {
                    const int64_t a = sh.layout == SYNCBN_NCHW ? (i * sh.C + c) * sh.S + s : (i * sh.S + s) * sh.C + c;
                    put(t, x, a, repro_x(step, lo + i, c, s));
                    put(t, z, a, 1.5 * tu_normal(key(10, step, lo + i, c, s)));
                    put(t, dy, a, tu_normal(key(11, step, lo + i, c, s)));
                }
        const void *xx = n ? x : NULL, *zz = use_z && n ? z : NULL;
        if (step == STEPS) {
            rc = syncbn_forward_ex(l, xx, zz, n, sh.S, 0, n ? o->ye : NULL);
            TU_EXPECT(rc == SYNCBN_OK, "eval forward_ex: %s", syncbn_strerror(rc));
            break;
        }
        rc = syncbn_forward_ex(l, xx, zz, n, sh.S, 1, n ? o->y + step * len * (int64_t)es : NULL);
        TU_EXPECT(rc == SYNCBN_OK, "forward_ex: %s", syncbn_strerror(rc));
        rc = syncbn_backward_ex(l, xx, n ? dy : NULL, n, sh.S, n ? o->dx + step * len * (int64_t)es : NULL,
                                use_dz && n ? o->dz + step * len * (int64_t)es : NULL, o->dw + step * sh.C,
                                o->db + step * sh.C);
        TU_EXPECT(rc == SYNCBN_OK, "backward_ex: %s", syncbn_strerror(rc));
    }
    memcpy(o->rm, syncbn_running_mean(l), sizeof(float) * (size_t)sh.C);
    memcpy(o->rv, syncbn_running_var(l), sizeof(float) * (size_t)sh.C);
    syncbn_destroy(l);
    free(x), free(z), free(dy);
}

static int same_slice(const outputs *whole, const outputs *part, shape sh, int64_t lo, int64_t n, size_t es, int dz)
{
    const int64_t per = sh.C * sh.S, len = n * per, all = sh.B * per;
    const size_t bytes = (size_t)len * es;
    int eq = 1;
    for (int step = 0; step < STEPS; step++) {
        const size_t mine = (size_t)(step * len) * es, theirs = (size_t)(step * all + lo * per) * es;
        eq &= memcmp(part->y + mine, whole->y + theirs, bytes) == 0;
        eq &= memcmp(part->dx + mine, whole->dx + theirs, bytes) == 0;
        if (dz)
            eq &= memcmp(part->dz + mine, whole->dz + theirs, bytes) == 0;
    }
    eq &= memcmp(part->ye, whole->ye + (size_t)(lo * per) * es, bytes) == 0;
    eq &= memcmp(part->dw, whole->dw, sizeof(float) * (size_t)(STEPS * sh.C)) == 0;
    eq &= memcmp(part->db, whole->db, sizeof(float) * (size_t)(STEPS * sh.C)) == 0;
    eq &= memcmp(part->rm, whole->rm, sizeof(float) * (size_t)sh.C) == 0;
    eq &= memcmp(part->rv, whole->rv, sizeof(float) * (size_t)sh.C) == 0;
    return eq;
}

/* For every dtype x variant: the 1-rank, 1-thread answer on MPI_COMM_SELF, then the
 * given splits over all ranks at 1 and 2 threads, compared byte for byte. */
static void repro_contract(shape sh, int nsplits)
{
    const int threads = omp_get_max_threads();
    for (int t = 0; t < 2; t++)
        for (int v = 0; v < NVARIANTS; v++) {
            const size_t es = esize((syncbn_dtype)t);
            outputs whole;
            outputs_alloc(&whole, sh.B * sh.C * sh.S, sh.C, es);
            omp_set_num_threads(1);
            repro_run(sh, (syncbn_dtype)t, v, MPI_COMM_SELF, 0, sh.B, &whole);
            for (int k = 0; k < nsplits; k++)
                for (int th = 1; th <= 2; th++) {
                    int64_t lo, n;
                    tu_split(k, sh.B, &lo, &n);
                    outputs part;
                    outputs_alloc(&part, n * sh.C * sh.S, sh.C, es);
                    omp_set_num_threads(th);
                    repro_run(sh, (syncbn_dtype)t, v, MPI_COMM_WORLD, lo, n, &part);
                    const int eq = same_slice(&whole, &part, sh, lo, n, es, VARIANTS[v].dz);
                    TU_EXPECT(eq, "reproducible result differs from 1 rank: B=%lld C=%lld S=%lld %s %s %s%s%s split %d "
                                  "threads %d",
                              (long long)sh.B, (long long)sh.C, (long long)sh.S, sh.layout ? "NHWC" : "NCHW",
                              t ? "bf16" : "f32", VARIANTS[v].act ? "relu" : "none", VARIANTS[v].z ? " +z" : "",
                              VARIANTS[v].dz ? " dz" : "", k, th);
                    outputs_free(&part);
                }
            outputs_free(&whole);
        }
    omp_set_num_threads(threads);
    tu_verdict();
}

START_TEST(repro_nchw_small) { repro_contract((shape){9, 5, 7, SYNCBN_NCHW}, 7); }
END_TEST
START_TEST(repro_nhwc_small) { repro_contract((shape){9, 5, 7, SYNCBN_NHWC}, 7); }
END_TEST
START_TEST(repro_nhwc_spatial_one) { repro_contract((shape){61, 19, 1, SYNCBN_NHWC}, 5); }
END_TEST
/* Big enough (> 2^15 elements) for the kernels to run on 2 threads. */
START_TEST(repro_nchw_threads) { repro_contract((shape){10, 12, 300, SYNCBN_NCHW}, 3); }
END_TEST
START_TEST(repro_nhwc_threads) { repro_contract((shape){10, 40, 100, SYNCBN_NHWC}, 3); }
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("fused");
    TCase *tr = tcase_create("reference");
    tcase_set_timeout(tr, 900);
    tcase_add_test(tr, bf16_reference_rounding);
    tcase_add_test(tr, reference_small);
    tcase_add_test(tr, reference_spatial_one);
    tcase_add_test(tr, reference_nhwc_tails);
    tcase_add_test(tr, reference_wide_rows);
    tcase_add_test(tr, reference_offset);
    tcase_add_test(tr, reference_no_affine_untracked);
    tcase_add_test(tr, reference_exact_zero_and_specials);
    tcase_add_test(tr, reference_two_threads);
    tcase_add_test(tr, backward_finite_differences);
    tcase_add_test(tr, fused_equals_bn_then_relu);
    tcase_add_test(tr, aliasing_and_element_alignment);
    suite_add_tcase(s, tr);
    TCase *te = tcase_create("errors");
    tcase_set_timeout(te, 300);
    tcase_add_test(te, errors_dz_without_z);
    tcase_add_test(te, errors_bf16_through_float_api);
    tcase_add_test(te, errors_enomem_on_mask_growth);
    tcase_add_test(te, errors_config);
    suite_add_tcase(s, te);
    TCase *tp = tcase_create("reproducible");
    tcase_set_timeout(tp, 900);
    tcase_add_test(tp, repro_nchw_small);
    tcase_add_test(tp, repro_nhwc_small);
    tcase_add_test(tp, repro_nhwc_spatial_one);
    tcase_add_test(tp, repro_nchw_threads);
    tcase_add_test(tp, repro_nhwc_threads);
    suite_add_tcase(s, tp);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, make_suite); }
