/*
 * layer.c - the synchronized BN layer: create/destroy, forward, backward.
 *
 * Without a timeout, every collective call is ONE MPI_Allreduce(MPI_SUM) of one packed
 * buffer:
 *
 *   header (SBN_HDR words)                       | per-channel data
 *   invalid | state | count | agree(id) agree(tag) agree(S) | FAST: s1[C] s2[C] (double)
 *
 * FAST sums header and data as doubles (MPI_SUM). REPRODUCIBLE sends wire elements
 * of 6 int64 (exactsum.h) merged by the communicator's user-defined op: 6 header
 * elements (the header words and the message's NaN/Inf counts, summed plainly), then
 * one element per sum, C for sum x (or g) and C for the quadratic sums: 6 words per
 * sum instead of the 20 of the full accumulators, which the layer keeps locally
 * (l->acc) and sends, in one more allreduce, only when some sum's bits span more than
 * an element's window (repro_results).
 *
 * With a timeout (cfg.timeout > 0) a call is MPI_Iallreduce, waited for until the
 * call's deadline (sbn_comm_iallreduce), of the communicator's fixed-size call
 * message (comm.h: SBN_CALL_WORDS doubles, the same size for every layer, every call
 * and every create): the header, as doubles, and for a FAST layer with C <= 64 the
 * data too. Larger layers (and REPRODUCIBLE ones: int64 data) send their data part of
 * the buffer above in a second MPI_Iallreduce, only once the headers agree. Calls
 * made out of step therefore only ever meet a message of their own size and type:
 * Open MPI, given mismatched counts, fails with MPI_ERR_TRUNCATE (fatal), returns
 * wrong data, or overflows the receive buffer (scripts/check/iallreduce_mismatch.c), and a
 * deadline alone would not make that safe. The data messages only start once all
 * ranks have agreed they are in the same call of the same layer, hence the same C.
 * The price: a call message of 155 words, and a second message for large layers
 * (docs/api.md, "Timeouts").
 * "invalid"/"state" count the ranks that found a bad argument or, in a backward, an
 * out-of-order call (in a forward: a failed allocation of the ReLU mask) locally: such a rank still joins the allreduce (with zero data), so every rank
 * learns of the error at once and returns the same code, instead of the others
 * waiting forever. "agree" words (comm.h) detect ranks that passed a different S or
 * that are executing a different layer or call (tag = 2*seq + kind). Forward and
 * backward buffers have the same size, so even a forward meeting a backward is seen.
 *
 * Error priority, the same on every rank because it reads only reduced data:
 *   call mismatch > EINVAL > ESTATE > S mismatch > EEMPTY > ENONFINITE.
 * Nothing in the layer changes before all checks have passed.
 */
#include "layer.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exactsum.h"
#include "moments.h"

enum { H_INVALID = 0, H_STATE = 1, H_COUNT = 2, H_ID = 3, H_TAG = H_ID + SBN_AGREE_WORDS,
       H_S = H_TAG + SBN_AGREE_WORDS, SBN_HDR = H_S + SBN_AGREE_WORDS };
/* The rest of the fixed-size call message, used by create only: the configuration. */
enum { H_CFG_C = SBN_HDR, H_CFG_EPS = H_CFG_C + SBN_AGREE_WORDS, H_CFG_MOM = H_CFG_EPS + SBN_AGREE_WORDS,
       H_CFG_FLAGS = H_CFG_MOM + SBN_AGREE_WORDS, H_CFG_TIMEOUT = H_CFG_FLAGS + SBN_AGREE_WORDS,
       H_CALL_END = H_CFG_TIMEOUT + SBN_AGREE_WORDS };
_Static_assert(SBN_HDR == SBN_CALL_HDR && H_CALL_END <= SBN_CALL_WORDS, "comm.h sizes the call message");
enum { KIND_FORWARD = 0, KIND_BACKWARD = 1 };
static const char *const kind_name[2] = {"forward", "backward"};
/* The tag of a create: never 2*seq + kind of a forward or backward. */
#define TAG_CREATE UINT64_MAX

/* Names the call in messages: "backward, call 12 of layer 3 (C = 64)". */
#define CALL_FMT "%s, call %lld of layer %lld (C = %lld)"
#define CALL_ARGS(l, kind) kind_name[kind], (long long)(l)->seq + 1, (long long)(l)->id, (long long)(l)->cfg.channels

/* Keeps every message below INT_MAX words (MPI counts are int). */
#define SBN_MAX_CHANNELS ((int64_t)1 << 25)

syncbn_config syncbn_config_default(int64_t channels)
{
    syncbn_config c = {
        .channels = channels,
        .eps = 1e-5,
        .momentum = 0.1,
        .affine = 1,
        .track_running_stats = 1,
        .layout = SYNCBN_NCHW,
        .reduction = SYNCBN_FAST,
        .timeout = 0,
        .dtype = SYNCBN_F32,
        .activation = SYNCBN_ACT_NONE,
    };
    return c;
}

/* ---- syncbn_last_error ---- */

__attribute__((format(printf, 3, 4))) static int note(syncbn_layer *l, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l->err, sizeof l->err, fmt, ap);
    va_end(ap);
    return rc;
}

int sbn_note_file(syncbn_layer *l, int rc, const char *what, const char *path)
{
    if (rc == SYNCBN_OK)
        l->err[0] = 0;
    else
        note(l, rc, "%s '%s': %s", what, path ? path : "(NULL)", syncbn_strerror(rc));
    return rc;
}

const char *syncbn_last_error(const syncbn_layer *l) { return l ? l->err : "no layer (NULL handle)"; }

