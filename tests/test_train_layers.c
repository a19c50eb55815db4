/*
 * test_train_layers.c - unit tests of the syncbn-train example: finite-difference
 * gradient checks of every layer (conv, maxpool, relu, fused relu+maxpool,
 * linear, softmax cross-entropy, the BN layer as the model uses it) and of the
 * whole model, plus SHA-256 test vectors, the data loader's error handling and
 * checkpoint corruption detection. Also: the example's ReLU (relu_forward /
 * relu_backward) and the library's fused one (SYNCBN_ACT_RELU) give the same bits,
 * exact zeros included, and the model trains to the same bits fused and unfused.
 *
 * Single process (BN over MPI_COMM_SELF); multi-rank behaviour is tested by
 * tests/test_train_invariance.sh. Gradient checks use L = sum(r * y) with fixed
 * random r and central differences; the error is measured relative to the largest
 * analytic gradient of the tensor, so a missing term or a wrong sign fails by O(1).
 */
#include <check.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train_data.h"
#include "train_layers.h"
#include "train_model.h"
#include "train_util.h"

static uint64_t rng_state = 1;
static float frand(void) { // uniform in [-1, 1)
    train_rng r = {rng_state};
    uint64_t u = train_rng_u64(&r);
    rng_state = r.s;
    return (float)((double)(u >> 11) * 0x1p-52 - 1.0);
}
static void fill(float *v, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) v[i] = scale * frand();
}
static double dot(const float *a, const float *b, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

// A scalar function of a float tensor, evaluated after the tensor was perturbed.
typedef double (*loss_fn)(void *ctx);

// Central differences of f w.r.t. every element of p (or every step-th one), against
// the analytic gradient g. Returns max |fd - g| / max |g|.
static double fd_check(const char *name, loss_fn f, void *ctx, float *p, const float *g, int64_t n, int64_t step,
                       float h) {
    double maxerr = 0.0, maxg = 0.0;
    for (int64_t i = 0; i < n; i++) maxg = fmax(maxg, fabs(g[i]));
    for (int64_t i = 0; i < n; i += step) {
        float keep = p[i];
        p[i] = keep + h;
        double lp = f(ctx);
        p[i] = keep - h;
        double lm = f(ctx);
        p[i] = keep;
        double fd = (lp - lm) / (2.0 * (double)h);
        maxerr = fmax(maxerr, fabs(fd - g[i]));
    }
    double rel = maxerr / (maxg > 0 ? maxg : 1.0);
    printf("  %-28s max|g| %.3e  max err %.3e  rel %.2e\n", name, maxg, maxerr, rel);
    return rel;
}

// ---------------------------------------------------------------------------- conv

typedef struct { int C, O, H, W; float *x, *w, *y, *col, *r; } conv_ctx;
static double conv_loss(void *p) {
    conv_ctx *c = p;
    conv3x3_forward(c->y, c->col, c->x, c->w, c->C, c->O, c->H, c->W);
    return dot(c->y, c->r, (int64_t)c->O * c->H * c->W);
}

START_TEST(grad_conv) {
    conv_ctx c = {.C = 3, .O = 4, .H = 6, .W = 8};
    int64_t nx = c.C * c.H * c.W, nw = c.O * c.C * 9, ny = c.O * c.H * c.W;
    c.x = train_malloc(4 * nx); c.w = train_malloc(4 * nw); c.y = train_malloc(4 * ny);
    c.col = train_malloc(4 * nw / c.O * c.H * c.W); c.r = train_malloc(4 * ny);
    float *dw = train_malloc(4 * nw), *dx = train_malloc(4 * nx), *dcol = train_malloc(4 * nw / c.O * c.H * c.W);
    fill(c.x, nx, 1); fill(c.w, nw, 0.5f); fill(c.r, ny, 1);
    conv_loss(&c);
    fill(dw, nw, 1); // beta = 0 must overwrite garbage
    conv3x3_backward(dw, dx, dcol, c.r, c.col, c.w, 0.0f, c.C, c.O, c.H, c.W);
    ck_assert_double_lt(fd_check("conv3x3 dw", conv_loss, &c, c.w, dw, nw, 1, 1e-2f), 1e-3);
    ck_assert_double_lt(fd_check("conv3x3 dx", conv_loss, &c, c.x, dx, nx, 1, 1e-2f), 1e-3);
    // beta = 1 accumulates: twice the same sample gives twice the gradient
    conv_loss(&c); // restore col after the perturbations
    float *dw2 = train_malloc(4 * nw);
    conv3x3_backward(dw2, NULL, NULL, c.r, c.col, c.w, 0.0f, c.C, c.O, c.H, c.W);
    conv3x3_backward(dw2, NULL, NULL, c.r, c.col, c.w, 1.0f, c.C, c.O, c.H, c.W);
    for (int64_t i = 0; i < nw; i++) ck_assert_float_eq(dw2[i], 2.0f * dw[i]);
    free(c.x); free(c.w); free(c.y); free(c.col); free(c.r); free(dw); free(dx); free(dcol); free(dw2);
}
END_TEST

// ---------------------------------------------------------------------------- pooling and relu

typedef struct { int C, H, W, mode; float *x, *y, *r; uint8_t *arg; } pool_ctx; // mode 0 pool, 1 relu+pool, 2 relu
static double pool_loss(void *p) {
    pool_ctx *c = p;
    int64_t n = (int64_t)c->C * c->H * c->W;
    if (c->mode == 2) {
        relu_forward(c->y, c->x, n);
        return dot(c->y, c->r, n);
    }
    if (c->mode == 0) maxpool2_forward(c->y, c->arg, c->x, c->C, c->H, c->W);
    else relu_maxpool2_forward(c->y, c->arg, c->x, c->C, c->H, c->W);
    return dot(c->y, c->r, n / 4);
}

static void pool_test(int mode, const char *name) {
    pool_ctx c = {.C = 3, .H = 8, .W = 6, .mode = mode};
    int64_t n = (int64_t)c.C * c.H * c.W;
    c.x = train_malloc(4 * n); c.y = train_malloc(4 * n); c.r = train_malloc(4 * n); c.arg = train_malloc(n);
    float *dx = train_malloc(4 * n);
    // distinct values at least 0.01 apart, so that a step of 1e-3 crosses no kink
    for (int64_t i = 0; i < n; i++) c.x[i] = 0.01f * (float)((i * 37) % n) - 0.005f * (float)n + 0.005f;
    fill(c.r, n, 1);
    pool_loss(&c);
    fill(dx, n, 1); // must be overwritten
    if (mode == 0) maxpool2_backward(dx, c.r, c.arg, c.C, c.H, c.W);
    else if (mode == 1) relu_maxpool2_backward(dx, c.r, c.y, c.arg, c.C, c.H, c.W);
    else relu_backward(dx, c.r, c.y, n);
    ck_assert_double_lt(fd_check(name, pool_loss, &c, c.x, dx, n, 1, 1e-3f), 1e-3);
    free(c.x); free(c.y); free(c.r); free(c.arg); free(dx);
}
START_TEST(grad_maxpool) { pool_test(0, "maxpool2 dx"); }
END_TEST
START_TEST(grad_relu_maxpool) { pool_test(1, "relu+maxpool2 dx"); }
END_TEST
START_TEST(grad_relu) { pool_test(2, "relu dx"); }
END_TEST

START_TEST(relu_maxpool_is_composition) {
    int C = 2, H = 4, W = 4;
    float x[32], r[32], y1[8], y2[8];
    uint8_t a1[8], a2[8];
    for (int i = 0; i < 32; i++) x[i] = (float)((i * 7) % 11) - 5.0f; // ties and all-negative windows
    relu_forward(r, x, 32);
    maxpool2_forward(y1, a1, r, C, H, W);
    relu_maxpool2_forward(y2, a2, x, C, H, W);
    for (int i = 0; i < 8; i++) ck_assert_float_eq(y1[i], y2[i]);
}
END_TEST

// ---------------------------------------------------------------------------- linear, softmax-CE

typedef struct { int IN, OUT, n; float *x, *w, *b, *y, *r; int batched; } lin_ctx;
static double lin_loss(void *p) {
    lin_ctx *c = p;
    if (c->batched) linear_forward_batched(c->y, c->x, c->w, c->b, c->n, c->IN, c->OUT);
    else for (int s = 0; s < c->n; s++) linear_forward(c->y + s * c->OUT, c->x + s * c->IN, c->w, c->b, c->IN, c->OUT);
    return dot(c->y, c->r, (int64_t)c->n * c->OUT);
}

static void lin_test(int batched) {
    lin_ctx c = {.IN = 20, .OUT = 7, .n = 3, .batched = batched};
    c.x = train_malloc(4 * c.n * c.IN); c.w = train_malloc(4 * c.IN * c.OUT); c.b = train_malloc(4 * c.OUT);
    c.y = train_malloc(4 * c.n * c.OUT); c.r = train_malloc(4 * c.n * c.OUT);
    float *dx = train_malloc(4 * c.n * c.IN), *dw = train_malloc(4 * c.IN * c.OUT), *db = train_malloc(4 * c.OUT);
    fill(c.x, c.n * c.IN, 1); fill(c.w, c.IN * c.OUT, 0.3f); fill(c.b, c.OUT, 1); fill(c.r, c.n * c.OUT, 1);
    if (batched) {
        linear_backward_batched(dx, dw, db, c.r, c.x, c.w, c.n, c.IN, c.OUT); // accumulates into zeros
    } else {
        for (int s = 0; s < c.n; s++)
            linear_backward(dx + s * c.IN, dw, db, c.r + s * c.OUT, c.x + s * c.IN, c.w, s ? 1.0f : 0.0f, c.IN, c.OUT);
    }
    ck_assert_double_lt(fd_check(batched ? "linear(batched) dw" : "linear dw", lin_loss, &c, c.w, dw, c.IN * c.OUT, 1, 1e-2f), 1e-3);
    ck_assert_double_lt(fd_check(batched ? "linear(batched) db" : "linear db", lin_loss, &c, c.b, db, c.OUT, 1, 1e-2f), 1e-3);
    ck_assert_double_lt(fd_check(batched ? "linear(batched) dx" : "linear dx", lin_loss, &c, c.x, dx, c.n * c.IN, 1, 1e-2f), 1e-3);
    free(c.x); free(c.w); free(c.b); free(c.y); free(c.r); free(dx); free(dw); free(db);
}
START_TEST(grad_linear) { lin_test(0); }
END_TEST
START_TEST(grad_linear_batched) { lin_test(1); }
END_TEST

typedef struct { float logits[10], probs[10]; int label; } ce_ctx;
static double ce_loss(void *p) {
    ce_ctx *c = p;
    return softmax_ce_forward(c->probs, c->logits, c->label, 10);
}
START_TEST(grad_softmax_ce) {
    ce_ctx c = {.label = 3};
    fill(c.logits, 10, 3);
    double l = ce_loss(&c);
    float d[10];
    softmax_ce_backward(d, c.probs, c.label, 1.0, 10);
    ck_assert_double_lt(fd_check("softmax-CE dlogits", ce_loss, &c, c.logits, d, 10, 1, 1e-2f), 1e-3);
    l = ce_loss(&c);
    // the loss itself: -log p_label, and large logits must not overflow
    ck_assert_double_lt(fabs(l + log((double)c.probs[3])), 1e-6);
    c.logits[0] = 1e30f;
    ck_assert(isfinite(ce_loss(&c)));
}
END_TEST

// ---------------------------------------------------------------------------- BN (the library, as the model uses it)

typedef struct { syncbn_layer *bn; float *x, *y, *r; int64_t n, C, S; } bn_ctx;
static double bn_loss(void *p) {
    bn_ctx *c = p;
    ck_assert_int_eq(syncbn_forward(c->bn, c->x, c->n, c->S, 1, c->y), SYNCBN_OK);
    return dot(c->y, c->r, c->n * c->C * c->S);
}
START_TEST(grad_bn) {
    bn_ctx c = {.n = 4, .C = 3, .S = 10};
    syncbn_config cfg = syncbn_config_default(c.C);
    cfg.reduction = SYNCBN_REPRODUCIBLE;
    ck_assert_int_eq(syncbn_create(&cfg, MPI_COMM_SELF, &c.bn), SYNCBN_OK);
    int64_t N = c.n * c.C * c.S;
    c.x = train_malloc(4 * N); c.y = train_malloc(4 * N); c.r = train_malloc(4 * N);
    float *dx = train_malloc(4 * N), dw[3], db[3];
    fill(c.x, N, 2); fill(c.r, N, 1);
    fill(syncbn_weight(c.bn), c.C, 1); fill(syncbn_bias(c.bn), c.C, 1);
    bn_loss(&c);
    ck_assert_int_eq(syncbn_backward(c.bn, c.x, c.r, c.n, c.S, dx, dw, db), SYNCBN_OK);
    ck_assert_double_lt(fd_check("syncbn dx", bn_loss, &c, c.x, dx, N, 1, 1e-3f), 1e-2);
    ck_assert_double_lt(fd_check("syncbn dweight", bn_loss, &c, syncbn_weight(c.bn), dw, c.C, 1, 1e-3f), 1e-2);
    ck_assert_double_lt(fd_check("syncbn dbias", bn_loss, &c, syncbn_bias(c.bn), db, c.C, 1, 1e-3f), 1e-2);
    syncbn_destroy(c.bn);
    free(c.x); free(c.y); free(c.r); free(dx);
}
END_TEST

// The library's fused ReLU (SYNCBN_ACT_RELU) against a plain BN layer followed by the
// example's relu_forward / relu_backward: bitwise equal outputs and gradients. Channel 0
// has weight 0 and bias 0, so every pre-activation there is exactly +0 (the kink: no
// gradient may pass), channel 1 weight 0 and bias -0.25 (all negative).
static void relu_convention(syncbn_reduction red) {
    const int64_t n = 3, C = 4, S = 12, N = n * C * S;
    syncbn_config cfg = syncbn_config_default(C);
    cfg.reduction = red;
    syncbn_layer *plain, *fused;
    ck_assert_int_eq(syncbn_create(&cfg, MPI_COMM_SELF, &plain), SYNCBN_OK);
    cfg.activation = SYNCBN_ACT_RELU;
    ck_assert_int_eq(syncbn_create(&cfg, MPI_COMM_SELF, &fused), SYNCBN_OK);
    float *x = train_malloc(4 * N), *dy = train_malloc(4 * N), *y1 = train_malloc(4 * N), *y2 = train_malloc(4 * N);
    float *g = train_malloc(4 * N), *dx1 = train_malloc(4 * N), *dx2 = train_malloc(4 * N);
    float dw1[4], db1[4], dw2[4], db2[4];
    fill(x, N, 2); fill(dy, N, 1);
    const float w[4] = {0.0f, 0.0f, 1.5f, -0.75f}, b[4] = {0.0f, -0.25f, 0.125f, 0.5f};
    for (int c = 0; c < C; c++) {
        syncbn_weight(plain)[c] = syncbn_weight(fused)[c] = w[c];
        syncbn_bias(plain)[c] = syncbn_bias(fused)[c] = b[c];
    }
    for (int training = 1; training >= 0; training--) {
        ck_assert_int_eq(syncbn_forward(plain, x, n, S, training, y1), SYNCBN_OK);
        relu_forward(y1, y1, N);
        ck_assert_int_eq(syncbn_forward_ex(fused, x, NULL, n, S, training, y2), SYNCBN_OK);
        ck_assert_mem_eq(y1, y2, 4 * N);
        if (!training) break;
        int64_t zeros = 0;
        for (int64_t i = 0; i < N; i++) zeros += y1[i] == 0.0f;
        ck_assert_int_ge(zeros, 2 * n * S); // channels 0 and 1 at least
        relu_backward(g, dy, y1, N);
        ck_assert_int_eq(syncbn_backward(plain, x, g, n, S, dx1, dw1, db1), SYNCBN_OK);
        ck_assert_int_eq(syncbn_backward_ex(fused, x, dy, n, S, dx2, NULL, dw2, db2), SYNCBN_OK);
        ck_assert_mem_eq(dx1, dx2, 4 * N);
        ck_assert_mem_eq(dw1, dw2, sizeof dw1);
        ck_assert_mem_eq(db1, db2, sizeof db1);
        ck_assert(dw2[0] == 0.0f && db2[0] == 0.0f); // nothing passed the kink
    }
    syncbn_destroy(plain);
    syncbn_destroy(fused);
    free(x); free(dy); free(y1); free(y2); free(g); free(dx1); free(dx2);
}
START_TEST(relu_convention_matches_library) {
    relu_convention(SYNCBN_FAST);
    relu_convention(SYNCBN_REPRODUCIBLE);
}
END_TEST

// ---------------------------------------------------------------------------- the whole model

typedef struct { train_model *m; float *x; uint8_t *labels; int64_t n; } model_ctx;
static double model_loss(void *p) {
    model_ctx *c = p;
    return train_model_step(c->m, c->x, c->labels, c->n, c->n);
}
static void model_test(int reduction) {
    train_model m;
    train_model_init(&m, 7, TRAIN_BN_SYNC, reduction, 8, MPI_COMM_SELF);
    model_ctx c = {.m = &m, .n = 8};
    c.x = train_malloc(4 * c.n * 784);
    c.labels = train_malloc(c.n);
    fill(c.x, c.n * 784, 1.5f);
    for (int s = 0; s < c.n; s++) c.labels[s] = (uint8_t)(s * 3 % 10);
    model_loss(&c);
    float *g = train_malloc(4 * m.nparams);
    memcpy(g, m.grads, 4 * m.nparams);
    struct { const char *name; float *p; int64_t off, n, step; } t[] = {
        {"model conv1 w", m.conv1_w, m.conv1_w - m.params, 16 * 9, 7},
        {"model bn1 w", m.bn1_w, m.bn1_w - m.params, 16, 3},
        {"model bn1 b", m.bn1_b, m.bn1_b - m.params, 16, 3},
        {"model conv2 w", m.conv2_w, m.conv2_w - m.params, 32 * 16 * 9, 97},
        {"model bn2 w", m.bn2_w, m.bn2_w - m.params, 32, 5},
        {"model bn2 b", m.bn2_b, m.bn2_b - m.params, 32, 5},
        {"model fc w", m.fc_w, m.fc_w - m.params, 15680, 331},
        {"model fc b", m.fc_b, m.fc_b - m.params, 10, 1},
    };
    for (size_t k = 0; k < sizeof t / sizeof t[0]; k++)
        ck_assert_double_lt(fd_check(t[k].name, model_loss, &c, t[k].p, g + t[k].off, t[k].n, t[k].step, 2e-4f), 5e-2);
    free(g); free(c.x); free(c.labels);
    train_model_free(&m);
}
START_TEST(grad_model_reproducible) { model_test(TRAIN_REPRODUCIBLE); }
END_TEST
START_TEST(grad_model_fast) { model_test(TRAIN_FAST); }
END_TEST

// The two reduction modes compute the same loss and gradients up to rounding
// (bitwise invariance across ranks needs several ranks: test_train_invariance.sh).
START_TEST(fast_matches_reproducible) {
    train_model a, b;
    train_model_init(&a, 3, TRAIN_BN_SYNC, TRAIN_REPRODUCIBLE, 16, MPI_COMM_SELF);
    train_model_init(&b, 3, TRAIN_BN_SYNC, TRAIN_FAST, 16, MPI_COMM_SELF);
    float *x = train_malloc(4 * 16 * 784);
    uint8_t labels[16];
    fill(x, 16 * 784, 1.0f);
    for (int s = 0; s < 16; s++) labels[s] = (uint8_t)(s % 10);
    double la = train_model_step(&a, x, labels, 16, 16), lb = train_model_step(&b, x, labels, 16, 16);
    ck_assert_double_lt(fabs(la - lb), 1e-5 * fabs(la));
    double maxd = 0, maxg = 0;
    for (int64_t i = 0; i < a.nparams; i++) {
        maxd = fmax(maxd, fabs((double)a.grads[i] - b.grads[i]));
        maxg = fmax(maxg, fabs(a.grads[i]));
    }
    printf("  fast vs reproducible: max|g| %.3e max diff %.3e\n", maxg, maxd);
    ck_assert_double_lt(maxd, 1e-4 * maxg);
    free(x);
    train_model_free(&a);
    train_model_free(&b);
}
END_TEST

// The model with the ReLUs fused into its BN layers and unfused (--unfused) trains to
// the same bits: losses, gradients and parameters after every step, and the eval
// logits. Some BN channels are held at weight 0 (their pre-activations are exactly
// bias: 0, the kink, or negative), so ties at 0 in the pooling and the mask's
// treatment of exact zeros are exercised, not only the generic case.
static void fused_vs_unfused(int reduction) {
    train_model m[2];
    for (int k = 0; k < 2; k++) {
        train_bn_fused = k == 0;
        train_model_init(&m[k], 21, TRAIN_BN_SYNC, reduction, 12, MPI_COMM_SELF);
        m[k].bn1_w[0] = 0.0f, m[k].bn1_b[0] = 0.0f;
        m[k].bn1_w[1] = 0.0f, m[k].bn1_b[1] = -0.5f;
        m[k].bn2_w[3] = 0.0f, m[k].bn2_b[3] = 0.0f;
    }
    train_bn_fused = 1;
    ck_assert(m[0].fused && !m[1].fused);
    float *x = train_malloc(4 * 12 * 784);
    uint8_t labels[12];
    for (int step = 0; step < 3; step++) {
        fill(x, 12 * 784, 1.0f);
        for (int s = 0; s < 12; s++) labels[s] = (uint8_t)((s + step) % 10);
        double l0 = train_model_step(&m[0], x, labels, 12, 12), l1 = train_model_step(&m[1], x, labels, 12, 12);
        ck_assert(memcmp(&l0, &l1, sizeof l0) == 0);
        ck_assert_mem_eq(m[0].grads, m[1].grads, 4 * m[0].nparams);
        ck_assert_float_eq(m[0].grads[m[0].bn1_w - m[0].params], 0.0f); // channel 0 sits at the kink
        for (int k = 0; k < 2; k++) train_model_sgd(&m[k], 0.05f, 0.9f, 0.0f);
        ck_assert_mem_eq(m[0].params, m[1].params, 4 * m[0].nparams);
    }
    int64_t c0 = train_model_correct(&m[0], x, labels, 12), c1 = train_model_correct(&m[1], x, labels, 12);
    ck_assert_int_eq(c0, c1);
    ck_assert_mem_eq(m[0].logits, m[1].logits, 4 * 12 * FC_OUT);
    char h0[65], h1[65];
    train_model_hash(&m[0], h0);
    train_model_hash(&m[1], h1);
    ck_assert_str_eq(h0, h1);
    free(x);
    train_model_free(&m[0]);
    train_model_free(&m[1]);
}
START_TEST(fused_matches_unfused) {
    fused_vs_unfused(TRAIN_REPRODUCIBLE);
    fused_vs_unfused(TRAIN_FAST);
}
END_TEST

// ---------------------------------------------------------------------------- exact deposits

// train_deposit_samples (blocked int64 fixed point + fallback) must give exactly the
// accumulator contents that one sbx_add per value gives, for any mix of values.
START_TEST(deposit_matches_sbx_add) {
    const sbx_format f = SBX_LINEAR;
    const int64_t W = sbx_words(f), n = 300, len = 300; // n > 256: two chunks; len > 256: two blocks
    float *v = train_malloc(4 * n * len);
    for (int64_t i = 0; i < n * len; i++) {
        float x = frand();
        int kind = (int)((i * 2654435761u) % 100);
        if (kind < 60) v[i] = x * 1e-3f;                               // typical gradients
        else if (kind < 75) v[i] = ldexpf(x, -(int)(i % 120));        // tiny, down to 2^-120
        else if (kind < 85) v[i] = 0.0f;
        else if (kind < 90) v[i] = ldexpf(x, 100);                    // huge
        else if (kind < 95) v[i] = ldexpf(1.0f, -149) * (float)(i % 7); // denormals
        else v[i] = -v[i > 0 ? i - 1 : 0];                            // cancellations
    }
    v[5] = INFINITY; // column 5 gets +Inf, column 6 NaN, column 7 both infinities
    v[len + 6] = NAN;
    v[7] = INFINITY;
    v[2 * len + 7] = -INFINITY;
    int64_t *a = train_malloc(8 * W * len), *b = train_malloc(8 * W * len);
    for (int64_t i = 0; i < len; i++) { sbx_zero(a + i * W, f); sbx_zero(b + i * W, f); }
    train_deposit_samples(a, f, v, len, n, len);
    for (int64_t s = 0; s < n; s++)
        for (int64_t i = 0; i < len; i++) sbx_add(b + i * W, f, (double)v[s * len + i]);
    int64_t diffs = 0;
    for (int64_t i = 0; i < len; i++) {
        sbx_normalize(a + i * W, f);
        sbx_normalize(b + i * W, f);
        diffs += memcmp(a + i * W, b + i * W, 8 * W) != 0;
        double ra = sbx_round(a + i * W, f), rb = sbx_round(b + i * W, f);
        ck_assert(memcmp(&ra, &rb, sizeof ra) == 0 || (isnan(ra) && isnan(rb)));
    }
    ck_assert_int_eq(diffs, 0);
    ck_assert(isinf(sbx_round(a + 5 * W, f)) && sbx_round(a + 5 * W, f) > 0);
    ck_assert(isnan(sbx_round(a + 6 * W, f)));
    ck_assert(isnan(sbx_round(a + 7 * W, f)));
    free(v); free(a); free(b);
}
END_TEST

// The model's reproducible fc-bias gradient is the exactly rounded sum of the
// per-sample dlogits (checked against sbx_add directly).
START_TEST(model_gradient_is_exact_sum) {
    train_model m;
    train_model_init(&m, 5, TRAIN_BN_SYNC, TRAIN_REPRODUCIBLE, 16, MPI_COMM_SELF);
    float *x = train_malloc(4 * 16 * 784);
    uint8_t labels[16];
    fill(x, 16 * 784, 1.0f);
    for (int s = 0; s < 16; s++) labels[s] = (uint8_t)(s % 10);
    train_model_step(&m, x, labels, 16, 16);
    const sbx_format f = SBX_LINEAR;
    int64_t acc[32];
    for (int o = 0; o < 10; o++) {
        sbx_zero(acc, f);
        for (int s = 0; s < 16; s++) sbx_add(acc, f, m.dlogits[s * 10 + o]);
        ck_assert_float_eq((float)sbx_round(acc, f), m.grads[(m.fc_b - m.params) + o]);
    }
    free(x);
    train_model_free(&m);
}
END_TEST

// ---------------------------------------------------------------------------- sha256, data, checkpoints

START_TEST(sha256_vectors) {
    const struct { const char *msg, *hex; } v[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    for (size_t i = 0; i < 3; i++) {
        train_sha256 c;
        uint8_t d[32];
        char hex[65];
        train_sha256_init(&c);
        train_sha256_update(&c, v[i].msg, strlen(v[i].msg));
        train_sha256_final(&c, d);
        train_sha256_hex(d, hex);
        ck_assert_str_eq(hex, v[i].hex);
    }
    // a million 'a's, fed in uneven pieces
    train_sha256 c;
    uint8_t d[32];
    char hex[65], buf[1000];
    memset(buf, 'a', sizeof buf);
    train_sha256_init(&c);
    for (int64_t left = 1000000, k = 1; left > 0; k = k % 997 + 1) {
        int64_t take = k < left ? k : left;
        train_sha256_update(&c, buf, (size_t)take);
        left -= take;
    }
    train_sha256_final(&c, d);
    train_sha256_hex(d, hex);
    ck_assert_str_eq(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}
END_TEST

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

START_TEST(data_errors) {
    train_dataset ds;
    char err[8192];
    ck_assert_int_ne(train_dataset_load(&ds, "/nonexistent-dir", "train", err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, TRAIN_DATA_PACKAGE));
    char dir[] = "/tmp/syncbn-train-test-XXXXXX", path[256];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    // not gzip at all but a wrong magic; then a truncated payload; then a count mismatch
    snprintf(path, sizeof path, "%s/t10k-images-idx3-ubyte.gz", dir);
    write_file(path, "garbage!", 8);
    ck_assert_int_ne(train_dataset_load(&ds, dir, "t10k", err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "magic"));
    ck_assert_ptr_nonnull(strstr(err, TRAIN_DATA_PACKAGE));
    uint8_t hdr[16 + 100] = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28};
    write_file(path, hdr, sizeof hdr); // 2 images promised, 100 bytes given (plain IDX is read by zlib too)
    ck_assert_int_ne(train_dataset_load(&ds, dir, "t10k", err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "truncated"));
    uint8_t ok[16 + 2 * 784] = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28};
    write_file(path, ok, sizeof ok);
    char lpath[256];
    snprintf(lpath, sizeof lpath, "%s/t10k-labels-idx1-ubyte.gz", dir);
    uint8_t lab[8 + 3] = {0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3};
    write_file(lpath, lab, sizeof lab);
    ck_assert_int_ne(train_dataset_load(&ds, dir, "t10k", err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "labels"));
    uint8_t lab2[8 + 2] = {0, 0, 8, 1, 0, 0, 0, 2, 1, 12};
    write_file(lpath, lab2, sizeof lab2);
    ck_assert_int_ne(train_dataset_load(&ds, dir, "t10k", err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "out of range"));
    lab2[9] = 9;
    write_file(lpath, lab2, sizeof lab2);
    ck_assert_int_eq(train_dataset_load(&ds, dir, "t10k", err, sizeof err), 0);
    ck_assert_int_eq(ds.n, 2);
    train_dataset_free(&ds);
    unlink(path);
    unlink(lpath);
    rmdir(dir);
}
END_TEST

START_TEST(checkpoint_roundtrip_and_corruption) {
    train_model a, b;
    train_model_init(&a, 11, TRAIN_BN_SYNC, TRAIN_REPRODUCIBLE, 4, MPI_COMM_SELF);
    train_model_init(&b, 12, TRAIN_BN_SYNC, TRAIN_REPRODUCIBLE, 4, MPI_COMM_SELF);
    fill(a.momentum, a.nparams, 1);
    fill(syncbn_running_mean(a.bn2), 32, 1);
    char path[] = "/tmp/syncbn-train-ckpt-XXXXXX", err[8192];
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(train_model_save(&a, path, 123, 5, 64, err, sizeof err), 0);
    int64_t step = 0;
    ck_assert_int_ne(train_model_load(&b, path, &step, 5, 65, err, sizeof err), 0); // other batch size
    ck_assert_int_eq(train_model_load(&b, path, &step, 5, 64, err, sizeof err), 0);
    ck_assert_int_eq(step, 123);
    char ha[65], hb[65];
    train_model_hash(&a, ha);
    train_model_hash(&b, hb);
    ck_assert_str_eq(ha, hb);
    ck_assert_mem_eq(a.momentum, b.momentum, 4 * a.nparams);
    // flip one byte in the middle: the CRC must catch it; truncate: the size must
    FILE *f = fopen(path, "r+b");
    fseek(f, 5000, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, 5000, SEEK_SET);
    fputc(ch ^ 0x10, f);
    fclose(f);
    ck_assert_int_ne(train_model_load(&b, path, &step, 5, 64, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "CRC"));
    ck_assert_int_eq(truncate(path, 100), 0);
    ck_assert_int_ne(train_model_load(&b, path, &step, 5, 64, err, sizeof err), 0);
    unlink(path);
    train_model_free(&a);
    train_model_free(&b);
}
END_TEST

static Suite *make_suite(void) {
    Suite *s = suite_create("train");
    TCase *g = tcase_create("gradients");
    tcase_set_timeout(g, 120);
    tcase_add_test(g, grad_conv);
    tcase_add_test(g, grad_maxpool);
    tcase_add_test(g, grad_relu_maxpool);
    tcase_add_test(g, grad_relu);
    tcase_add_test(g, relu_maxpool_is_composition);
    tcase_add_test(g, grad_linear);
    tcase_add_test(g, grad_linear_batched);
    tcase_add_test(g, grad_softmax_ce);
    tcase_add_test(g, grad_bn);
    tcase_add_test(g, relu_convention_matches_library);
    tcase_add_test(g, grad_model_reproducible);
    tcase_add_test(g, grad_model_fast);
    tcase_add_test(g, fast_matches_reproducible);
    tcase_add_test(g, fused_matches_unfused);
    tcase_add_test(g, deposit_matches_sbx_add);
    tcase_add_test(g, model_gradient_is_exact_sum);
    suite_add_tcase(s, g);
    TCase *u = tcase_create("util");
    tcase_add_test(u, sha256_vectors);
    tcase_add_test(u, data_errors);
    tcase_add_test(u, checkpoint_roundtrip_and_corruption);
    suite_add_tcase(s, u);
    return s;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    SRunner *sr = srunner_create(make_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    MPI_Finalize();
    return failed ? 1 : 0;
}
