/*
 * train_model.c - see train_model.h.
 */
#include "train_model.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "train_layers.h"
#include "train_util.h"

#define CHECK_SBN(call)                                                               \
    do {                                                                              \
        int rc_ = (call);                                                             \
        if (rc_ != SYNCBN_OK) train_die("%s failed: %s", #call, syncbn_strerror(rc_)); \
    } while (0)

double train_bn_timeout = 0;
int train_bn_fused = 1;

// Parameter layout (offsets into params/grads), in the order of the model.
enum {
    OFF_CONV1 = 0,
    OFF_BN1W = OFF_CONV1 + C1 * 9,
    OFF_BN1B = OFF_BN1W + C1,
    OFF_CONV2 = OFF_BN1B + C1,
    OFF_BN2W = OFF_CONV2 + C2 * C1 * 9,
    OFF_BN2B = OFF_BN2W + C2,
    OFF_FCW = OFF_BN2B + C2,
    OFF_FCB = OFF_FCW + FC_OUT * FC_IN,
    NPARAMS = OFF_FCB + FC_OUT
};
// Layout of one sample's row of dw_all.
enum { DW_CONV1 = 0, DW_CONV2 = DW_CONV1 + C1 * 9, DW_FC = DW_CONV2 + C2 * C1 * 9 };
_Static_assert(OFF_FCB == OFF_FCW + FC_OUT * FC_IN, "fc bias follows fc weight");
_Static_assert(DW_FC + FC_OUT * FC_IN + FC_OUT == NG, "dw_all row layout");

static float *falloc(int64_t n) { return train_malloc(sizeof(float) * (size_t)n); }

static void init_uniform(float *w, int64_t n, double bound, train_rng *rng) {
    for (int64_t i = 0; i < n; i++) w[i] = (float)((2.0 * train_rng_uniform(rng) - 1.0) * bound);
}

void train_model_init(train_model *m, uint64_t seed, int bn_mode, int reduction, int64_t cap, MPI_Comm comm) {
    memset(m, 0, sizeof *m);
    m->bn_mode = bn_mode;
    m->reduction = reduction;
    m->fused = train_bn_fused != 0;
    m->comm = comm;
    m->nparams = NPARAMS;
    m->params = falloc(NPARAMS);
    m->grads = falloc(NPARAMS);
    m->momentum = falloc(NPARAMS);
    m->conv1_w = m->params + OFF_CONV1;
    m->bn1_w = m->params + OFF_BN1W;
    m->bn1_b = m->params + OFF_BN1B;
    m->conv2_w = m->params + OFF_CONV2;
    m->bn2_w = m->params + OFF_BN2W;
    m->bn2_b = m->params + OFF_BN2B;
    m->fc_w = m->params + OFF_FCW;
    m->fc_b = m->params + OFF_FCB;

    // PyTorch's defaults: kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    // for weights, the same bound for the linear bias; BN weight 1, bias 0.
    train_rng rng;
    train_rng_seed(&rng, seed, 1);
    init_uniform(m->conv1_w, C1 * 9, 1.0 / sqrt(9.0), &rng);
    init_uniform(m->conv2_w, C2 * C1 * 9, 1.0 / sqrt(C1 * 9.0), &rng);
    init_uniform(m->fc_w, FC_OUT * FC_IN, 1.0 / sqrt((double)FC_IN), &rng);
    init_uniform(m->fc_b, FC_OUT, 1.0 / sqrt((double)FC_IN), &rng);
    for (int c = 0; c < C1; c++) m->bn1_w[c] = 1.0f;
    for (int c = 0; c < C2; c++) m->bn2_w[c] = 1.0f;

    // local BN = a private BN per rank: the same library over MPI_COMM_SELF
    MPI_Comm bncomm = bn_mode == TRAIN_BN_SYNC ? comm : MPI_COMM_SELF;
    syncbn_config cfg = syncbn_config_default(C1);
    cfg.reduction = reduction == TRAIN_REPRODUCIBLE ? SYNCBN_REPRODUCIBLE : SYNCBN_FAST;
    cfg.timeout = bn_mode == TRAIN_BN_SYNC ? train_bn_timeout : 0; // nobody to wait for on MPI_COMM_SELF
    cfg.activation = m->fused ? SYNCBN_ACT_RELU : SYNCBN_ACT_NONE;
    CHECK_SBN(syncbn_create(&cfg, bncomm, &m->bn1));
    cfg.channels = C2;
    CHECK_SBN(syncbn_create(&cfg, bncomm, &m->bn2));

    m->cap = cap;
    m->x = falloc(cap * HW1);
    m->col1 = falloc(cap * 9 * HW1);
    m->c1 = falloc(cap * C1 * HW1);
    m->b1 = falloc(cap * C1 * HW1);
    m->p1 = falloc(cap * C1 * HW2);
    m->arg1 = train_malloc((size_t)(cap * C1 * HW2));
    m->col2 = falloc(cap * C1 * 9 * HW2);
    m->c2 = falloc(cap * C2 * HW2);
    m->b2 = falloc(cap * C2 * HW2);
    m->p2 = falloc(cap * FC_IN);
    m->arg2 = train_malloc((size_t)(cap * FC_IN));
    m->logits = falloc(cap * FC_OUT);
    m->probs = falloc(cap * FC_OUT);
    m->dlogits = falloc(cap * FC_OUT);
    m->dp2 = falloc(cap * FC_IN);
    m->db2 = falloc(cap * C2 * HW2);
    m->dp1 = falloc(cap * C1 * HW2);
    m->db1 = falloc(cap * C1 * HW1);
    m->dcol2 = falloc(C1 * 9 * HW2);
    if (reduction == TRAIN_REPRODUCIBLE) m->dw_all = falloc(cap * NG);

    m->fmt = SBX_LINEAR;
    if (reduction == TRAIN_REPRODUCIBLE) {
        int nr;
        MPI_Comm_size(comm, &nr);
        m->acc = train_malloc(sizeof(int64_t) * (size_t)((NPARAMS + 1) * sbx_words(m->fmt)));
        m->rounded = train_malloc(sizeof(double) * (NPARAMS + 1));
        m->rs_counts = train_malloc(sizeof(int) * 3 * (size_t)nr);
    }
}

void train_model_free(train_model *m) {
    syncbn_destroy(m->bn1);
    syncbn_destroy(m->bn2);
    void *bufs[] = {m->params, m->grads, m->momentum, m->x, m->col1, m->c1, m->b1, m->p1, m->arg1, m->col2,
                    m->c2, m->b2, m->p2, m->arg2, m->logits, m->probs, m->dlogits, m->dp2, m->db2, m->dp1,
                    m->db1, m->dcol2, m->dw_all, m->acc, m->rounded, m->rs_counts};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    memset(m, 0, sizeof *m);
}

// The BN layers own their weight/bias arrays; ours are the master copy.
static void push_bn_params(train_model *m) {
    memcpy(syncbn_weight(m->bn1), m->bn1_w, sizeof(float) * C1);
    memcpy(syncbn_bias(m->bn1), m->bn1_b, sizeof(float) * C1);
    memcpy(syncbn_weight(m->bn2), m->bn2_w, sizeof(float) * C2);
    memcpy(syncbn_bias(m->bn2), m->bn2_b, sizeof(float) * C2);
}

// BN -> ReLU -> maxpool, split where m->fused says (train_model.h). A failed call ends
// the job with a message naming the call, the layer (`name`, e.g. "m->bn1") and the
// layer's own description of the error (for SYNCBN_ETIMEOUT, which call waited how long).
// Forward: y = relu(BN(x)) with the mask kept in the layer (fused), or y = BN(x).
// Collective when training.
static void bn_relu_forward(const train_model *m, syncbn_layer *bn, const char *name, const float *x, int64_t n,
                            int64_t S, int training, float *y) {
    int rc = m->fused ? syncbn_forward_ex(bn, x, NULL, n, S, training, y) : syncbn_forward(bn, x, n, S, training, y);
    if (rc != SYNCBN_OK)
        train_die("%s(%s, ...) failed: %s", m->fused ? "syncbn_forward_ex" : "syncbn_forward", name,
                  syncbn_last_error(bn));
}
// Backward: dx = d(BN input), may equal dy; dweight, dbias: (C) global sums. Collective.
static void bn_relu_backward(const train_model *m, syncbn_layer *bn, const char *name, const float *x, const float *dy,
                             int64_t n, int64_t S, float *dx, float *dweight, float *dbias) {
    int rc = m->fused ? syncbn_backward_ex(bn, x, dy, n, S, dx, NULL, dweight, dbias)
                      : syncbn_backward(bn, x, dy, n, S, dx, dweight, dbias);
    if (rc != SYNCBN_OK)
        train_die("%s(%s, ...) failed: %s", m->fused ? "syncbn_backward_ex" : "syncbn_backward", name,
                  syncbn_last_error(bn));
}

// One sample's pooling after the BN: x (C, H, W) is relu(BN) when fused (plain
// maxpool), BN when not (the ReLU folded into the pooling).
static void relu_pool_forward(const train_model *m, float *y, uint8_t *arg, const float *x, int C, int H, int W) {
    if (m->fused)
        maxpool2_forward(y, arg, x, C, H, W);
    else
        relu_maxpool2_forward(y, arg, x, C, H, W);
}
// dx: (C, H, W), overwritten; y: the pooled output (read unfused only). Fused, the
// gradient reaches every window's maximum and the BN layer's mask then applies the ReLU.
static void relu_pool_backward(const train_model *m, float *dx, const float *dy, const float *y, const uint8_t *arg,
                               int C, int H, int W) {
    if (m->fused)
        maxpool2_backward(dx, dy, arg, C, H, W);
    else
        relu_maxpool2_backward(dx, dy, y, arg, C, H, W);
}

// Forward of n samples from m->x into m->logits. training: BN mode (collective if 1).
static void forward(train_model *m, int64_t n, int training) {
    for (int64_t s = 0; s < n; s++)
        conv3x3_forward(m->c1 + s * C1 * HW1, m->col1 + s * 9 * HW1, m->x + s * HW1, m->conv1_w, 1, C1, 28, 28);
    bn_relu_forward(m, m->bn1, "m->bn1", m->c1, n, HW1, training, m->b1);
    for (int64_t s = 0; s < n; s++) {
        relu_pool_forward(m, m->p1 + s * C1 * HW2, m->arg1 + s * C1 * HW2, m->b1 + s * C1 * HW1, C1, 28, 28);
        conv3x3_forward(m->c2 + s * C2 * HW2, m->col2 + s * C1 * 9 * HW2, m->p1 + s * C1 * HW2, m->conv2_w, C1, C2,
                        14, 14);
    }
    bn_relu_forward(m, m->bn2, "m->bn2", m->c2, n, HW2, training, m->b2);
    for (int64_t s = 0; s < n; s++)
        relu_pool_forward(m, m->p2 + s * FC_IN, m->arg2 + s * FC_IN, m->b2 + s * C2 * HW2, C2, 14, 14);
    if (m->reduction == TRAIN_FAST) {
        linear_forward_batched(m->logits, m->p2, m->fc_w, m->fc_b, (int)n, FC_IN, FC_OUT);
    } else {
        for (int64_t s = 0; s < n; s++)
            linear_forward(m->logits + s * FC_OUT, m->p2 + s * FC_IN, m->fc_w, m->fc_b, FC_IN, FC_OUT);
    }
}

// acc += v exactly, for a float v. The same arithmetic as sbx_add_floats' fast path
// (exactsum.c), inlined because we add into one accumulator PER PARAMETER: a float's
// 24-bit significand shifted into the 32-bit digit grid spans at most two digits.
// Special values and anything outside the window take the library's general path.
static inline void deposit_float(int64_t *acc, sbx_format f, float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    uint32_t e = (b >> 23) & 0xFF;
    uint32_t mant = (b & 0x7FFFFF) | (e ? 0x800000u : 0);
    int32_t sh = (int32_t)(e ? e : 1) - 150 - f.lsb_exp;
    if (e != 0xFF && sh >= 0 && sh + 24 <= 32 * (f.ndigits - 1)) {
        int64_t neg = -(int64_t)(b >> 31);
        int32_t k = sh >> 5;
        uint64_t x = (uint64_t)mant << (sh & 31);
        acc[k] += ((int64_t)(x & 0xFFFFFFFFu) ^ neg) - neg;
        acc[k + 1] += ((int64_t)(x >> 32) ^ neg) - neg;
    } else {
        sbx_add(acc, f, (double)v);
    }
}

// acc += q * 2^L exactly, for an int64 q (split into two 32-bit halves, each of which
// spans at most two digits once shifted into place). Needs lsb_exp <= L.
static inline void deposit_scaled_int(int64_t *acc, sbx_format f, int64_t q, int L) {
    int64_t neg = q < 0 ? -1 : 0;
    uint64_t u = q < 0 ? 0 - (uint64_t)q : (uint64_t)q;
    int32_t sh = L - f.lsb_exp;
    int32_t k = sh >> 5;
    uint64_t lo = (u & 0xFFFFFFFFu) << (sh & 31), hi = (u >> 32) << (sh & 31);
    acc[k] += ((int64_t)(lo & 0xFFFFFFFFu) ^ neg) - neg;
    acc[k + 1] += ((int64_t)(lo >> 32) ^ neg) - neg;
    acc[k + 1] += ((int64_t)(hi & 0xFFFFFFFFu) ^ neg) - neg;
    acc[k + 2] += ((int64_t)(hi >> 32) ^ neg) - neg;
}

// The two inner loops of train_deposit_samples. Both are exact, so the AVX-512 versions
// give exactly the same sums as the portable ones (only faster).
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
static float block_absmax(const float *v, int64_t stride, int64_t ns, int64_t nb) {
    __m512 m = _mm512_setzero_ps();
    float tail = 0.0f;
    for (int64_t s = 0; s < ns; s++) {
        const float *vs = v + s * stride;
        int64_t i = 0;
        for (; i + 16 <= nb; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(vs + i)));
        for (; i < nb; i++) tail = fabsf(vs[i]) > tail ? fabsf(vs[i]) : tail;
    }
    float r = _mm512_reduce_max_ps(m);
    return r > tail ? r : tail;
}
// q[i] += v[i]*2^-L for the values that are exact multiples of 2^L below 2^(L+55);
// returns how many were not.
static int64_t add_fixed(int64_t *q, const float *v, int64_t nb, float scale, float unscale) {
    int64_t bad = 0, i = 0;
    const __m512 vs = _mm512_set1_ps(scale), vu = _mm512_set1_ps(unscale), lim = _mm512_set1_ps(0x1p55f);
    for (; i + 16 <= nb; i += 16) {
        __m512 x = _mm512_loadu_ps(v + i);
        __m512 t = _mm512_mul_ps(x, vs);
        __mmask16 in = _mm512_cmp_ps_mask(_mm512_abs_ps(t), lim, _CMP_LT_OQ);
        t = _mm512_maskz_mov_ps(in, t);
        __m512i q0 = _mm512_cvttps_epi64(_mm512_castps512_ps256(t));
        __m512i q1 = _mm512_cvttps_epi64(_mm512_extractf32x8_ps(t, 1));
        __m512 back = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(q0)), _mm512_cvtepi64_ps(q1), 1);
        __mmask16 ok = _mm512_cmp_ps_mask(_mm512_mul_ps(back, vu), x, _CMP_EQ_OQ);
        __m512i a0 = _mm512_loadu_si512(q + i), a1 = _mm512_loadu_si512(q + i + 8);
        _mm512_storeu_si512(q + i, _mm512_mask_add_epi64(a0, (__mmask8)ok, a0, q0));
        _mm512_storeu_si512(q + i + 8, _mm512_mask_add_epi64(a1, (__mmask8)(ok >> 8), a1, q1));
        bad += 16 - __builtin_popcount(ok);
    }
    for (; i < nb; i++) {
        float t = v[i] * scale;
        float tc = fabsf(t) < 0x1p55f ? t : 0.0f;
        int64_t qi = (int64_t)tc;
        int ok = (float)qi * unscale == v[i];
        q[i] += ok ? qi : 0;
        bad += !ok;
    }
    return bad;
}
#else
static float block_absmax(const float *v, int64_t stride, int64_t ns, int64_t nb) {
    float amax = 0.0f;
    for (int64_t s = 0; s < ns; s++)
        for (int64_t i = 0; i < nb; i++) amax = fabsf(v[s * stride + i]) > amax ? fabsf(v[s * stride + i]) : amax;
    return amax;
}
static int64_t add_fixed(int64_t *q, const float *v, int64_t nb, float scale, float unscale) {
    int64_t bad = 0;
    for (int64_t i = 0; i < nb; i++) {
        float t = v[i] * scale;
        float tc = fabsf(t) < 0x1p55f ? t : 0.0f; // no UB converting Inf/NaN/huge
        int64_t qi = (int64_t)tc;
        int ok = (float)qi * unscale == v[i];   // an exact multiple of 2^L, in range
        q[i] += ok ? qi : 0;
        bad += !ok;
    }
    return bad;
}
#endif