static int config_valid(const syncbn_config *c)
{
    return c->channels >= 1 && c->channels <= SBN_MAX_CHANNELS && c->eps > 0 && isfinite(c->eps) &&
           (isnan(c->momentum) || (c->momentum >= 0 && c->momentum <= 1)) &&
           (c->layout == SYNCBN_NCHW || c->layout == SYNCBN_NHWC) &&
           (c->reduction == SYNCBN_FAST || c->reduction == SYNCBN_REPRODUCIBLE) && isfinite(c->timeout) &&
           c->timeout >= 0 && (c->dtype == SYNCBN_F32 || c->dtype == SYNCBN_BF16) &&
           (c->activation == SYNCBN_ACT_NONE || c->activation == SYNCBN_ACT_RELU);
}

static uint64_t double_bits(double v)
{
    uint64_t u;
    if (isnan(v))
        v = NAN; /* every NaN momentum means the same thing */
    if (v == 0)
        v = 0.0; /* and -0.0 is 0.0 */
    memcpy(&u, &v, sizeof u);
    return u;
}

static int is_repro(const syncbn_layer *l) { return l->cfg.reduction == SYNCBN_REPRODUCIBLE; }

/* REPRODUCIBLE messages are wire elements (exactsum.h) of SBX_WIRE_WORDS int64: first
 * WIRE_HDR_ELEMS header elements, whose SBX_WIRE_WORDS - 1 payload words each are
 * summed plainly and hold the SBN_HDR header words and the message's three NaN/+Inf/-Inf
 * deposit counts (H_SPECIALS), then one element per sum: C of sum x (or g), C of the
 * quadratic sums. */
#define WIRE_PAYLOAD (SBX_WIRE_WORDS - 1)
enum { H_SPECIALS = SBN_HDR, WIRE_HDR_WORDS = H_SPECIALS + SBX_SPECIALS,
       WIRE_HDR_ELEMS = (WIRE_HDR_WORDS + WIRE_PAYLOAD - 1) / WIRE_PAYLOAD };

/* Header word k of a REPRODUCIBLE message. */
static int64_t *wire_hdr(void *msg, int k)
{
    return (int64_t *)msg + (k / WIRE_PAYLOAD) * SBX_WIRE_WORDS + 1 + k % WIRE_PAYLOAD;
}

/* Words of one message (8 bytes each): FAST, the header and 2C doubles; REPRODUCIBLE,
 * (WIRE_HDR_ELEMS + 2C) wire elements. */
static int64_t msg_words(const syncbn_config *c)
{
    if (c->reduction == SYNCBN_REPRODUCIBLE)
        return (WIRE_HDR_ELEMS + 2 * c->channels) * SBX_WIRE_WORDS;
    return SBN_HDR + 2 * c->channels;
}

/* int64 words of this rank's own exact accumulators: C LINEAR, then C QUADRATIC. */
static int64_t acc_words(const syncbn_config *c)
{
    return c->channels * (sbx_words(SBX_LINEAR) + sbx_words(SBX_QUADRATIC));
}

static void layer_free(syncbn_layer *l)
{
    if (!l)
        return;
    free(l->params);
    free(l->stats);
    free(l->fcoef);
    free(l->mask);
    free(l->msg);
    free(l->acc);
    free(l);
}

/* Allocates everything a layer will ever need; NULL on failure. */
static syncbn_layer *layer_alloc(const syncbn_config *cfg)
{
    syncbn_layer *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    const int64_t C = cfg->channels;
    l->cfg = *cfg;
    l->cfg.affine = cfg->affine != 0;
    l->cfg.track_running_stats = cfg->track_running_stats != 0;
    l->params = malloc(4 * (size_t)C * sizeof(float));
    /* Every per-channel double array has room for the wrap (moments.h) and starts on
     * a cache line: the NHWC passes load 8 coefficients of each array per vector
     * step, and a 64-byte load across two lines costs about two. */
    const int64_t ld = (C + SBN_COEF_PAD + 7) / 8 * 8;
    l->stats = aligned_alloc(64, 6 * (size_t)ld * sizeof(double));
    l->msg_words = msg_words(cfg);
    l->msg = malloc((size_t)l->msg_words * 8);
    if (cfg->reduction == SYNCBN_REPRODUCIBLE)
        l->acc = malloc((size_t)acc_words(cfg) * sizeof *l->acc);
    const int bf16 = cfg->dtype == SYNCBN_BF16;
    if (bf16) /* a multiple of 16 floats: a multiple of 64 bytes, as aligned_alloc wants */
        l->fcoef = aligned_alloc(64, (size_t)sbn_apply_scratch_floats(C) * sizeof *l->fcoef);
    if (!l->params || !l->stats || !l->msg || (cfg->reduction == SYNCBN_REPRODUCIBLE && !l->acc) ||
        (bf16 && !l->fcoef)) {
        layer_free(l);
        return NULL;
    }
    float *p = l->params;
    for (int64_t c = 0; c < C; c++)
        p[c] = 1.0f, p[C + c] = 0.0f, p[2 * C + c] = 0.0f, p[3 * C + c] = 1.0f;
    if (l->cfg.affine)
        l->weight = p, l->bias = p + C;
    if (l->cfg.track_running_stats)
        l->running_mean = p + 2 * C, l->running_var = p + 3 * C;
    l->mean = l->stats, l->invstd = l->stats + ld;
    l->t1 = l->stats + 2 * ld, l->t2 = l->stats + 3 * ld;
    l->t3 = l->stats + 4 * ld, l->t4 = l->stats + 5 * ld;
    return l;
}

