/* comm.c - shared private communicators, waiting with a deadline, and the
 * agreement-word encoding (see comm.h). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, nanosleep */
#include "comm.h"

#include <math.h>

#include <stdlib.h>
#include <time.h>

#include "exactsum.h"
#include "syncbn.h"

static int comm_keyval = MPI_KEYVAL_INVALID;
static int comm_live = 0; /* sbn_comm records alive; the keyval is freed with the last */
static sbn_comm *parked = NULL; /* timed-out records: kept, never freed (comm.h) */

static void comm_unref(sbn_comm *c)
{
    if (--c->refs == 0) {
        if (c->timed_out) {
            c->next_parked = parked;
            parked = c;
        } else {
            MPI_Op_free(&c->wire_op);
            MPI_Type_free(&c->wire_type);
            MPI_Comm_free(&c->inner);
            free(c);
        }
        comm_live--;
    }
}

/* Not from inside the delete callback: only once MPI is done with the attribute. */
static void keyval_release_if_unused(void)
{
    if (comm_live == 0 && comm_keyval != MPI_KEYVAL_INVALID)
        MPI_Comm_free_keyval(&comm_keyval);
}

/* Called by MPI when the user frees `outer` or we delete the attribute. */
static int comm_delete_fn(MPI_Comm outer, int keyval, void *attr, void *extra)
{
    (void)outer, (void)keyval, (void)extra;
    sbn_comm *c = attr;
    c->cached = 0;
    comm_unref(c);
    return MPI_SUCCESS;
}

sbn_comm *sbn_comm_acquire(MPI_Comm outer, int *err)
{
    *err = SYNCBN_EMPI;
    if (comm_keyval == MPI_KEYVAL_INVALID &&
        MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, comm_delete_fn, &comm_keyval, NULL) != MPI_SUCCESS)
        return NULL;

    sbn_comm *c = NULL;
    int found = 0;
    if (MPI_Comm_get_attr(outer, comm_keyval, &c, &found) != MPI_SUCCESS)
        return NULL;
    if (found) {
        c->refs++;
        *err = SYNCBN_OK;
        return c;
    }

    /* Duplicate before allocating: every rank must take part in MPI_Comm_dup even
     * if its own allocation is about to fail, or the others would hang. */
    MPI_Comm inner;
    if (MPI_Comm_dup(outer, &inner) != MPI_SUCCESS)
        return NULL;
    c = calloc(1, sizeof *c);
    if (!c) {
        MPI_Comm_free(&inner);
        *err = SYNCBN_ENOMEM;
        return NULL;
    }
    /* Local calls: the reproducible mode's element type and merge, per communicator
     * (freed with it). */
    if (MPI_Type_contiguous(SBX_WIRE_WORDS, MPI_INT64_T, &c->wire_type) != MPI_SUCCESS) {
        MPI_Comm_free(&inner);
        free(c);
        return NULL;
    }
    if (MPI_Type_commit(&c->wire_type) != MPI_SUCCESS || MPI_Op_create(sbx_wire_op, 1, &c->wire_op) != MPI_SUCCESS) {
        MPI_Type_free(&c->wire_type);
        MPI_Comm_free(&inner);
        free(c);
        return NULL;
    }
    c->inner = inner;
    comm_live++;
    MPI_Comm_set_errhandler(c->inner, MPI_ERRORS_RETURN);
    c->outer = outer;
    c->refs = 2; /* the caller's and the attribute's */
    c->cached = 1;
    if (MPI_Comm_set_attr(outer, comm_keyval, c) != MPI_SUCCESS) {
        c->refs = 1;
        comm_unref(c);
        keyval_release_if_unused();
        return NULL;
    }
    *err = SYNCBN_OK;
    return c;
}

void sbn_comm_release(sbn_comm *c)
{
    if (!c)
        return;
    if (c->refs == 2 && c->cached && !c->timed_out) {
        /* Last layer gone: detach from the user's communicator; its delete
         * callback drops the attribute's reference. A timed-out record stays
         * attached, so that a later create on `outer` answers SYNCBN_ETIMEOUT at
         * once instead of starting a new duplicate that only some ranks join. */
        c->refs--;
        MPI_Comm_delete_attr(c->outer, comm_keyval);
    } else {
        comm_unref(c);
    }
    keyval_release_if_unused();
}