// acc[i] += sum over samples s < n of v[s*stride + i], exactly, for i < len.
//
// Depositing every value into its superaccumulator costs ~25 scalar instructions.
// Instead, for a block of parameters and up to 256 samples, we pick a scale 2^L from
// the block's largest magnitude (values < 2^(L+55), so 256 of them cannot overflow
// int64) and add every value that is an exact multiple of 2^L into a plain int64
// (vectorizable: multiply by a power of two, convert, check the round trip). The
// few values that are not (more than 2^31 below the block max, or Inf/NaN) go to
// deposit_float. Each int64 is then added to its accumulator exactly. Every path is
// exact, so the choice of L, blocks and chunks cannot change the final sum: it
// affects only speed, and results stay independent of the partition.
void train_deposit_samples(int64_t *acc, sbx_format f, const float *v, int64_t stride, int64_t n, int64_t len) {
    const int64_t words = sbx_words(f);
    enum { BLOCK = 256, CHUNK = 256 };
    int64_t q[BLOCK];
    for (int64_t i0 = 0; i0 < len; i0 += BLOCK) {
        int64_t nb = len - i0 < BLOCK ? len - i0 : BLOCK;
        for (int64_t s0 = 0; s0 < n; s0 += CHUNK) {
            int64_t s1 = n - s0 < CHUNK ? n : s0 + CHUNK;
            float amax = block_absmax(v + s0 * stride + i0, stride, s1 - s0, nb);
            int e = 0; // NaNs do not raise amax; they fail the exactness test below
            if (isfinite(amax)) frexpf(amax, &e); // amax < 2^e
            int L = e - 55;
            L = L < -100 ? -100 : L > 100 ? 100 : L; // keeps 2^-L and q*2^L normal floats
            if (L < f.lsb_exp) L = f.lsb_exp;
            // a window too narrow for deposit_scaled_int: every value takes deposit_float
            if (((L - f.lsb_exp) >> 5) + 2 >= f.ndigits) L = INT32_MAX;
            if (L == INT32_MAX) {
                for (int64_t s = s0; s < s1; s++)
                    for (int64_t i = 0; i < nb; i++) deposit_float(acc + (i0 + i) * words, f, v[s * stride + i0 + i]);
                continue;
            }
            float scale = ldexpf(1.0f, -L), unscale = ldexpf(1.0f, L);
            memset(q, 0, sizeof q);
            for (int64_t s = s0; s < s1; s++) {
                const float *vs = v + s * stride + i0;
                if (add_fixed(q, vs, nb, scale, unscale) == 0) continue;
                int64_t *a = acc + i0 * words;
                for (int64_t i = 0; i < nb; i++) {
                    float t = vs[i] * scale;
                    float tc = fabsf(t) < 0x1p55f ? t : 0.0f;
                    if (!((float)(int64_t)tc * unscale == vs[i])) deposit_float(a + i * words, f, vs[i]);
                }
            }
            int64_t *a = acc + i0 * words;
            for (int64_t i = 0; i < nb; i++)
                if (q[i]) deposit_scaled_int(a + i * words, f, q[i], L);
        }
    }
}