int syncbn_create(const syncbn_config *cfg, MPI_Comm comm, syncbn_layer **out)
{
    int inited = 0;
    if (out)
        *out = NULL;
    if (MPI_Initialized(&inited) != MPI_SUCCESS || !inited)
        return SYNCBN_ESTATE;
    int inter = 0;
    if (comm == MPI_COMM_NULL || MPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS || inter)
        return SYNCBN_EINVAL; /* an intercommunicator's allreduce mixes the two groups */

    const int bad = !out || !cfg || !config_valid(cfg);
    syncbn_layer *l = bad ? NULL : layer_alloc(cfg);
    const int nomem = !bad && !l;

    int err;
    sbn_comm *sc = sbn_comm_acquire(comm, &err);
    if (!sc) {
        layer_free(l);
        return err;
    }
    if (sc->timed_out) {
        layer_free(l);
        sbn_comm_release(sc);
        return SYNCBN_ETIMEOUT;
    }
    const int64_t id = sc->next_layer++;

    /* One allreduce of the fixed-size call message: everyone's verdict on its
     * arguments, and agreement on the configuration and on the layer id (which proves
     * both ranks are creating the same layer in the same order). Always nonblocking,
     * so that ranks that disagree on the timeout still meet (blocking and nonblocking
     * collectives never match each other). A rank that has no valid timeout of its
     * own waits without limit: it learns of the error when the others arrive. */
    double *w = sc->call;
    memset(w, 0, sizeof sc->call);
    w[H_INVALID] = bad;
    w[H_STATE] = nomem;
    sbn_agree_put_f64(w + H_ID, (uint64_t)id);
    sbn_agree_put_f64(w + H_TAG, TAG_CREATE);
    if (!bad) {
        sbn_agree_put_f64(w + H_CFG_C, (uint64_t)cfg->channels);
        sbn_agree_put_f64(w + H_CFG_EPS, double_bits(cfg->eps));
        sbn_agree_put_f64(w + H_CFG_MOM, double_bits(cfg->momentum));
        sbn_agree_put_f64(w + H_CFG_FLAGS, (uint64_t)((cfg->affine != 0) | (cfg->track_running_stats != 0) << 1 |
                                                       (unsigned)cfg->layout << 2 | (unsigned)cfg->reduction << 3 |
                                                       (unsigned)cfg->dtype << 4 | (unsigned)cfg->activation << 5));
        sbn_agree_put_f64(w + H_CFG_TIMEOUT, double_bits(cfg->timeout));
    }
    const double timeout = cfg && isfinite(cfg->timeout) && cfg->timeout > 0 ? cfg->timeout : 0;

    int nranks = 1;
    int rc = MPI_Comm_size(sc->inner, &nranks) == MPI_SUCCESS
                 ? sbn_comm_iallreduce(sc, w, SBN_CALL_WORDS, MPI_DOUBLE, MPI_SUM, timeout, sbn_now() + timeout)
                 : SYNCBN_EMPI;
    if (rc == SYNCBN_ETIMEOUT)
        snprintf(sc->timed_out_in, sizeof sc->timed_out_in, "create of layer %lld", (long long)id);
    if (rc == SYNCBN_OK) {
        /* The configuration words are read only once the header shows that every
         * rank is in this create (otherwise they hold another call's data). */
        const int same_call = sbn_agree_ok_f64(w + H_ID, nranks) && sbn_agree_ok_f64(w + H_TAG, nranks);
        int agree = same_call;
        for (int k = H_CFG_C; agree && k < H_CALL_END; k += SBN_AGREE_WORDS)
            agree = sbn_agree_ok_f64(w + k, nranks);
        if (!same_call)
            rc = SYNCBN_EMISMATCH; /* another call than this create: out of step */
        else if (w[H_INVALID])
            rc = SYNCBN_EINVAL;
        else if (!agree)
            rc = SYNCBN_EMISMATCH;
        else if (w[H_STATE])
            rc = SYNCBN_ENOMEM;
    }
    if (rc != SYNCBN_OK) {
        layer_free(l);
        sbn_comm_release(sc);
        return rc;
    }
    l->comm = sc;
    l->nranks = nranks;
    l->id = id;
    *out = l;
    return SYNCBN_OK;
}

void syncbn_destroy(syncbn_layer *layer)
{
    if (!layer)
        return;
    sbn_comm_release(layer->comm);
    layer_free(layer);
}

float *syncbn_weight(syncbn_layer *l) { return l ? l->weight : NULL; }
float *syncbn_bias(syncbn_layer *l) { return l ? l->bias : NULL; }
float *syncbn_running_mean(syncbn_layer *l) { return l ? l->running_mean : NULL; }
float *syncbn_running_var(syncbn_layer *l) { return l ? l->running_var : NULL; }
int64_t syncbn_num_batches_tracked(const syncbn_layer *l) { return l ? l->num_batches_tracked : -1; }

int syncbn_set_num_batches_tracked(syncbn_layer *l, int64_t n)
{
    if (!l)
        return SYNCBN_EINVAL;
    if (n < 0)
        return note(l, SYNCBN_EINVAL, "set_num_batches_tracked: n = %lld is negative", (long long)n);
    l->err[0] = 0;
    l->num_batches_tracked = n;
    return SYNCBN_OK;
}

int syncbn_get_config(const syncbn_layer *l, syncbn_config *cfg)
{
    if (!l || !cfg)
        return SYNCBN_EINVAL;
    *cfg = l->cfg;
    return SYNCBN_OK;
}

