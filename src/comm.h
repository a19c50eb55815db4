/*
 * comm.h - the library's private communicators and the agreement words packed into
 * every collective call.
 *
 * All layers created on one user communicator share ONE private duplicate of it
 * (cached on the user communicator as an MPI attribute, reference counted), so that
 * collective calls of different layers match each other in order: a rank calling
 * layer A while another calls layer B then meets it in the same MPI_Allreduce and the
 * mismatch is seen in the data, instead of each waiting on a different communicator
 * forever.
 *
 * Agreement words: a value v that every rank must agree on (spatial size, layer id,
 * call sequence number, configuration) is split into four 16-bit pieces p, and each
 * rank contributes (p, p^2). After MPI_SUM, all ranks agree iff for every piece
 * P * sum(p^2) == (sum p)^2 (equality case of Cauchy-Schwarz). The sums are exact in
 * double up to 2^21 ranks and in int64 always, so the test needs no extra collective
 * and works inside the same packed buffer as the statistics.
 */
#ifndef SYNCBN_COMM_H
#define SYNCBN_COMM_H

#include <mpi.h>
#include <stdint.h>

#define SBN_AGREE_WORDS 8 /* words per agreed value */

/* The fixed-size first message of every collective call made with a timeout (and of
 * every create): the same length and type (double) whatever the layer, so that calls
 * made out of step always meet a message of their own size. A header of
 * SBN_CALL_HDR words, then SBN_CALL_DATA words: the configuration in a create, the
 * per-channel sums of a FAST layer with 2C <= SBN_CALL_DATA (C <= 64: one message
 * per call), else unused. Layout in layer.c. */
#define SBN_CALL_HDR (3 + 3 * SBN_AGREE_WORDS)
#define SBN_CALL_DATA 128
#define SBN_CALL_WORDS (SBN_CALL_HDR + SBN_CALL_DATA)

typedef struct sbn_comm {
    MPI_Comm inner;      /* private duplicate, MPI_ERRORS_RETURN */
    MPI_Comm outer;      /* the user's communicator the duplicate is cached on */
    int refs;            /* layers using it + 1 while cached on `outer` */
    int cached;          /* still attached to `outer` as an attribute */
    int64_t next_layer;  /* layer ids handed out on this communicator */
    MPI_Datatype wire_type; /* one element of the reproducible wire format (exactsum.h) */
    MPI_Op wire_op;         /* and its merge, sbx_wire_op */
    double call[SBN_CALL_WORDS]; /* buffer of the fixed-size first message */

    /* Set once a collective call on `inner` timed out. Its request cannot be
     * cancelled (MPI forbids cancelling collectives) and may still complete later,
     * writing into its buffer, during any MPI call of this process. So from then on
     * nothing is sent on `inner`, and the record, `inner`, the request and the
     * buffer (`call`, or `orphan`) are never freed: when the last reference goes,
     * the record is parked on a list of its own (still reachable, not reported as a
     * leak). */
    int timed_out;
    MPI_Request pending;  /* the request that never completed */
    void *orphan;         /* a layer's message buffer it was using, or NULL */
    char timed_out_in[64]; /* "backward, call 12 of layer 3", for later messages */
    struct sbn_comm *next_parked;
} sbn_comm;

/* Collective over outer. Returns the shared private communicator of `outer`,
 * creating it on first use; NULL with *err set (SYNCBN_EMPI/ENOMEM) on failure. */
sbn_comm *sbn_comm_acquire(MPI_Comm outer, int *err);

/* Collective. Drops one reference; the last one frees the duplicate (or parks a
 * timed-out record, see above). Never blocks on a timed-out communicator. */
void sbn_comm_release(sbn_comm *c);

/* MPI_Iallreduce(MPI_IN_PLACE, buf, count, type, op) on c->inner, then waits:
 * forever (MPI_Wait) when timeout == 0, else until `deadline` (sbn_now() seconds),
 * polling with MPI_Test and backing off into sleeps, so that a rank waiting for a
 * slow peer does not keep a core busy. Returns SYNCBN_OK, SYNCBN_EMPI, or
 * SYNCBN_ETIMEOUT, in which case c is marked timed out and keeps the request (the
 * caller must give up buf: see sbn_comm.orphan). */
int sbn_comm_iallreduce(sbn_comm *c, void *buf, int count, MPI_Datatype type, MPI_Op op, double timeout,
                        double deadline);

/* Monotonic clock, in seconds. */
double sbn_now(void);

/* Writes the agreement words of v into w[0..7] (as double or as int64). */
void sbn_agree_put_f64(double *w, uint64_t v);
void sbn_agree_put_i64(int64_t *w, uint64_t v);

/* After MPI_SUM over nranks ranks: nonzero iff all ranks put the same value. */
int sbn_agree_ok_f64(const double *w, int nranks);
int sbn_agree_ok_i64(const int64_t *w, int nranks);

#endif /* SYNCBN_COMM_H */
