/*
 * train_model.h - the Fashion-MNIST CNN, its data-parallel training step, SGD,
 * parameter hash and checkpoints.
 *
 *   x (n, 1, 28, 28)
 *   conv3x3 1->16, pad 1, no bias -> SyncBN(16) -> ReLU -> maxpool 2  (n, 16, 14, 14)
 *   conv3x3 16->32, pad 1, no bias -> SyncBN(32) -> ReLU -> maxpool 2 (n, 32, 7, 7)
 *   linear 1568 -> 10 -> softmax cross-entropy, loss = (sum over the GLOBAL batch) / B
 *
 * Where each ReLU runs:
 *   fused (default): in the BN layer (SYNCBN_ACT_RELU, syncbn_forward_ex / _backward_ex),
 *     which keeps a 1-bit mask of (pre-activation > 0) for the backward; the pooling
 *     after it is plain maxpool2.
 *   unfused (syncbn-train --unfused, the path before the library could fuse): a plain
 *     BN layer (SYNCBN_ACT_NONE, syncbn_forward / syncbn_backward) and the ReLU folded
 *     into the pooling (relu_maxpool2: relu(max) = max(relu); the gradient reaches the
 *     window's maximum only where that maximum is > 0).
 *   Both compute the same bits: the forward values are max(0, window max) either way,
 *   and both backward passes let the gradient through exactly where the ReLU's input
 *   (BN's output rounded to float) is > 0 and the element is its window's maximum, and
 *   write +0 elsewhere (the library's convention is PyTorch's: its ReLU backward tests
 *   the ReLU's input). So the parameters' hash does not depend on the choice
 *   (tests/test_train_fused.sh, and test_train_layers' fused_matches_unfused).
 *
 * Each rank runs the model on its own contiguous slice of n samples. Gradients:
 *   TRAIN_REPRODUCIBLE: every sample's weight-gradient contribution is computed
 *     with the same GEMM shapes, deposited into one exact accumulator per
 *     parameter (exactsum.h); all accumulators (plus one for the loss) are summed
 *     exactly over ranks (one reduce-scatter of the integer words), each rank
 *     rounds its share once, and the rounded values are all-gathered. The result
 *     depends only on the global batch, not on the number of ranks or the split.
 *   TRAIN_FAST: per-rank float sums, one MPI_Allreduce on floats.
 * BN weight/bias gradients come from syncbn_backward, which already sums over the
 * whole communicator; with sync BN only rank 0 contributes them to the reduction.
 * With local BN (a layer per rank over MPI_COMM_SELF) they are per-rank sums and
 * are combined like the others.
 *
 * All parameters live in one allocation (params), gradients in another (grads)
 * with the same layout, so the optimizer and the hash see one flat array.
 */
#ifndef TRAIN_MODEL_H
#define TRAIN_MODEL_H

#include <mpi.h>
#include <stdint.h>

#include "exactsum.h"
#include "syncbn.h"

enum { TRAIN_BN_SYNC = 0, TRAIN_BN_LOCAL = 1 };
enum { TRAIN_REPRODUCIBLE = 0, TRAIN_FAST = 1 };

#define C1 16          /* conv1 output channels */
#define C2 32          /* conv2 output channels */
#define HW1 (28 * 28)  /* conv1 spatial positions */
#define HW2 (14 * 14)  /* conv2 spatial positions */
#define FC_IN (C2 * 7 * 7)
#define FC_OUT 10
/* per-sample gradient vector: conv1 w, conv2 w, fc w, fc b */
#define NG (C1 * 9 + C2 * C1 * 9 + FC_OUT * FC_IN + FC_OUT)