/* n >= 0, S >= 1 and n*C*S representable. */
static int shape_valid(int64_t n, int64_t C, int64_t S)
{
    if (n < 0 || S < 1)
        return 0;
    return n == 0 || (C <= INT64_MAX / S && n <= INT64_MAX / (C * S));
}

/* ---- the one collective ---- */

/* Writes the header into h, as int64 (i64) or as doubles. */
static void hdr_put(const syncbn_layer *l, void *h, int i64, int invalid, int state, int64_t count, int kind,
                    int64_t S)
{
    const uint64_t tag = 2 * (uint64_t)l->seq + (uint64_t)kind;
    if (i64) {
        int64_t *w = h;
        w[H_INVALID] = invalid, w[H_STATE] = state, w[H_COUNT] = count;
        sbn_agree_put_i64(w + H_ID, (uint64_t)l->id);
        sbn_agree_put_i64(w + H_TAG, tag);
        sbn_agree_put_i64(w + H_S, (uint64_t)S);
    } else {
        double *w = h;
        w[H_INVALID] = invalid, w[H_STATE] = state, w[H_COUNT] = (double)count;
        sbn_agree_put_f64(w + H_ID, (uint64_t)l->id);
        sbn_agree_put_f64(w + H_TAG, tag);
        sbn_agree_put_f64(w + H_S, (uint64_t)S);
    }
}

/* A collective call on a communicator that timed out earlier: no MPI at all. */
static int after_timeout(syncbn_layer *l, int kind)
{
    return note(l, SYNCBN_ETIMEOUT, CALL_FMT ": not attempted, this communicator timed out earlier (%s)",
                CALL_ARGS(l, kind), l->comm->timed_out_in);
}

static int timed_out(syncbn_layer *l, int kind)
{
    snprintf(l->comm->timed_out_in, sizeof l->comm->timed_out_in, "%s, call %lld of layer %lld", kind_name[kind],
             (long long)l->seq + 1, (long long)l->id);
    return note(l, SYNCBN_ETIMEOUT, CALL_FMT ": no answer from the other ranks after %.1f s", CALL_ARGS(l, kind),
                l->cfg.timeout);
}

/* Fills the data part with this rank's local sums (or zeros when it has none to give).
 * mask: the ReLU mask to apply to dy (backward), or NULL. */
static void data_put(syncbn_layer *l, int kind, const void *x, const void *dy, const uint8_t *mask, sbn_shape sh,
                     int contribute)
{
    const int64_t C = l->cfg.channels;
    if (is_repro(l)) {
        const int64_t W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
        int64_t *acc1 = l->acc, *acc2 = acc1 + C * W1;
        /* The wire elements: header elements with zero payload (exchange fills in the
         * header), the NaN/Inf counts summed over the message, and each sum packed from
         * its normalized accumulator (the normalized words are also what a fallback
         * sends: below 2^32 each, so P < 2^31 ranks cannot overflow their sum). */
        int64_t *m = l->msg;
        memset(m, 0, WIRE_HDR_ELEMS * SBX_WIRE_WORDS * sizeof *m);
        for (int e = 0; e < WIRE_HDR_ELEMS; e++)
            m[e * SBX_WIRE_WORDS] = SBX_WIRE_PLAIN;
        if (l->nranks == 1) {
            /* One rank: nothing to merge. The kernels round the exact sums themselves
             * into t1, t2 (moments.h: the bits sbx_round gives, so the same bits), with
             * the accumulators as scratch; the data elements are not read, and a NaN
             * or Inf term leaves its own channel's sums non-finite, which fails the call
             * (SYNCBN_ENONFINITE) just as the message's counts would. */
            if (contribute && sh.n > 0) {
                if (kind == KIND_FORWARD)
                    sbn_forward_sums(x, sh, l->t1, l->t2, acc1, acc2);
                else
                    sbn_backward_sums(x, dy, mask, l->mean, sh, l->t1, l->t2, acc1, acc2);
            } else {
                memset(l->t1, 0, (size_t)C * sizeof *l->t1);
                memset(l->t2, 0, (size_t)C * sizeof *l->t2);
            }
            return;
        }
        memset(acc1, 0, (size_t)acc_words(&l->cfg) * sizeof *acc1);
        if (contribute && sh.n > 0) {
            if (kind == KIND_FORWARD)
                sbn_forward_sums(x, sh, NULL, NULL, acc1, acc2);
            else
                sbn_backward_sums(x, dy, mask, l->mean, sh, NULL, NULL, acc1, acc2);
        }
        int64_t *el = m + WIRE_HDR_ELEMS * SBX_WIRE_WORDS;
        int64_t sp[SBX_SPECIALS] = {0};
        for (int64_t c = 0; c < C; c++) {
            int64_t *a1 = acc1 + c * W1, *a2 = acc2 + c * W2;
            for (int k = 0; k < SBX_SPECIALS; k++)
                sp[k] += a1[SBX_LINEAR.ndigits + k] + a2[SBX_QUADRATIC.ndigits + k];
            sbx_normalize(a1, SBX_LINEAR);
            sbx_normalize(a2, SBX_QUADRATIC);
            sbx_wire_pack(el + c * SBX_WIRE_WORDS, a1, SBX_LINEAR);
            sbx_wire_pack(el + (C + c) * SBX_WIRE_WORDS, a2, SBX_QUADRATIC);
        }
        for (int k = 0; k < SBX_SPECIALS; k++)
            *wire_hdr(m, H_SPECIALS + k) = sp[k];
        return;
    }
    double *s1 = (double *)l->msg + SBN_HDR, *s2 = s1 + C;
    if (contribute && sh.n > 0) {
        if (kind == KIND_FORWARD)
            sbn_forward_sums(x, sh, s1, s2, NULL, NULL);
        else
            sbn_backward_sums(x, dy, mask, l->mean, sh, s1, s2, NULL, NULL);
    } else {
        memset(s1, 0, 2 * (size_t)C * sizeof *s1);
    }
}

