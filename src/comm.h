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

typedef struct sbn_comm {
    MPI_Comm inner;      /* private duplicate, MPI_ERRORS_RETURN */
    MPI_Comm outer;      /* the user's communicator the duplicate is cached on */
    int refs;            /* layers using it + 1 while cached on `outer` */
    int cached;          /* still attached to `outer` as an attribute */
    int64_t next_layer;  /* layer ids handed out on this communicator */
} sbn_comm;

/* Collective over outer. Returns the shared private communicator of `outer`,
 * creating it on first use; NULL with *err set (SYNCBN_EMPI/ENOMEM) on failure. */
sbn_comm *sbn_comm_acquire(MPI_Comm outer, int *err);

/* Collective. Drops one reference; the last one frees the duplicate. */
void sbn_comm_release(sbn_comm *c);

#define SBN_AGREE_WORDS 8 /* words per agreed value */

/* Writes the agreement words of v into w[0..7] (as double or as int64). */
void sbn_agree_put_f64(double *w, uint64_t v);
void sbn_agree_put_i64(int64_t *w, uint64_t v);

/* After MPI_SUM over nranks ranks: nonzero iff all ranks put the same value. */
int sbn_agree_ok_f64(const double *w, int nranks);
int sbn_agree_ok_i64(const int64_t *w, int nranks);

#endif /* SYNCBN_COMM_H */
