/*
 * syncbn.h - synchronized batch normalization for data-parallel training over MPI.
 *
 * Each MPI rank holds a slice of the global batch; every rank normalizes with the
 * mean and variance of the WHOLE global batch, so results do not depend on how the
 * batch is split. Conventions follow PyTorch's BatchNorm / SyncBatchNorm.
 *
 * What it does not do: it never calls MPI_Init or MPI_Finalize, never touches
 * MPI_COMM_WORLD on its own, never prints, aborts or exits. Every error is a
 * return code, and a failed call leaves the layer's parameters, running statistics
 * and num_batches_tracked unchanged.
 *
 * Dimension letters used throughout:
 *   n        samples held by THIS rank (n >= 0; a rank may hold none)
 *   C        channels
 *   S        spatial positions per sample and channel (H*W; 1 for [n][C] input)
 *   N        global element count per channel: (sum of n over ranks) * S
 *
 * Tensor layouts (caller-owned float arrays, densely packed):
 *   SYNCBN_NCHW  x[n][C][S]
 *   SYNCBN_NHWC  x[n][S][C]
 *
 * Collectives: calls marked "Collective" must be made by every rank of the layer's
 * communicator, in the same order. All layers created on one communicator share
 * one private duplicate of it, so calls made out of step (rank 0 calling layer A
 * while rank 1 calls layer B) meet each other and are reported as
 * SYNCBN_EMISMATCH, provided both allreduces have the same message size and element
 * type (same C and reduction mode; with a timeout, always). Afterwards the layers stay out of step (every
 * later call answers SYNCBN_EMISMATCH): recreate them or reload a checkpoint.
 *
 * Detected when a timeout is set (cfg.timeout > 0 on the layers involved; see
 * "Deadlines" below), undetectable and possibly hanging without:
 *   - out-of-step calls whose messages differ in size or element type (different C,
 *     or FAST meeting REPRODUCIBLE): with a timeout, SYNCBN_EMISMATCH (or
 *     SYNCBN_ETIMEOUT); without, MPI leaves mismatched collectives undefined (Open
 *     MPI: a fatal MPI_ERR_TRUNCATE, wrong data, or a buffer overflow);
 *   - a rank that skips a collective call altogether, or passes a NULL layer or
 *     MPI_COMM_NULL alone: with a timeout, SYNCBN_ETIMEOUT on the ranks that called;
 *     without, they wait forever (a rank that DIES makes mpirun end the whole job).
 * What cannot be detected at all:
 *   - a backward given other data than its forward, with the same n and spatial;
 *   - out of step between a layer with a timeout and one without on the same
 *     communicator (their collectives never match: the rank with the timeout gets
 *     SYNCBN_ETIMEOUT, the other waits forever).
 *
 * Deadlines: with cfg.timeout = T > 0, a collective call (create, training forward,
 * backward) that has waited T seconds for the other ranks returns SYNCBN_ETIMEOUT on
 * that rank, with the layer unchanged; syncbn_last_error says which call. MPI cannot
 * cancel the collective left pending, so from then on the communicator is dead for
 * syncbn on that rank: every collective call on any layer of it, and any create on
 * it, returns SYNCBN_ETIMEOUT at once without calling MPI. syncbn_destroy does not
 * block, but it leaves allocated, on purpose, the private duplicate communicator, the
 * pending request and its message buffer (one per timed-out communicator: about
 * 1.3 KiB plus the layer's message of O(C) words), since MPI may still write into the
 * buffer. The usual reaction is to report and MPI_Abort. A rank that arrives after
 * the others gave up may still complete that one call with the data they left
 * behind; its next call times out. Waiting polls MPI_Test: busily for the first
 * 5 ms, then in sleeps of at most 1 ms (a rank waiting longer uses ~2% of a core).
 * Cost: one MPI_Iallreduce of a fixed 155-word message per call for FAST layers with
 * C <= 64, plus a second one of the data for larger or REPRODUCIBLE layers; with
 * timeout = 0 nothing changes (one blocking MPI_Allreduce). Figures in docs/performance.md.
 *
 * Threads: kernels may use OpenMP. A layer must not be used by two threads at once;
 * syncbn_create/syncbn_destroy must not run concurrently with each other.
 */