/* REPRODUCIBLE, after the header checks: t1/t2 = the global sums from the merged wire
 * elements, each rounded once. If any element came back SBX_WIRE_OVER (its data span
 * more than the element's window on some rank, or across ranks: the same verdict on
 * every rank, see exactsum.h), the full accumulators are summed instead, in one more
 * allreduce of plain int64 words; the exact sums, and so the bits, are the same either
 * way. Any NaN/Inf deposit makes every channel's sums non-finite (the call fails with
 * SYNCBN_ENONFINITE whichever channel it was in): NaN if a NaN or both infinities were
 * deposited, else the infinity's sign. */
static int repro_results(syncbn_layer *l, int kind, int timed, double deadline)
{
    const int64_t C = l->cfg.channels, W1 = sbx_words(SBX_LINEAR), W2 = sbx_words(SBX_QUADRATIC);
    const int64_t *el = (const int64_t *)l->msg + WIRE_HDR_ELEMS * SBX_WIRE_WORDS;
    int over = 0;
    for (int64_t e = 0; l->nranks > 1 && e < 2 * C; e++)
        over |= el[e * SBX_WIRE_WORDS] == SBX_WIRE_OVER;
    if (l->nranks == 1) {
        /* data_put rounded the sums into t1, t2 */
    } else if (over) {
        sbn_comm *sc = l->comm;
        const int64_t n = acc_words(&l->cfg);
        int rc = SYNCBN_OK;
        for (int64_t done = 0; done < n && rc == SYNCBN_OK;) {
            const int cnt = n - done > (1 << 30) ? (1 << 30) : (int)(n - done);
            rc = timed ? sbn_comm_iallreduce(sc, l->acc + done, cnt, MPI_INT64_T, MPI_SUM, l->cfg.timeout, deadline)
                 : MPI_Allreduce(MPI_IN_PLACE, l->acc + done, cnt, MPI_INT64_T, MPI_SUM, sc->inner) == MPI_SUCCESS
                     ? SYNCBN_OK
                     : SYNCBN_EMPI;
            done += cnt;
        }
        if (rc == SYNCBN_ETIMEOUT) {
            sc->orphan = l->acc; /* MPI may still write into it */
            l->acc = NULL;
            l->seq--;
            rc = timed_out(l, kind);
            l->seq++;
            return rc;
        }
        if (rc != SYNCBN_OK)
            return note(l, rc, "%s, call %lld of layer %lld: the allreduce of the full accumulators failed",
                        kind_name[kind], (long long)l->seq, (long long)l->id);
        for (int64_t c = 0; c < C; c++) {
            l->t1[c] = sbx_round(l->acc + c * W1, SBX_LINEAR);
            l->t2[c] = sbx_round(l->acc + C * W1 + c * W2, SBX_QUADRATIC);
        }
    } else {
        int64_t a[64 + SBX_SPECIALS];
        for (int64_t c = 0; c < C; c++) {
            sbx_wire_unpack(a, el + c * SBX_WIRE_WORDS, SBX_LINEAR);
            l->t1[c] = sbx_round(a, SBX_LINEAR);
            sbx_wire_unpack(a, el + (C + c) * SBX_WIRE_WORDS, SBX_QUADRATIC);
            l->t2[c] = sbx_round(a, SBX_QUADRATIC);
        }
    }
    const int64_t nan = *wire_hdr(l->msg, H_SPECIALS), pinf = *wire_hdr(l->msg, H_SPECIALS + 1),
                  ninf = *wire_hdr(l->msg, H_SPECIALS + 2);
    if (nan || pinf || ninf) {
        const double v = nan || (pinf && ninf) ? NAN : pinf ? INFINITY : -INFINITY;
        for (int64_t c = 0; c < C; c++)
            l->t1[c] = v, l->t2[c] = v;
    }
    return SYNCBN_OK;
}

/* Puts the header, allreduces header and data (the data part already filled by
 * data_put), and decodes the header into an error code (the same on every rank).
 * `invalid`/`state`: this rank's own verdicts, `count`/`S` its shape. On success
 * *gcount is the global count and t1/t2 hold the global per-channel sums, rounded
 * once to double. */