static void deposit_samples(train_model *m, int64_t off, const float *v, int64_t stride, int64_t n, int64_t len) {
    train_deposit_samples(m->acc + off * sbx_words(m->fmt), m->fmt, v, stride, n, len);
}

double train_model_step(train_model *m, const float *x, const uint8_t *labels, int64_t n, int64_t B) {
    if (n > m->cap) train_die("local batch %lld exceeds capacity %lld", (long long)n, (long long)m->cap);
    int repro = m->reduction == TRAIN_REPRODUCIBLE;
    int64_t words = sbx_words(m->fmt);
    memcpy(m->x, x, sizeof(float) * (size_t)(n * HW1));
    push_bn_params(m);
    forward(m, n, 1);

    memset(m->grads, 0, sizeof(float) * NPARAMS);
    // (reproducible mode: the accumulators are all zero here; the last step cleared them)

    // loss and its gradient, per sample
    double loss_local = 0.0;
    for (int64_t s = 0; s < n; s++) {
        double l = softmax_ce_forward(m->probs + s * FC_OUT, m->logits + s * FC_OUT, labels[s], FC_OUT);
        if (repro)
            sbx_add(m->acc + NPARAMS * words, m->fmt, l);
        else
            loss_local += l;
        softmax_ce_backward(m->dlogits + s * FC_OUT, m->probs + s * FC_OUT, labels[s], 1.0 / (double)B, FC_OUT);
    }

    // linear; in reproducible mode each sample writes its own row of dw_all
    float *dw_all = m->dw_all;
    if (repro) {
        for (int64_t s = 0; s < n; s++) {
            float *dw = dw_all + s * NG + DW_FC;
            linear_backward(m->dp2 + s * FC_IN, dw, dw + FC_OUT * FC_IN, m->dlogits + s * FC_OUT, m->p2 + s * FC_IN,
                            m->fc_w, 0.0f, FC_IN, FC_OUT);
        }
    } else {
        linear_backward_batched(m->dp2, m->grads + OFF_FCW, m->grads + OFF_FCB, m->dlogits, m->p2, m->fc_w, (int)n,
                                FC_IN, FC_OUT);
    }

    // pool2 + relu2 (in the pooling, or in bn2's mask), bn2
    for (int64_t s = 0; s < n; s++)
        relu_pool_backward(m, m->db2 + s * C2 * HW2, m->dp2 + s * FC_IN, m->p2 + s * FC_IN, m->arg2 + s * FC_IN, C2,
                           14, 14);
    bn_relu_backward(m, m->bn2, "m->bn2", m->c2, m->db2, n, HW2, m->db2, m->grads + OFF_BN2W, m->grads + OFF_BN2B);

    // conv2 (weights and input), pool1 + relu1, bn1
    for (int64_t s = 0; s < n; s++) {
        float *dw = repro ? dw_all + s * NG + DW_CONV2 : m->grads + OFF_CONV2;
        conv3x3_backward(dw, m->dp1 + s * C1 * HW2, m->dcol2, m->db2 + s * C2 * HW2, m->col2 + s * C1 * 9 * HW2,
                         m->conv2_w, repro ? 0.0f : 1.0f, C1, C2, 14, 14);
        relu_pool_backward(m, m->db1 + s * C1 * HW1, m->dp1 + s * C1 * HW2, m->p1 + s * C1 * HW2,
                           m->arg1 + s * C1 * HW2, C1, 28, 28);
    }
    bn_relu_backward(m, m->bn1, "m->bn1", m->c1, m->db1, n, HW1, m->db1, m->grads + OFF_BN1W, m->grads + OFF_BN1B);

    // conv1 (weights only: the input needs no gradient)
    for (int64_t s = 0; s < n; s++) {
        float *dw = repro ? dw_all + s * NG + DW_CONV1 : m->grads + OFF_CONV1;
        conv3x3_backward(dw, NULL, NULL, m->db1 + s * C1 * HW1, m->col1 + s * 9 * HW1, m->conv1_w,
                         repro ? 0.0f : 1.0f, 1, C1, 28, 28);
    }
    if (repro) {
        deposit_samples(m, OFF_CONV1, dw_all + DW_CONV1, NG, n, C1 * 9);
        deposit_samples(m, OFF_CONV2, dw_all + DW_CONV2, NG, n, C2 * C1 * 9);
        deposit_samples(m, OFF_FCW, dw_all + DW_FC, NG, n, FC_OUT * FC_IN + FC_OUT); // fc w and b are adjacent
    }

    // sync BN gradients are already global sums, identical on every rank: count them once
    int rank;
    MPI_Comm_rank(m->comm, &rank);
    int bn_once = m->bn_mode == TRAIN_BN_SYNC;
    const int bn_offs[4][2] = {{OFF_BN1W, C1}, {OFF_BN1B, C1}, {OFF_BN2W, C2}, {OFF_BN2B, C2}};
    for (int k = 0; k < 4; k++) {
        float *g = m->grads + bn_offs[k][0];
        if (repro) {
            if (!bn_once || rank == 0) deposit_samples(m, bn_offs[k][0], g, 0, 1, bn_offs[k][1]);
        } else if (bn_once && rank != 0) {
            memset(g, 0, sizeof(float) * (size_t)bn_offs[k][1]);
        }
    }

    double loss_sum;
    if (repro) {
        // Each rank rounds only its share of the accumulators: normalize (so that P
        // ranks' digit words cannot overflow when added), reduce-scatter the exact
        // integers, round the share once, all-gather the rounded doubles. The values
        // are those of sbx_allreduce + sbx_round on every rank; the rounding work is
        // divided by P instead of repeated on every rank.
        const int64_t nacc = NPARAMS + 1;
        int rank, nr;
        MPI_Comm_rank(m->comm, &rank);
        MPI_Comm_size(m->comm, &nr);
        int *cnt = m->rs_counts, *dcnt = cnt + nr, *displ = dcnt + nr;
        for (int r = 0; r < nr; r++) {
            int64_t a = nacc * r / nr, b = nacc * (r + 1) / nr;
            cnt[r] = (int)((b - a) * words);
            dcnt[r] = (int)(b - a);
            displ[r] = (int)a;
        }
        for (int64_t i = 0; i < nacc; i++) sbx_normalize(m->acc + i * words, m->fmt);
        int rc = MPI_Reduce_scatter(MPI_IN_PLACE, m->acc, cnt, MPI_INT64_T, MPI_SUM, m->comm);
        for (int64_t i = 0; rc == MPI_SUCCESS && i < dcnt[rank]; i++) // our share is now at the front
            m->rounded[displ[rank] + i] = sbx_round(m->acc + i * words, m->fmt);
        if (rc == MPI_SUCCESS)
            rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, m->rounded, dcnt, displ, MPI_DOUBLE, m->comm);
        if (rc != MPI_SUCCESS) train_die("exact gradient reduction failed (MPI error %d)", rc);
        for (int64_t i = 0; i < NPARAMS; i++) m->grads[i] = (float)m->rounded[i];
        loss_sum = m->rounded[NPARAMS];
        memset(m->acc, 0, sizeof(int64_t) * (size_t)(nacc * words)); // zero for the next step
    } else {
        MPI_Allreduce(MPI_IN_PLACE, m->grads, NPARAMS, MPI_FLOAT, MPI_SUM, m->comm);
        MPI_Allreduce(&loss_local, &loss_sum, 1, MPI_DOUBLE, MPI_SUM, m->comm);
    }
    return loss_sum / (double)B;
}