#ifndef SYNCBN_H
#define SYNCBN_H

#include <mpi.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(SYNCBN_BUILDING) && defined(__GNUC__)
#define SYNCBN_EXTERN __attribute__((visibility("default")))
#else
#define SYNCBN_EXTERN
#endif

/* Every int-returning function returns SYNCBN_OK (0) or one of these negative codes.
 * The table is the single source for both the enum and syncbn_strerror(). */
#define SYNCBN_ERRNO_MAP(X)                                                             \
    X(OK, 0, "success")                                                                 \
    X(EINVAL, -1, "invalid argument")                                                   \
    X(ENOMEM, -2, "out of memory")                                                      \
    X(EMISMATCH, -3, "ranks disagree on configuration, shape or call order")            \
    X(EEMPTY, -4, "global count per channel is below 2 in a training forward")          \
    X(ENONFINITE, -5, "NaN or Inf in batch statistics or gradient sums")                \
    X(EMPI, -6, "an MPI call failed")                                                   \
    X(ESTATE, -7, "call out of order (e.g. backward without matching training forward)") \
    X(EIO, -8, "checkpoint file could not be read or written")                         \
    X(EFORMAT, -9, "checkpoint file is corrupt, truncated, or of another shape")         \
    X(ETIMEOUT, -10, "other ranks did not join a collective call in time")

enum {
#define SYNCBN_ERRNO_ENUM(name, value, msg) SYNCBN_##name = value,
    SYNCBN_ERRNO_MAP(SYNCBN_ERRNO_ENUM)
#undef SYNCBN_ERRNO_ENUM
};

/* A static string for any code, "unknown error code" for codes not in the table.
 * Not collective. */
SYNCBN_EXTERN const char *syncbn_strerror(int code);

typedef enum { SYNCBN_NCHW = 0, SYNCBN_NHWC = 1 } syncbn_layout;

/* SYNCBN_FAST: per-channel sums in double, combined by MPI_SUM on doubles. Results
 *   agree with single-process training to rounding error (about 1e-7 relative), but
 *   the low bits depend on the number of ranks and on the split of the batch.
 * SYNCBN_REPRODUCIBLE: per-sample partial sums in double in a fixed order, summed
 *   EXACTLY in integer fixed point across samples and ranks (MPI_SUM on int64 is
 *   exact and associative), then rounded once. y, dx, dweight, dbias and the
 *   running statistics are then bitwise identical for any number of ranks, any
 *   split of the global batch (concatenated in rank order) and any OMP_NUM_THREADS.
 *   Across machines (tested by tests/test_repro_builds.sh in scripts/test.sh): the
 *   same source built for any x86-64 instruction-set level (-march=native with
 *   AVX-512, x86-64-v3 / AVX2, baseline x86-64 via -DSYNCBN_NATIVE=OFF) gives the
 *   same bits. Still assumed, not tested: the same compiler and version, and flags
 *   that keep IEEE semantics (the build adds -ffp-contract=off, i.e. no FMA
 *   contraction, and -fno-fast-math -fno-unsafe-math-optimizations after any user
 *   flags; tested with CMAKE_C_FLAGS=-ffast-math); the default floating-point
 *   environment in the calling threads (round to nearest, no flush-to-zero or
 *   denormals-are-zero: a program LINKED with -ffast-math sets both at startup, as
 *   does torch.set_flush_denormal(True), and then subnormal results flush to zero,
 *   so they differ from a build that does not); a correctly rounded sqrt (the only libm
 *   call; IEEE requires it). Partial sums below 2^-320 in magnitude are rounded to
 *   that granularity (deterministically). */
typedef enum { SYNCBN_FAST = 0, SYNCBN_REPRODUCIBLE = 1 } syncbn_reduction;