/* ---- waiting with a deadline ---- */

double sbn_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Polling schedule: MPI_Test back to back for the first SPIN seconds, as a blocking
 * MPI call would (the usual wait is a peer a little behind in its compute, and a
 * sleeping or yielding rank on a busy machine gets its core back only after a
 * scheduler slice: measured, a 1 ms spin that called sched_yield after 100 us cost
 * the training example ~10% of its throughput under load); then sleeps of 1/8 of the
 * time waited so far, clamped to [NAP_MIN, NAP_MAX]. So a long wait costs about a
 * thousand wake-ups per second (~2% of a core) instead of a busy core, and a late
 * peer is noticed within ~12% of the time already waited (at most NAP_MAX).
 * Proportional rather than doubling naps matter because an allreduce takes several
 * rounds, each of which needs both ranks to call MPI_Test: with doubling naps, two
 * napping ranks wake each other up a nap at a time (measured: 3 ms for a 0.3 ms call
 * under load). Measured in docs/performance.md ("Cost of a timeout"). */
#define SPIN 5e-3
#define NAP_MIN 10e-6
#define NAP_MAX 1e-3

int sbn_comm_iallreduce(sbn_comm *c, void *buf, int count, MPI_Datatype type, MPI_Op op, double timeout,
                        double deadline)
{
    MPI_Request req;
    if (MPI_Iallreduce(MPI_IN_PLACE, buf, count, type, op, c->inner, &req) != MPI_SUCCESS)
        return SYNCBN_EMPI;
    if (timeout == 0)
        return MPI_Wait(&req, MPI_STATUS_IGNORE) == MPI_SUCCESS ? SYNCBN_OK : SYNCBN_EMPI;

    const double start = sbn_now();
    for (;;) {
        int done = 0;
        if (MPI_Test(&req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return SYNCBN_EMPI; /* a completed-with-error request is freed by MPI_Test */
        if (done)
            return SYNCBN_OK;
        const double now = sbn_now();
        if (now > deadline) {
            c->timed_out = 1;
            c->pending = req;
            return SYNCBN_ETIMEOUT;
        }
        if (now < start + SPIN)
            continue;
        double d = (now - start) / 8;
        d = d < NAP_MIN ? NAP_MIN : d > NAP_MAX ? NAP_MAX : d;
        d = d < deadline - now ? d : deadline - now;
        struct timespec ts = {0, (long)(d * 1e9)};
        nanosleep(&ts, NULL);
    }
}

/* ---- agreement words ---- */

void sbn_agree_put_f64(double *w, uint64_t v)
{
    for (int k = 0; k < 4; k++) {
        double p = (double)((v >> (16 * k)) & 0xffffu);
        w[2 * k] = p;
        w[2 * k + 1] = p * p;
    }
}

void sbn_agree_put_i64(int64_t *w, uint64_t v)
{
    for (int k = 0; k < 4; k++) {
        int64_t p = (int64_t)((v >> (16 * k)) & 0xffffu);
        w[2 * k] = p;
        w[2 * k + 1] = p * p;
    }
}

/* All P pieces equal iff P*sum(p^2) == (sum p)^2; both sides fit unsigned __int128. */
static int agree_piece(uint64_t s1, uint64_t s2, int nranks)
{
    return (unsigned __int128)s2 * (unsigned)nranks == (unsigned __int128)s1 * s1;
}

/* A reduced agreement word is a sum of small non-negative integers. A word that is
 * not (a message of another call, e.g. per-channel sums where a create expected
 * its configuration) means disagreement, and must not reach the integer
 * conversion, which is undefined for negative, huge or non-finite values. */
static int agree_word_f64(double v) { return v >= 0 && v < 0x1p64 && v == floor(v); }

int sbn_agree_ok_f64(const double *w, int nranks)
{
    for (int k = 0; k < 4; k++)
        if (!agree_word_f64(w[2 * k]) || !agree_word_f64(w[2 * k + 1]) ||
            !agree_piece((uint64_t)w[2 * k], (uint64_t)w[2 * k + 1], nranks))
            return 0;
    return 1;
}

int sbn_agree_ok_i64(const int64_t *w, int nranks)
{
    for (int k = 0; k < 4; k++)
        if (!agree_piece((uint64_t)w[2 * k], (uint64_t)w[2 * k + 1], nranks))
            return 0;
    return 1;
}