void train_model_sgd(train_model *m, float lr, float mu, float wd) {
    for (int64_t i = 0; i < NPARAMS; i++) {
        float g = m->grads[i] + wd * m->params[i];
        m->momentum[i] = mu * m->momentum[i] + g;
        m->params[i] -= lr * m->momentum[i];
    }
}

int64_t train_model_correct(train_model *m, const float *x, const uint8_t *labels, int64_t n) {
    push_bn_params(m);
    int64_t correct = 0;
    for (int64_t lo = 0; lo < n; lo += m->cap) {
        int64_t k = n - lo < m->cap ? n - lo : m->cap;
        memcpy(m->x, x + lo * HW1, sizeof(float) * (size_t)(k * HW1));
        forward(m, k, 0);
        for (int64_t s = 0; s < k; s++) {
            const float *l = m->logits + s * FC_OUT;
            int best = 0;
            for (int v = 1; v < FC_OUT; v++)
                if (l[v] > l[best]) best = v;
            correct += best == labels[lo + s];
        }
    }
    return correct;
}

// BN running statistics in a fixed order: bn1 mean, bn1 var, bn2 mean, bn2 var.
#define NBUFFERS (2 * C1 + 2 * C2)
static void get_buffers(train_model *m, float *buf) {
    memcpy(buf, syncbn_running_mean(m->bn1), sizeof(float) * C1);
    memcpy(buf + C1, syncbn_running_var(m->bn1), sizeof(float) * C1);
    memcpy(buf + 2 * C1, syncbn_running_mean(m->bn2), sizeof(float) * C2);
    memcpy(buf + 2 * C1 + C2, syncbn_running_var(m->bn2), sizeof(float) * C2);
}
static void set_buffers(train_model *m, const float *buf) {
    memcpy(syncbn_running_mean(m->bn1), buf, sizeof(float) * C1);
    memcpy(syncbn_running_var(m->bn1), buf + C1, sizeof(float) * C1);
    memcpy(syncbn_running_mean(m->bn2), buf + 2 * C1, sizeof(float) * C2);
    memcpy(syncbn_running_var(m->bn2), buf + 2 * C1 + C2, sizeof(float) * C2);
}