/* Element type of the activation tensors x, z, y, dy, dx, dz.
 * SYNCBN_F32:  float.
 * SYNCBN_BF16: bfloat16, passed as uint16_t bit patterns (the upper half of an IEEE
 *   float32; PyTorch's torch.bfloat16). Inputs are widened exactly; each output is
 *   computed in double and rounded ONCE to bfloat16, to nearest-even; a NaN output
 *   is the canonical quiet NaN 0x7FC0.
 * NaN outputs (a NaN z, or NaN x in eval) are NaN for both types; for float their
 *   sign and payload are not part of the bitwise guarantees below (x86 passes on
 *   whichever NaN operand comes first, and vector and scalar steps order operands
 *   differently), for bfloat16 they are canonical and so covered.
 * Weight, bias, running statistics, dweight and dbias are float32 in every case. */
typedef enum { SYNCBN_F32 = 0, SYNCBN_BF16 = 1 } syncbn_dtype;

/* Activation fused after the normalization (and the residual addition, if any):
 *   y = act(BN(x) + z)
 * SYNCBN_ACT_RELU: y = pre > 0 ? pre : +0, where pre = BN(x) + z computed in double
 *   and rounded once to the element type (a NaN pre-activation stays NaN). The
 *   training forward keeps, for the backward, one bit per element (pre > 0) in memory
 *   the layer owns (see syncbn_forward_ex). */
typedef enum { SYNCBN_ACT_NONE = 0, SYNCBN_ACT_RELU = 1 } syncbn_activation;

typedef struct {
    int64_t channels;           /* C >= 1 */
    double eps;                 /* > 0 and finite; default 1e-5; added to the variance inside the sqrt */
    double momentum;            /* in [0,1]; default 0.1; NAN selects the cumulative moving average */
    int affine;                 /* default 1: learnable weight (init 1) and bias (init 0) */
    int track_running_stats;    /* default 1: running_mean (init 0), running_var (init 1) */
    syncbn_layout layout;       /* default SYNCBN_NCHW */
    syncbn_reduction reduction; /* default SYNCBN_FAST */
    double timeout;             /* finite, >= 0; default 0 = wait forever. Seconds a collective
                                   call may wait for the other ranks (see "Deadlines" above);
                                   ranks must agree on it */
    syncbn_dtype dtype;             /* default SYNCBN_F32: element type of x, z, y, dy, dx, dz */
    syncbn_activation activation;   /* default SYNCBN_ACT_NONE: y = act(BN(x) [+ z]) */
} syncbn_config;

typedef struct syncbn_layer syncbn_layer; /* opaque */

/* The defaults above for `channels` channels. Not collective. */
SYNCBN_EXTERN syncbn_config syncbn_config_default(int64_t channels);

/* Collective over comm. Validates cfg, checks that every rank passed the same
 * configuration (else SYNCBN_EMISMATCH on every rank), and attaches the layer to the
 * library's private duplicate of comm (created on first use, MPI_ERRORS_RETURN).
 * On success *out owns the layer; free it with syncbn_destroy. On failure *out is
 * set to NULL. Any intracommunicator works; sub-communicators give group-wise sync.
 * MPI_COMM_NULL and intercommunicators: SYNCBN_EINVAL. With cfg->timeout > 0,
 * SYNCBN_ETIMEOUT if the others do not join within it (a rank whose cfg has no valid
 * timeout waits without limit); always SYNCBN_ETIMEOUT on a communicator that timed
 * out before. */
SYNCBN_EXTERN int syncbn_create(const syncbn_config *cfg, MPI_Comm comm, syncbn_layer **out);

/* Collective (it may free the private communicator). NULL is a no-op. Never blocks
 * after a timeout (see "Deadlines"; it then leaves the pending request's buffers
 * allocated). */
SYNCBN_EXTERN void syncbn_destroy(syncbn_layer *layer);

/* Accessors. Not collective. The layer owns the returned arrays of C floats; they stay
 * valid until syncbn_destroy, and the caller may read or write them (e.g. an optimizer
 * step on weight/bias). NULL when the layer has no such array or layer is NULL. */