static int exchange(syncbn_layer *l, int kind, int invalid, int state, int64_t count, int64_t S, double *gcount)
{
    const int64_t C = l->cfg.channels;
    const int repro = is_repro(l);
    const int timed = l->cfg.timeout > 0;
    /* Small FAST layers send their sums inside the call message: one message. */
    const int inline_data = timed && !repro && 2 * C <= SBN_CALL_DATA;
    const double deadline = timed ? sbn_now() + l->cfg.timeout : 0; /* one for the whole call */
    sbn_comm *sc = l->comm;
    int rc;
    if (timed) {
        memset(sc->call, 0, sizeof sc->call);
        hdr_put(l, sc->call, 0, invalid, state, count, kind, S);
        if (inline_data)
            memcpy(sc->call + SBN_HDR, (double *)l->msg + SBN_HDR, 2 * (size_t)C * sizeof(double));
        rc = sbn_comm_iallreduce(sc, sc->call, SBN_CALL_WORDS, MPI_DOUBLE, MPI_SUM, l->cfg.timeout, deadline);
    } else if (repro) {
        int64_t h[SBN_HDR];
        hdr_put(l, h, 1, invalid, state, count, kind, S);
        for (int k = 0; k < SBN_HDR; k++)
            *wire_hdr(l->msg, k) = h[k];
        rc = MPI_Allreduce(MPI_IN_PLACE, l->msg, (int)(l->msg_words / SBX_WIRE_WORDS), sc->wire_type, sc->wire_op,
                           sc->inner) == MPI_SUCCESS
                 ? SYNCBN_OK
                 : SYNCBN_EMPI;
    } else {
        hdr_put(l, l->msg, 0, invalid, state, count, kind, S);
        rc = MPI_Allreduce(MPI_IN_PLACE, l->msg, (int)l->msg_words, MPI_DOUBLE, MPI_SUM, sc->inner) == MPI_SUCCESS
                 ? SYNCBN_OK
                 : SYNCBN_EMPI;
    }
    if (rc == SYNCBN_ETIMEOUT)
        return timed_out(l, kind); /* the buffer was the communicator's own */
    l->seq++;
    if (rc != SYNCBN_OK)
        return note(l, rc, "%s, call %lld of layer %lld: MPI_%sallreduce failed on the private communicator",
                    kind_name[kind], (long long)l->seq, (long long)l->id, timed ? "I" : "");

    int call_ok, s_ok;
    double ninvalid, nstate;
    if (!timed && repro) {
        int64_t h[SBN_HDR];
        for (int k = 0; k < SBN_HDR; k++)
            h[k] = *wire_hdr(l->msg, k);
        call_ok = sbn_agree_ok_i64(h + H_ID, l->nranks) && sbn_agree_ok_i64(h + H_TAG, l->nranks);
        s_ok = sbn_agree_ok_i64(h + H_S, l->nranks);
        ninvalid = (double)h[H_INVALID], nstate = (double)h[H_STATE], *gcount = (double)h[H_COUNT];
    } else {
        const double *h = timed ? sc->call : l->msg;
        call_ok = sbn_agree_ok_f64(h + H_ID, l->nranks) && sbn_agree_ok_f64(h + H_TAG, l->nranks);
        s_ok = sbn_agree_ok_f64(h + H_S, l->nranks);
        ninvalid = h[H_INVALID], nstate = h[H_STATE], *gcount = h[H_COUNT];
    }
    const char *mine = " (this one among them)", *others = " (not this one)";
    if (!call_ok)
        return note(l, SYNCBN_EMISMATCH, "%s, call %lld of layer %lld (C = %lld): the ranks are not all in this call "
                    "(layers or calls out of step)", kind_name[kind], (long long)l->seq, (long long)l->id, (long long)C);
    if (ninvalid > 0)
        return note(l, SYNCBN_EINVAL, "%s: invalid argument (n, spatial, a NULL buffer, dweight/dbias without affine, or dz "
                    "without z) on %.0f of %d ranks%s", kind_name[kind], ninvalid, l->nranks, invalid ? mine : others);
    if (nstate > 0 && kind == KIND_FORWARD)
        return note(l, SYNCBN_ENOMEM, "forward: no memory for the ReLU mask of this batch on %.0f of %d ranks%s",
                    nstate, l->nranks, state ? mine : others);
    if (nstate > 0)
        return note(l, SYNCBN_ESTATE, "%s: no matching training forward (same n and spatial) on %.0f of %d ranks%s",
                    kind_name[kind], nstate, l->nranks, state ? mine : others);
    if (!s_ok)
        return note(l, SYNCBN_EMISMATCH, "%s: spatial differs between ranks", kind_name[kind]);

    if (timed && !inline_data) {
        /* Same layer, same call on every rank: data messages of one size. */
        /* REPRODUCIBLE: the whole message (its header elements hold only the NaN/Inf
         * counts here, the header having travelled in the call message). */
        rc = repro ? sbn_comm_iallreduce(sc, l->msg, (int)(l->msg_words / SBX_WIRE_WORDS), sc->wire_type,
                                         sc->wire_op, l->cfg.timeout, deadline)
                   : sbn_comm_iallreduce(sc, (double *)l->msg + SBN_HDR, (int)(l->msg_words - SBN_HDR), MPI_DOUBLE,
                                         MPI_SUM, l->cfg.timeout, deadline);
        if (rc == SYNCBN_ETIMEOUT) {
            sc->orphan = l->msg; /* MPI may still write into it: the communicator keeps it */
            l->msg = NULL;
            l->seq--; /* name the same call as the header did */
            rc = timed_out(l, kind);
            l->seq++;
            return rc;
        }
        if (rc != SYNCBN_OK)
            return note(l, rc, "%s, call %lld of layer %lld: MPI_Iallreduce of the data failed", kind_name[kind],
                        (long long)l->seq, (long long)l->id);
    }

    if (repro)
        return repro_results(l, kind, timed, deadline);
    {
        const double *s = inline_data ? sc->call + SBN_HDR : (const double *)l->msg + SBN_HDR;
        memcpy(l->t1, s, (size_t)C * sizeof *s);
        memcpy(l->t2, s + C, (size_t)C * sizeof *s);
    }
    return SYNCBN_OK;
}

/* ---- forward ---- */

/* From per-channel sums s1 = sum x, s2 = sum x^2 over `count` elements: mean and
 * biased variance (clamped at 0). Returns SYNCBN_ENONFINITE if any is not finite. */