void train_model_hash(train_model *m, char hex[65]) {
    float buf[NBUFFERS];
    get_buffers(m, buf);
    train_sha256 c;
    uint8_t d[32];
    train_sha256_init(&c);
    train_sha256_update(&c, m->params, sizeof(float) * NPARAMS);
    train_sha256_update(&c, buf, sizeof buf);
    train_sha256_final(&c, d);
    train_sha256_hex(d, hex);
}

// ----------------------------------------------------------------------------
// Checkpoints. Layout (native endianness; same binary assumed, as for the hash):
//   char magic[8] "SBNTRAIN"; uint32 version, nbuffers, nsets, reserved;
//   int64 nparams, next_step; uint64 seed; int64 batch;
//   float params[nparams]; float velocity[nparams]; float buffers[nsets][nbuffers];
//   uint32 crc32 of everything before it.
// The BN running statistics are stored once (sync BN: identical on every rank) or once
// per rank (local BN: each rank has its own), so both kinds of run resume exactly.

#define CKPT_MAGIC "SBNTRAIN"
#define CKPT_VERSION 2u

typedef struct {
    char magic[8];
    uint32_t version, nbuffers, nsets, reserved;
    int64_t nparams, next_step;
    uint64_t seed;
    int64_t batch;
} ckpt_header;