SYNCBN_EXTERN float *syncbn_weight(syncbn_layer *layer);       /* [C]; NULL when !affine */
SYNCBN_EXTERN float *syncbn_bias(syncbn_layer *layer);         /* [C]; NULL when !affine */
SYNCBN_EXTERN float *syncbn_running_mean(syncbn_layer *layer); /* [C]; NULL when !track_running_stats */
SYNCBN_EXTERN float *syncbn_running_var(syncbn_layer *layer);  /* [C]; NULL when !track_running_stats */
SYNCBN_EXTERN int64_t syncbn_num_batches_tracked(const syncbn_layer *layer); /* -1 if layer is NULL */
/* Sets num_batches_tracked (e.g. when restoring training state kept elsewhere; it is
 * the divisor of the cumulative average when momentum is NAN). n >= 0, else
 * SYNCBN_EINVAL. Not collective: give every rank the same value. */
SYNCBN_EXTERN int syncbn_set_num_batches_tracked(syncbn_layer *layer, int64_t n);
/* The configuration the layer was created with; SYNCBN_EINVAL if either pointer is NULL. */
SYNCBN_EXTERN int syncbn_get_config(const syncbn_layer *layer, syncbn_config *cfg);

/* Forward.
 *   x: [n][C][S] or [n][S][C] (this rank's n samples); y: same shape, may equal x.
 *   spatial = S >= 1. x and y may be NULL when n == 0.
 * training != 0: Collective. ONE MPI_Allreduce of O(C) words (with a timeout: one or
 *   two MPI_Iallreduce, see "Deadlines") gives the global mean and biased variance; y = (x - mean) / sqrt(var + eps) * weight + bias.
 *   Running statistics (if tracked) move towards the global mean and the unbiased
 *   global variance var*N/(N-1); num_batches_tracked grows by one.
 *   Errors, identical on every rank: SYNCBN_EINVAL (bad argument on any rank, incl.
 *   n*C*S overflowing int64), SYNCBN_EMISMATCH (ranks passed different S, or called
 *   different layers/call sequences), SYNCBN_EEMPTY (N < 2), SYNCBN_ENONFINITE
 *   (NaN/Inf in the batch statistics), SYNCBN_EMPI. With a timeout also
 *   SYNCBN_ETIMEOUT, on the ranks that waited too long (others may see another code).
 *   On error y is unspecified and the layer is unchanged.
 * training == 0: Not collective, never communicates. Uses the running statistics,
 *   or this rank's own batch statistics when track_running_stats == 0 (as PyTorch).
 *   A rank with n == 0 has nothing to normalize and returns SYNCBN_OK in every
 *   configuration. Invalidates the saved training statistics, so a later backward
 *   answers SYNCBN_ESTATE.
 * Buffers: any alignment that float allows (4 bytes), each buffer independently;
 *   the results are the same bits whatever the alignment, and the speed is that of
 *   64-byte aligned buffers (within 10%, docs/performance.md). */
SYNCBN_EXTERN int syncbn_forward(syncbn_layer *layer, const float *x, int64_t n, int64_t spatial,
                                 int training, float *y);

/* Backward. Collective. Must follow a training forward on the same layer with the
 * same x, n and spatial (else SYNCBN_ESTATE on every rank). ONE MPI_Allreduce of
 * the per-channel [sum dy, sum dy*xhat].
 *   dy: like x. dx: like x, may be NULL, may equal dy.
 *   dweight, dbias: [C] or NULL; must be NULL when !affine (else SYNCBN_EINVAL).
 *   dx      = weight*invstd*(dy - sum(dy)/N - xhat*sum(dy*xhat)/N)
 *   dweight = sum(dy*xhat), dbias = sum(dy): summed over the GLOBAL batch and
 *             identical on every rank; OVERWRITTEN, not accumulated. Do not average
 *             them again across ranks.
 * With loss = (sum over the global batch) / (global batch size), every gradient equals
 * single-process training on the whole batch, for any split. Errors as for the
 * training forward, plus SYNCBN_ESTATE. */
SYNCBN_EXTERN int syncbn_backward(syncbn_layer *layer, const float *x, const float *dy, int64_t n,
                                  int64_t spatial, float *dx, float *dweight, float *dbias);

