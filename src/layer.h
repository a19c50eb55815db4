/*
 * layer.h - the layer object behind the opaque syncbn_layer handle (internal).
 *
 * Memory: the allocations made at create: `params` (the float arrays the accessors
 * hand out), `stats` (double per-channel arrays), `msg` (the packed allreduce
 * buffer), and for bfloat16 layers `fcoef` (the elementwise passes' float scratch). After create only the ReLU mask is (re)allocated, and only when a training
 * forward brings more elements than any before (steady state: never). A layer never frees
 * `msg` while MPI may still write into it (a timed-out request): see comm.h.
 */
#ifndef SYNCBN_LAYER_H
#define SYNCBN_LAYER_H

#include <stdint.h>

#include "comm.h"
#include "syncbn.h"

struct syncbn_layer {
    syncbn_config cfg;
    sbn_comm *comm; /* shared private communicator of the creating comm */
    int nranks;
    int64_t id;  /* agreed at create: same on every rank */
    int64_t seq; /* collective calls joined so far (forward-train and backward) */

    float *params;       /* one block: weight[C] bias[C] running_mean[C] running_var[C] */
    float *weight;       /* [C] or NULL when !affine */
    float *bias;         /* [C] or NULL when !affine */
    float *running_mean; /* [C] or NULL when !track_running_stats */
    float *running_var;  /* [C] or NULL when !track_running_stats */
    int64_t num_batches_tracked;

    /* Saved by the last successful training forward, consumed by backward. */
    int saved;               /* 1 while mean/invstd belong to the last training forward */
    int64_t saved_n, saved_S; /* its local n and S */
    double saved_N;          /* its global element count per channel */
    double *stats;           /* one block of 6*C doubles: */
    double *mean;            /*   [C] global batch mean */
    double *invstd;          /*   [C] 1/sqrt(var + eps) */
    double *t1, *t2, *t3, *t4; /* [C] each: scratch for sums and coefficients */
    float *fcoef;            /* SYNCBN_BF16: [sbn_apply_scratch_floats(C)], the float
                                coefficients of each normalize / gradient pass (apply.c) */

    /* The ReLU mask of the last training forward (cfg.activation == SYNCBN_ACT_RELU):
     * one bit per element of this rank's x, grown (never shrunk) when a larger batch
     * arrives; the only allocation after create. */
    uint64_t *mask;     /* 64-byte aligned, room for mask_cap bits and one word more */
    int64_t mask_cap;   /* elements it covers */
    int saved_z;        /* that forward was given a z (so a backward may ask for dz) */

    void *msg;          /* packed allreduce buffer: header + per-channel data; NULL once
                           handed to the communicator by a timeout (comm.h: orphan) */
    int64_t msg_words;  /* its length in 8-byte words (double or int64) */
    int64_t *acc;       /* REPRODUCIBLE: this rank's exact accumulators, C LINEAR then C
                           QUADRATIC (exactsum.h); also the fallback message (layer.c).
                           NULL in FAST mode, or once handed to the communicator */

    char err[160];      /* syncbn_last_error: this rank's last error on the layer, "" after success */
};

/* Records the outcome of a call on l for syncbn_last_error: "" for SYNCBN_OK, else
 * "<what> '<path>': <strerror>". Returns rc. For the checkpoint functions. */
int sbn_note_file(syncbn_layer *l, int rc, const char *what, const char *path);

/* Fault injection for tests (not part of the API): the next `after` allocations the
 * layer makes after create (the ReLU mask) succeed, the one after fails; a negative
 * value turns this off (the default). Not thread-safe. */
SYNCBN_EXTERN void sbn_test_fail_alloc(int64_t after);

#endif /* SYNCBN_LAYER_H */