static int batch_moments(const double *s1, const double *s2, double count, int64_t C, double *mean,
                         double *var)
{
    int finite = 1;
    for (int64_t c = 0; c < C; c++) {
        double m = s1[c] / count;
        double v = s2[c] / count - m * m;
        mean[c] = m;
        var[c] = v > 0 ? v : 0;
        finite &= isfinite(m) && isfinite(v);
    }
    return finite ? SYNCBN_OK : SYNCBN_ENONFINITE;
}

/* y from mean and variance: y = act((x - mean) * invstd * weight + bias [+ z]).
 * Stores invstd when asked to (training), and the ReLU mask into `mask` when not
 * NULL. Uses t3/t4 as scratch; wraps mean (moments.h). */
static void apply(syncbn_layer *l, const void *x, const void *z, void *y, sbn_shape sh, double *mean,
                  const double *var, double *invstd, uint8_t *mask)
{
    const int64_t C = l->cfg.channels;
    double *scale = l->t3, *shift = l->t4;
    for (int64_t c = 0; c < C; c++) {
        const double is = 1.0 / sqrt(var[c] + l->cfg.eps);
        if (invstd)
            invstd[c] = is;
        scale[c] = is * (l->weight ? (double)l->weight[c] : 1.0);
        shift[c] = l->bias ? (double)l->bias[c] : 0.0;
    }
    if (sh.n > 0) {
        sbn_coef_wrap(mean, C), sbn_coef_wrap(scale, C), sbn_coef_wrap(shift, C);
        sbn_normalize(y, x, z, l->cfg.activation == SYNCBN_ACT_RELU, mask, mean, scale, shift, l->fcoef, sh);
    }
}

static int forward_eval(syncbn_layer *l, const void *x, const void *z, sbn_shape sh, void *y)
{
    const int64_t C = l->cfg.channels;
    l->saved = 0;
    double *mean = l->t1, *var = l->t2;
    if (l->running_mean) {
        for (int64_t c = 0; c < C; c++)
            mean[c] = l->running_mean[c], var[c] = l->running_var[c];
    } else {
        /* Untracked statistics: this rank's own batch, as PyTorch does. A rank that
         * holds none of the batch has nothing to normalize (PyTorch returns an empty
         * output), so n == 0 is not an error. */
        if (sh.n == 0)
            return SYNCBN_OK;
        const double count = (double)(sh.n * sh.S);
        sbn_forward_sums(x, sh, l->t3, l->t4, NULL, NULL);
        int rc = batch_moments(l->t3, l->t4, count, C, mean, var);
        if (rc != SYNCBN_OK)
            return note(l, rc, "forward (eval, untracked statistics): NaN or Inf in this rank's batch statistics");
    }
    apply(l, x, z, y, sh, mean, var, NULL, NULL);
    return SYNCBN_OK;
}

/* The running statistics after this batch, into rm/rv (not yet committed).
 * SYNCBN_ENONFINITE if one would overflow float (e.g. |x| near FLT_MAX). */
static int next_running(const syncbn_layer *l, const double *mean, const double *var, double count, double *rm,
                        double *rv)
{
    const double f = isnan(l->cfg.momentum) ? 1.0 / (double)(l->num_batches_tracked + 1) : l->cfg.momentum;
    int finite = 1;
    for (int64_t c = 0; c < l->cfg.channels; c++) {
        const double unbiased = var[c] * count / (count - 1);
        rm[c] = (1 - f) * l->running_mean[c] + f * mean[c];
        rv[c] = (1 - f) * l->running_var[c] + f * unbiased;
        finite &= isfinite((float)rm[c]) && isfinite((float)rv[c]);
    }
    return finite ? SYNCBN_OK : SYNCBN_ENONFINITE;
}

/* ---- the ReLU mask ---- */

static int64_t fail_alloc_after = -1; /* sbn_test_fail_alloc */

void sbn_test_fail_alloc(int64_t after) { fail_alloc_after = after; }

/* Makes the mask cover `count` elements: 1 if it does (growing it if needed), 0 if
 * growing failed, with the old mask kept. A new mask is allocated before the old one
 * is freed, so a failure changes nothing. */
static int mask_reserve(syncbn_layer *l, int64_t count)
{
    if (count <= l->mask_cap)
        return 1;
    if (fail_alloc_after == 0) {
        fail_alloc_after = -1;
        return 0;
    }
    if (fail_alloc_after > 0)
        fail_alloc_after--;
    /* One word more than the bits: readers load the byte after the last bit's. */
    const size_t bytes = ((size_t)(count / 64) + 2) * sizeof(uint64_t);
    uint64_t *m = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!m)
        return 0;
    memset(m, 0, bytes);
    free(l->mask);
    l->mask = m, l->mask_cap = count;
    return 1;
}

/* ---- forward ---- */