/* Forward and backward for every dtype, with the residual input z and the fused
 * activation of the configuration. Buffers are of the layer's dtype (float, or
 * uint16_t bfloat16 bit patterns), shaped like x, at any alignment of the element
 * type; everything not said here is as for syncbn_forward / syncbn_backward.
 *
 * syncbn_forward_ex: y = act(BN(x) + z), in training and in eval; z NULL means no
 *   addition. BN(x) + z is formed in double and rounded once to the element type.
 *   y may equal x or z. A training forward of a SYNCBN_ACT_RELU layer records the
 *   ReLU mask (1 bit per element) in memory the layer owns. That memory only grows,
 *   when a batch larger than any before arrives; if growing fails on any rank, the call
 *   returns SYNCBN_ENOMEM on every rank with parameters, running statistics and
 *   num_batches_tracked unchanged (the failing rank keeps its old mask; a later
 *   backward answers SYNCBN_ESTATE, as after any failed training forward).
 *   Collective when training, as syncbn_forward.
 * syncbn_backward_ex: Collective. Must follow a training forward with the same x, n
 *   and spatial (and the same z, whose value the mask already holds).
 *     g       = dy where the last training forward's pre-activation (rounded to the
 *               element type) was > 0, else 0 (SYNCBN_ACT_RELU: PyTorch's ReLU
 *               backward, so fused BN+ReLU gives the bits of BN followed by ReLU);
 *               g = dy for SYNCBN_ACT_NONE.
 *     dz      = g, written when dz is not NULL. dz may be non-NULL only if that
 *               training forward was given a z (else SYNCBN_EINVAL on every rank).
 *     dx, dweight, dbias: those of syncbn_backward for the upstream gradient g.
 *   dx may equal dy or x; dz may equal dy. dx and dz may both be NULL (dweight and
 *   dbias only).
 *
 * syncbn_forward / syncbn_backward are these with z = dz = NULL, for SYNCBN_F32
 * layers (they apply the configured activation); on a SYNCBN_BF16 layer they return
 * SYNCBN_EINVAL (on every rank, since ranks agree on the dtype at create). */
SYNCBN_EXTERN int syncbn_forward_ex(syncbn_layer *layer, const void *x, const void *z, int64_t n,
                                    int64_t spatial, int training, void *y);
SYNCBN_EXTERN int syncbn_backward_ex(syncbn_layer *layer, const void *x, const void *dy, int64_t n,
                                     int64_t spatial, void *dx, void *dz, float *dweight, float *dbias);

/* This rank's last error on the layer, as a human-readable sentence naming the call
 * and the cause, e.g. "backward, call 1234 of layer 3 (C = 64): no answer from the
 * other ranks after 600.0 s" or "forward: spatial differs between ranks"; "" when
 * the last call on the layer succeeded. Set by syncbn_forward, syncbn_backward,
 * syncbn_save, syncbn_load and syncbn_set_num_batches_tracked (not by the
 * accessors). A static description for a NULL layer. The layer owns the string; it
 * stays valid until the next call on the layer. Not collective. */
SYNCBN_EXTERN const char *syncbn_last_error(const syncbn_layer *layer);

/* Checkpoints of configuration, parameters, running statistics and
 * num_batches_tracked. Not collective: each rank may save or load its own copy.
 * syncbn_save writes atomically (temporary file, fsync, rename) a versioned,
 * CRC-32-checked file (version 2: it also records dtype and activation, which a
 * load must match, else SYNCBN_EFORMAT; version-1 files, which predate them, still
 * load into any layer of the same shape). syncbn_load rejects truncated, corrupt, wrong-version or
 * wrong-shape files with SYNCBN_EFORMAT, unreadable ones with SYNCBN_EIO, and leaves
 * the layer unchanged on any error. */
SYNCBN_EXTERN int syncbn_save(const syncbn_layer *layer, const char *path);
SYNCBN_EXTERN int syncbn_load(syncbn_layer *layer, const char *path);

#ifdef __cplusplus
}
#endif

#endif /* SYNCBN_H */