static int write_checkpoint(const char *path, const ckpt_header *h, const float *params, const float *velocity,
                            const float *bufs, char *err, int errlen) {
    size_t nbuf = (size_t)h->nbuffers * h->nsets;
    uLong crc = crc32(0L, Z_NULL, 0);
    crc = crc32(crc, (const Bytef *)h, sizeof *h);
    crc = crc32(crc, (const Bytef *)params, sizeof(float) * NPARAMS);
    crc = crc32(crc, (const Bytef *)velocity, sizeof(float) * NPARAMS);
    crc = crc32(crc, (const Bytef *)bufs, (uInt)(sizeof(float) * nbuf));
    uint32_t crc32v = (uint32_t)crc;

    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        snprintf(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
        return -1;
    }
    int ok = fwrite(h, sizeof *h, 1, f) == 1 && fwrite(params, sizeof(float), NPARAMS, f) == NPARAMS &&
             fwrite(velocity, sizeof(float), NPARAMS, f) == NPARAMS && fwrite(bufs, sizeof(float), nbuf, f) == nbuf &&
             fwrite(&crc32v, sizeof crc32v, 1, f) == 1;
    // the data must be on disk before the rename makes it visible under the real name
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    // make the rename itself durable
    char dir[4200];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, sizeof dir, ".");
    int dfd = open(slash && dir[0] == 0 ? "/" : dir, O_RDONLY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

int train_model_save(const train_model *m, const char *path, int64_t next_step, uint64_t seed, int64_t batch,
                     char *err, int errlen) {
    int rank, nranks;
    MPI_Comm_rank(m->comm, &rank);
    MPI_Comm_size(m->comm, &nranks);
    ckpt_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, CKPT_MAGIC, 8);
    h.version = CKPT_VERSION;
    h.nbuffers = NBUFFERS;
    h.nsets = m->bn_mode == TRAIN_BN_LOCAL ? (uint32_t)nranks : 1;
    h.nparams = NPARAMS;
    h.next_step = next_step;
    h.seed = seed;
    h.batch = batch;
    float mine[NBUFFERS];
    get_buffers((train_model *)m, mine);
    float *bufs = train_malloc(sizeof(float) * NBUFFERS * h.nsets);
    if (h.nsets > 1)
        MPI_Gather(mine, NBUFFERS, MPI_FLOAT, bufs, NBUFFERS, MPI_FLOAT, 0, m->comm);
    else
        memcpy(bufs, mine, sizeof mine);
    int rc = 0;
    if (rank == 0) rc = write_checkpoint(path, &h, m->params, m->momentum, bufs, err, errlen);
    free(bufs);
    MPI_Bcast(&rc, 1, MPI_INT, 0, m->comm); // every rank reports the same outcome
    if (rc != 0 && rank != 0) snprintf(err, errlen, "rank 0 could not write %s", path);
    return rc;
}

