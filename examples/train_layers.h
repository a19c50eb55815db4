/*
 * train_layers.h - the CNN's layers, one sample at a time (except where noted).
 *
 * Each layer is a *_forward / *_backward pair. Arguments go outputs first, then
 * saved values, then inputs, then sizes. Tensors are float, densely packed.
 *
 * Why one sample at a time: a sample's activations and its contribution to a
 * weight gradient must not depend on which other samples share its rank, so
 * every GEMM has the same shape for every sample (BLAS kernels may pick a
 * different summation order for a different shape). Reproducible mode relies on
 * this; fast mode may use the batched variants marked "batched".
 *
 * Dimension letters: C input channels, O output channels, H, W spatial size,
 * HW = H*W, K = C*9 (im2col rows), IN/OUT linear features, V classes.
 * What it does not do: batch normalization (that is libsyncbn's syncbn_forward).
 */
#ifndef TRAIN_LAYERS_H
#define TRAIN_LAYERS_H

#include <stdint.h>

/* col: (C*9, H*W); x: (C, H, W). 3x3 kernel, padding 1, stride 1. */
void im2col3x3(float *col, const float *x, int C, int H, int W);
/* dx: (C, H, W), OVERWRITTEN with the sum of dcol's contributions; dcol: (C*9, H*W),
 * used as scratch (entries that fall outside the image are zeroed). */
void col2im3x3(float *dx, float *dcol, int C, int H, int W);

/* y: (O, HW); col: (C*9, HW) filled from x: (C, H, W); w: (O, C*9). */
void conv3x3_forward(float *y, float *col, const float *x, const float *w, int C, int O, int H, int W);
/* dw: (O, C*9), dw = beta*dw + dy col^T (beta 0 overwrites: the sample's own
 *   contribution; beta 1 accumulates).
 * dx: (C, H, W) or NULL (then dcol is unused); dcol: (C*9, HW) scratch.
 * dy: (O, HW); col: saved by the forward; w: (O, C*9). */
void conv3x3_backward(float *dw, float *dx, float *dcol, const float *dy, const float *col, const float *w,
                      float beta, int C, int O, int H, int W);

/* y: (C, H/2, W/2); arg: (C, H/2, W/2) index 2*row + column of the max in its 2x2
 * window (on ties the top row, then the left column); x: (C, H, W). H and W even. */
void maxpool2_forward(float *y, uint8_t *arg, const float *x, int C, int H, int W);
/* dx: (C, H, W), overwritten; dy: (C, H/2, W/2). */
void maxpool2_backward(float *dx, const float *dy, const uint8_t *arg, int C, int H, int W);

/* Fused ReLU + maxpool, as the model uses them: y = maxpool2(relu(x)) = max(0, window max),
 * computed without the full-size ReLU pass. arg as for maxpool2_forward. */
void relu_maxpool2_forward(float *y, uint8_t *arg, const float *x, int C, int H, int W);
/* dx: (C, H, W), overwritten: dy flows to the window's maximum when y > 0. */
void relu_maxpool2_backward(float *dx, const float *dy, const float *y, const uint8_t *arg, int C, int H, int W);

/* y = max(x, 0); y may equal x. n elements (any number of samples). */
void relu_forward(float *y, const float *x, int64_t n);
/* dx = dy where y > 0, else 0; dx may equal dy. */
void relu_backward(float *dx, const float *dy, const float *y, int64_t n);

/* One sample. y: (OUT); x: (IN); w: (OUT, IN); b: (OUT). */
void linear_forward(float *y, const float *x, const float *w, const float *b, int IN, int OUT);
/* One sample. dx: (IN) or NULL, overwritten; dw: (OUT, IN) and db: (OUT),
 * dw = beta*dw + dy x^T, db = beta*db + dy. */
void linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w, float beta,
                     int IN, int OUT);
/* Batched (fast mode): y: (n, OUT), x: (n, IN). */
void linear_forward_batched(float *y, const float *x, const float *w, const float *b, int n, int IN, int OUT);
/* Batched: dx: (n, IN) overwritten or NULL; dw, db ACCUMULATE the sum over the n samples. */
void linear_backward_batched(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w, int n,
                             int IN, int OUT);

/* One sample. probs: (V); logits: (V). Returns -log softmax(logits)[label], in double. */
double softmax_ce_forward(float *probs, const float *logits, int label, int V);
/* One sample. dlogits = (probs - onehot(label)) * scale; scale = 1/B for loss = sum/B. */
void softmax_ce_backward(float *dlogits, const float *probs, int label, double scale, int V);

#endif /* TRAIN_LAYERS_H */