typedef struct {
    int bn_mode, reduction;
    int fused;     /* 1: the ReLUs run inside the BN layers; 0: in the pooling (see above) */
    MPI_Comm comm; /* the data-parallel communicator (MPI_COMM_WORLD) */

    // parameters, one allocation; the views below point into it
    int64_t nparams;
    float *params;   /* (nparams) */
    float *grads;    /* (nparams), same layout, global gradient after train_model_step */
    float *momentum; /* (nparams), SGD velocity */
    float *conv1_w;  /* (C1, 1*9) */
    float *bn1_w, *bn1_b; /* (C1) copied into the syncbn layer before each forward */
    float *conv2_w;  /* (C2, C1*9) */
    float *bn2_w, *bn2_b; /* (C2) */
    float *fc_w;     /* (FC_OUT, FC_IN) */
    float *fc_b;     /* (FC_OUT) */
    syncbn_layer *bn1, *bn2;

    // activations for up to cap local samples
    int64_t cap;
    float *x;        /* (cap, 1, 28, 28) */
    float *col1;     /* (cap, 9, HW1) */
    float *c1;       /* (cap, C1, HW1) conv1 output = BN1 input */
    float *b1;       /* (cap, C1, HW1) BN1 output: relu(BN) when fused, else BN (the ReLU
                        is then folded into the pooling) */
    float *p1;       /* (cap, C1, HW2) */
    uint8_t *arg1;   /* (cap, C1, HW2) */
    float *col2;     /* (cap, C1*9, HW2) */
    float *c2;       /* (cap, C2, HW2) */
    float *b2;       /* (cap, C2, HW2) BN2 output, as b1 */
    float *p2;       /* (cap, FC_IN) */
    uint8_t *arg2;   /* (cap, FC_IN) */
    float *logits;   /* (cap, FC_OUT) */
    float *probs;    /* (cap, FC_OUT) */
    // gradients of activations
    float *dlogits;  /* (cap, FC_OUT) */
    float *dp2;      /* (cap, FC_IN) */
    float *db2;      /* (cap, C2, HW2), becomes dc2 in place */
    float *dp1;      /* (cap, C1, HW2) */
    float *db1;      /* (cap, C1, HW1), becomes dc1 in place */
    float *dcol2;    /* (C1*9, HW2) one sample's scratch */
    float *dw_all;   /* (cap, NG) reproducible mode: each sample's own contribution to the
                        conv1, conv2 and linear gradients, deposited after the backward */

    // reproducible mode: one exact accumulator per parameter, plus the loss
    sbx_format fmt;
    int64_t *acc;    /* (nparams + 1, sbx_words(fmt)), all zero between steps */
    double *rounded; /* (nparams + 1) the rounded sums, gathered from every rank's share */
    int *rs_counts;  /* (3, nranks) reduce-scatter counts, gather counts, displacements */
} train_model;

/* Collective over comm (creates the BN layers). Parameters are initialized from
 * seed exactly as every other rank does (PyTorch's default uniform bounds). */
// Seconds a synchronized BN call may wait for the other ranks (syncbn_config.timeout;
// 0 = forever). Read by train_model_init; set it before. syncbn-train: --timeout.
extern double train_bn_timeout;
// 1 (default): the ReLU after each BN is fused into the BN layer; 0: a plain BN layer
// and the ReLU in the pooling (syncbn-train --unfused). Read by train_model_init.
extern int train_bn_fused;
void train_model_init(train_model *m, uint64_t seed, int bn_mode, int reduction, int64_t cap, MPI_Comm comm);
void train_model_free(train_model *m);

/* Collective. Forward + backward on this rank's n samples (x: (n, 784) normalized
 * pixels, labels: (n)), global batch size B; leaves the global gradient in
 * m->grads and returns the global loss (sum over the global batch) / B. */
double train_model_step(train_model *m, const float *x, const uint8_t *labels, int64_t n, int64_t B);

/* Not collective. PyTorch's SGD: g = grad + wd*p; v = mu*v + g; p -= lr*v. */
void train_model_sgd(train_model *m, float lr, float mu, float wd);

/* Not collective. Eval-mode forward (BN uses running statistics) of n samples in
 * chunks; returns how many are classified correctly. */
int64_t train_model_correct(train_model *m, const float *x, const uint8_t *labels, int64_t n);

/* Not collective. SHA-256 of all parameter bytes followed by both BN layers'
 * running mean and variance (native little-endian floats). */
void train_model_hash(train_model *m, char hex[65]);

/* Checkpoints: parameters, velocity, BN running statistics (once, or per rank for
 * local BN), the next step and the run's seed and batch size. Written atomically
 * (temp file, fsync, rename) by rank 0, CRC-32 checked. train_model_save is
 * collective over m->comm; train_model_load is not (every rank reads the file).
 * Both return 0, or -1 with a reason in err (on every rank for save). */
int train_model_save(const train_model *m, const char *path, int64_t next_step, uint64_t seed, int64_t batch,
                     char *err, int errlen);
int train_model_load(train_model *m, const char *path, int64_t *next_step, uint64_t seed, int64_t batch, char *err,
                     int errlen);

/* Reproducible mode's deposit (exposed for tests): acc[i] += v[s*stride + i] exactly
 * for i < len and s < n, where acc holds len accumulators of format f side by side.
 * Any float, including NaN, +-Inf and denormals, is handled as sbx_add would. */
void train_deposit_samples(int64_t *acc, sbx_format f, const float *v, int64_t stride, int64_t n, int64_t len);

#endif /* TRAIN_MODEL_H */