int train_model_load(train_model *m, const char *path, int64_t *next_step, uint64_t seed, int64_t batch, char *err,
                     int errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open checkpoint %s: %s", path, strerror(errno));
        return -1;
    }
    uint8_t *data = NULL;
    size_t got = 0, cap = 0;
    for (;;) { // the whole file, whatever its size claims
        if (got == cap) {
            cap = cap ? 2 * cap : 1 << 20;
            uint8_t *p = realloc(data, cap);
            if (!p) { free(data); fclose(f); snprintf(err, errlen, "out of memory"); return -1; }
            data = p;
        }
        size_t k = fread(data + got, 1, cap - got, f);
        got += k;
        if (k == 0) break;
    }
    fclose(f);
    ckpt_header h;
    if (got >= sizeof h) memcpy(&h, data, sizeof h);
    if (got < sizeof h || memcmp(h.magic, CKPT_MAGIC, 8) != 0) {
        snprintf(err, errlen, "%s is not a syncbn-train checkpoint", path);
        free(data);
        return -1;
    }
    size_t want = sizeof h + 2 * sizeof(float) * NPARAMS + sizeof(float) * NBUFFERS * (size_t)h.nsets + sizeof(uint32_t);
    if (h.version != CKPT_VERSION || h.nparams != NPARAMS || h.nbuffers != NBUFFERS || h.nsets < 1 ||
        h.nsets > (1u << 20) || got != want) {
        snprintf(err, errlen, "%s: wrong version, model shape or size (%zu bytes)", path, got);
        free(data);
        return -1;
    }
    uint32_t stored;
    memcpy(&stored, data + want - sizeof stored, sizeof stored);
    uint32_t crc = (uint32_t)crc32(crc32(0L, Z_NULL, 0), data, (uInt)(want - sizeof stored));
    if (crc != stored) {
        snprintf(err, errlen, "%s is corrupt (CRC-32 mismatch)", path);
        free(data);
        return -1;
    }
    if (h.seed != seed || h.batch != batch) {
        snprintf(err, errlen, "%s was written by a run with --seed %llu --batch %lld; pass the same options", path,
                 (unsigned long long)h.seed, (long long)h.batch);
        free(data);
        return -1;
    }
    // local BN on as many ranks as wrote the file: each rank takes its own statistics;
    // otherwise every rank takes the first set (sync BN: the only one)
    int rank, nranks;
    MPI_Comm_rank(m->comm, &rank);
    MPI_Comm_size(m->comm, &nranks);
    uint32_t set = m->bn_mode == TRAIN_BN_LOCAL && h.nsets == (uint32_t)nranks ? (uint32_t)rank : 0;
    if (m->bn_mode == TRAIN_BN_LOCAL && h.nsets != (uint32_t)nranks)
        train_log0("note: %s holds BN statistics of %u rank(s), not %d: every rank starts from the first\n", path,
                   h.nsets, nranks);
    const uint8_t *p = data + sizeof h;
    memcpy(m->params, p, sizeof(float) * NPARAMS);
    memcpy(m->momentum, p + sizeof(float) * NPARAMS, sizeof(float) * NPARAMS);
    float buf[NBUFFERS];
    memcpy(buf, p + 2 * sizeof(float) * NPARAMS + sizeof(float) * NBUFFERS * set, sizeof buf);
    set_buffers(m, buf);
    // every step made one training forward through each BN layer
    syncbn_set_num_batches_tracked(m->bn1, h.next_step);
    syncbn_set_num_batches_tracked(m->bn2, h.next_step);
    *next_step = h.next_step;
    free(data);
    return 0;
}