int syncbn_forward_ex(syncbn_layer *l, const void *x, const void *z, int64_t n, int64_t spatial, int training,
                      void *y)
{
    if (!l)
        return SYNCBN_EINVAL;
    l->err[0] = 0;
    const int64_t C = l->cfg.channels;
    const int ok = shape_valid(n, C, spatial) && (n == 0 || (x && y));
    sbn_shape sh = {n, C, spatial, l->cfg.layout, l->cfg.dtype};
    if (n == 0)
        z = NULL; /* nothing to add; a NULL z is fine on an empty rank */

    if (!training) {
        if (!ok)
            return note(l, SYNCBN_EINVAL, "forward (eval): invalid argument (n, spatial or a NULL buffer)");
        return forward_eval(l, x, z, sh, y);
    }

    /* Whatever happens now, the statistics of an earlier forward no longer belong to
     * the batch a backward would be called on. */
    l->saved = 0;
    if (l->comm->timed_out)
        return after_timeout(l, KIND_FORWARD);
    const int relu = l->cfg.activation == SYNCBN_ACT_RELU;
    const int nomem = ok && relu && !mask_reserve(l, n * C * spatial);
    data_put(l, KIND_FORWARD, x, NULL, NULL, sh, ok && !nomem);
    double count;
    int rc = exchange(l, KIND_FORWARD, !ok, nomem, ok ? n * spatial : 0, ok ? spatial : 0, &count);
    if (rc != SYNCBN_OK)
        return rc;
    if (count < 2)
        return note(l, SYNCBN_EEMPTY, "forward: the global count per channel is %.0f, below 2", count);

    /* t1, t2: sums -> mean, var (in place). Commit nothing until all is known good. */
    rc = batch_moments(l->t1, l->t2, count, C, l->t1, l->t2);
    if (rc != SYNCBN_OK)
        return note(l, rc, "forward: NaN or Inf in the global batch statistics");

    if (l->running_mean) {
        rc = next_running(l, l->t1, l->t2, count, l->t3, l->t4);
        if (rc != SYNCBN_OK)
            return note(l, rc, "forward: the running statistics would overflow float");
        for (int64_t c = 0; c < C; c++)
            l->running_mean[c] = (float)l->t3[c], l->running_var[c] = (float)l->t4[c];
    }
    l->num_batches_tracked++;
    memcpy(l->mean, l->t1, (size_t)C * sizeof *l->mean); /* apply wraps it (moments.h) */
    apply(l, x, z, y, sh, l->mean, l->t2, l->invstd, relu ? (uint8_t *)l->mask : NULL);
    l->saved = 1, l->saved_n = n, l->saved_S = spatial, l->saved_N = count, l->saved_z = z != NULL;
    return SYNCBN_OK;
}

int syncbn_forward(syncbn_layer *l, const float *x, int64_t n, int64_t spatial, int training, float *y)
{
    if (l && l->cfg.dtype != SYNCBN_F32)
        return note(l, SYNCBN_EINVAL, "forward: this layer's elements are bfloat16; use syncbn_forward_ex");
    return syncbn_forward_ex(l, x, NULL, n, spatial, training, y);
}

/* ---- backward ---- */

int syncbn_backward_ex(syncbn_layer *l, const void *x, const void *dy, int64_t n, int64_t spatial, void *dx,
                       void *dz, float *dweight, float *dbias)
{
    if (!l)
        return SYNCBN_EINVAL;
    l->err[0] = 0;
    const int64_t C = l->cfg.channels;
    if (n == 0)
        dz = NULL; /* nothing to write */
    const int state_ok = l->saved && l->saved_n == n && l->saved_S == spatial;
    /* dz asks for the gradient of z, which only a forward given a z has (without a
     * matching forward at all, the error is the order: SYNCBN_ESTATE). */
    const int ok = shape_valid(n, C, spatial) && (n == 0 || (x && dy)) &&
                   (l->cfg.affine || (!dweight && !dbias)) && (!dz || !state_ok || l->saved_z);
    sbn_shape sh = {n, C, spatial, l->cfg.layout, l->cfg.dtype};
    const uint8_t *mask = l->cfg.activation == SYNCBN_ACT_RELU ? (const uint8_t *)l->mask : NULL;

    if (l->comm->timed_out)
        return after_timeout(l, KIND_BACKWARD);
    data_put(l, KIND_BACKWARD, x, dy, mask, sh, ok && state_ok);
    double unused;
    int rc = exchange(l, KIND_BACKWARD, !ok, !state_ok, 0, ok ? spatial : 0, &unused);
    if (rc != SYNCBN_OK)
        return rc;

    /* t1 = sum g, t2 = sum g*(x - mean), both over the global batch. */
    const double N = l->saved_N;
    int finite = 1;
    for (int64_t c = 0; c < C; c++)
        finite &= isfinite(l->t1[c]) && isfinite(l->t2[c]);
    if (!finite)
        return note(l, SYNCBN_ENONFINITE, "backward: NaN or Inf in the global gradient sums");

    double *k = l->t3, *a = l->t4, *b = l->t2;
    for (int64_t c = 0; c < C; c++) {
        const double is = l->invstd[c], sum_g = l->t1[c], sum_g_xhat = l->t2[c] * is;
        if (dweight)
            dweight[c] = (float)sum_g_xhat; /* d(loss)/d(weight) = sum g * xhat */
        if (dbias)
            dbias[c] = (float)sum_g; /* d(loss)/d(bias) = sum g */
        k[c] = (l->weight ? (double)l->weight[c] : 1.0) * is; /* weight * invstd */
        a[c] = sum_g / N;                                     /* mean of g */
        b[c] = is * sum_g_xhat / N;                           /* invstd * mean of g*xhat */
    }
    if ((dx || dz) && n > 0) {
        sbn_coef_wrap(k, C), sbn_coef_wrap(a, C), sbn_coef_wrap(b, C);
        sbn_backward_dx(dx, dz, x, dy, mask, l->mean, k, a, b, l->fcoef, sh);
    }
    return SYNCBN_OK;
}

int syncbn_backward(syncbn_layer *l, const float *x, const float *dy, int64_t n, int64_t spatial, float *dx,
                    float *dweight, float *dbias)
{
    if (l && l->cfg.dtype != SYNCBN_F32)
        return note(l, SYNCBN_EINVAL, "backward: this layer's elements are bfloat16; use syncbn_backward_ex");
    return syncbn_backward_ex(l, x, dy, n, spatial, dx, NULL, dweight, dbias);
}
