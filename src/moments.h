/*
 * moments.h - local (one rank, no communication) kernels of batch normalization.
 *
 * These are the named per-channel steps of BN; a synchronized BN inserts its one
 * allreduce between the sums and the normalization.
 *
 * Reduction order (a design decision, see README "Numerics"):
 *   - Every sum runs over one (sample, channel) pair first: a "per-sample partial" in
 *     double, accumulated over the S spatial positions in a fixed order that depends
 *     only on S and the layout (never on the thread count).
 *   - FAST: per-sample partials are added to a per-channel double in sample order.
 *   - REPRODUCIBLE: per-sample partials are deposited into exact accumulators
 *     (exactsum.h), so the total is independent of how samples are grouped. Blocks
 *     of partials whose exact sum can be formed in double are deposited as that one
 *     sum; the accumulated integer, hence every bit, is the same (moments.c).
 *   - A partial is always computed whole by one thread: threads split CHANNELS, or
 *     (narrow NHWC rows) whole SAMPLES whose partials are stored and combined per
 *     channel in sample order afterwards. No result depends on OMP_NUM_THREADS.
 *
 * Shapes: x, dy: [n][C][S] (NCHW) or [n][S][C] (NHWC). Per-channel arrays: [C].
 */
#ifndef SYNCBN_MOMENTS_H
#define SYNCBN_MOMENTS_H

#include <stdint.h>

#include "exactsum.h"
#include "syncbn.h"

typedef struct {
    int64_t n, C, S;
    syncbn_layout layout;
} sbn_shape;

/* Forward sums: s1 = sum x, s2 = sum x^2 per channel.
 * FAST: acc1 == NULL; writes s1[C], s2[C] (overwritten).
 * REPRODUCIBLE: s1 == s2 == NULL; deposits into accumulators acc1[c*W1...],
 *   acc2[c*W2...] (W = sbx_words(SBX_LINEAR/QUADRATIC)), which the caller zeroed. */
void sbn_forward_sums(const float *x, sbn_shape sh, double *s1, double *s2, int64_t *acc1,
                      int64_t *acc2);

/* Backward sums: s1 = sum dy, s2 = sum dy*(x - mean) per channel; same modes. */
void sbn_backward_sums(const float *x, const float *dy, const double *mean, sbn_shape sh, double *s1,
                       double *s2, int64_t *acc1, int64_t *acc2);

/* The elementwise passes read per-channel arrays of C + SBN_COEF_PAD doubles whose
 * last SBN_COEF_PAD entries continue the first C periodically (entry C + j is entry
 * j mod C), so that an NHWC vector of channels c .. c+7 is one load even where it
 * wraps past C - 1. sbn_coef_wrap(a, C) fills them in. */
#define SBN_COEF_PAD 8
void sbn_coef_wrap(double *a, int64_t C);

/* y = (x - mean[c]) * scale[c] + shift[c], in double, rounded once to float.
 * y may equal x. mean, scale, shift: [C + SBN_COEF_PAD], wrapped. Any alignment of
 * x and y (multiples of 4 bytes) gives the same bits. */
void sbn_normalize(float *y, const float *x, const double *mean, const double *scale,
                   const double *shift, sbn_shape sh);

/* dx = k[c] * (dy - a[c] - (x - mean[c]) * b[c]), in double, rounded once.
 * dx may equal dy or x. mean, k, a, b: [C + SBN_COEF_PAD], wrapped. */
void sbn_backward_dx(float *dx, const float *x, const float *dy, const double *mean, const double *k,
                     const double *a, const double *b, sbn_shape sh);

#endif /* SYNCBN_MOMENTS_H */
