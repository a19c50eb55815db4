/*
 * train_layers.c - see train_layers.h. GEMMs go to OpenBLAS (cblas_sgemm), which
 * the program pins to one thread: parallelism comes from MPI ranks.
 */
#include "train_layers.h"

#include <cblas.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Row (c, ky, kx) of col is the image shifted by (ky-1, kx-1). On the flattened
// image that is ONE contiguous copy at offset (ky-1)*W + (kx-1) over the output rows
// that stay inside vertically, after which the column that wrapped around a row end
// (x = 0 for kx = 0, x = W-1 for kx = 2) is zeroed: long loops, not 3-element ones.
void im2col3x3(float *col, const float *x, int C, int H, int W) {
    int HW = H * W;
    for (int c = 0; c < C; c++) {
        const float *xc = x + (int64_t)c * HW;
        for (int ky = 0; ky < 3; ky++) {
            int y0 = ky == 0 ? 1 : 0, y1 = ky == 2 ? H - 1 : H; // rows with 0 <= y+ky-1 < H
            for (int kx = 0; kx < 3; kx++) {
                float *row = col + ((int64_t)(c * 3 + ky) * 3 + kx) * HW;
                int shift = (ky - 1) * W + (kx - 1);
                int p0 = y0 * W + (kx == 0), p1 = y1 * W - (kx == 2); // stay inside x's memory
                for (int p = 0; p < p0; p++) row[p] = 0.0f;
                for (int p = p0; p < p1; p++) row[p] = xc[p + shift];
                for (int p = p1; p < HW; p++) row[p] = 0.0f;
                if (kx == 0)
                    for (int y = y0; y < y1; y++) row[y * W] = 0.0f;
                if (kx == 2)
                    for (int y = y0; y < y1; y++) row[y * W + W - 1] = 0.0f;
            }
        }
    }
}

// The adjoint of im2col3x3, by the same flat shifts. Every pixel receives its
// contributions in the fixed (ky, kx) order. dcol is scratch: its wrapped-around
// entries are zeroed first so that they add nothing.
void col2im3x3(float *dx, float *dcol, int C, int H, int W) {
    int HW = H * W;
    memset(dx, 0, sizeof(float) * (size_t)C * HW);
    for (int c = 0; c < C; c++) {
        float *dc = dx + (int64_t)c * HW;
        for (int ky = 0; ky < 3; ky++) {
            int y0 = ky == 0 ? 1 : 0, y1 = ky == 2 ? H - 1 : H;
            for (int kx = 0; kx < 3; kx++) {
                float *row = dcol + ((int64_t)(c * 3 + ky) * 3 + kx) * HW;
                int shift = (ky - 1) * W + (kx - 1);
                int p0 = y0 * W + (kx == 0), p1 = y1 * W - (kx == 2);
                if (kx == 0)
                    for (int y = y0; y < y1; y++) row[y * W] = 0.0f;
                if (kx == 2)
                    for (int y = y0; y < y1; y++) row[y * W + W - 1] = 0.0f;
                for (int p = p0; p < p1; p++) dc[p + shift] += row[p];
            }
        }
    }
}

void conv3x3_forward(float *y, float *col, const float *x, const float *w, int C, int O, int H, int W) {
    int K = C * 9, HW = H * W;
    im2col3x3(col, x, C, H, W);
    // y (O, HW) = w (O, K) @ col (K, HW)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, O, HW, K, 1.0f, w, K, col, HW, 0.0f, y, HW);
}

void conv3x3_backward(float *dw, float *dx, float *dcol, const float *dy, const float *col, const float *w,
                      float beta, int C, int O, int H, int W) {
    int K = C * 9, HW = H * W;
    // dw (O, K) = beta*dw + dy (O, HW) @ col^T (HW, K)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, O, K, HW, 1.0f, dy, HW, col, HW, beta, dw, K);
    if (dx) {
        // dcol (K, HW) = w^T (K, O) @ dy (O, HW), then scattered back to the pixels
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, K, HW, O, 1.0f, w, K, dy, HW, 0.0f, dcol, HW);
        col2im3x3(dx, dcol, C, H, W);
    }
}

// One output row: windows over rows r0, r1. On ties the top row and then the left
// column win: a fixed rule, so the gradient's route is deterministic.
// arg = 2*row + column within the window.
static void pool_row(float *yo, uint8_t *ao, const float *r0, const float *r1, int Wo, int relu) {
    int ox = 0;
#if defined(__AVX512F__)
    // 16 windows at a time: vertical max of 32 columns, then even/odd columns apart
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 zero = _mm512_setzero_ps(), two = _mm512_set1_ps(2.0f), one = _mm512_set1_ps(1.0f);
    for (; ox < Wo; ox += 16) {
        int n = 2 * (Wo - ox) < 32 ? 2 * (Wo - ox) : 32; // input columns in this chunk
        __mmask16 mlo = (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1);
        __mmask16 mhi = (__mmask16)(n >= 32 ? 0xFFFF : n > 16 ? (1u << (n - 16)) - 1 : 0);
        const float *a0 = r0 + 2 * ox, *a1 = r1 + 2 * ox;
        __m512 t0 = _mm512_maskz_loadu_ps(mlo, a0), t1 = _mm512_maskz_loadu_ps(mhi, a0 + 16);
        __m512 b0 = _mm512_maskz_loadu_ps(mlo, a1), b1 = _mm512_maskz_loadu_ps(mhi, a1 + 16);
        __mmask16 bot0 = _mm512_cmp_ps_mask(b0, t0, _CMP_GT_OQ), bot1 = _mm512_cmp_ps_mask(b1, t1, _CMP_GT_OQ);
        __m512 v0 = _mm512_mask_mov_ps(t0, bot0, b0), v1 = _mm512_mask_mov_ps(t1, bot1, b1);
        __m512 r0f = _mm512_maskz_mov_ps(bot0, two), r1f = _mm512_maskz_mov_ps(bot1, two); // 2*row
        __m512 le = _mm512_permutex2var_ps(v0, even, v1), ri = _mm512_permutex2var_ps(v0, odd, v1);
        __m512 rle = _mm512_permutex2var_ps(r0f, even, r1f), rri = _mm512_permutex2var_ps(r0f, odd, r1f);
        __mmask16 right = _mm512_cmp_ps_mask(ri, le, _CMP_GT_OQ);
        __m512 m = _mm512_mask_mov_ps(le, right, ri);
        __m512 k = _mm512_mask_mov_ps(rle, right, _mm512_add_ps(rri, one));
        if (relu) m = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ), m);
        __mmask16 mout = (__mmask16)(Wo - ox >= 16 ? 0xFFFF : (1u << (Wo - ox)) - 1);
        _mm512_mask_storeu_ps(yo + ox, mout, m);
        _mm512_mask_cvtepi32_storeu_epi8(ao + ox, mout, _mm512_cvttps_epi32(k));
    }
#endif
    for (; ox < Wo; ox++) {
        float a = r0[2 * ox], b = r0[2 * ox + 1], c = r1[2 * ox], d = r1[2 * ox + 1];
        int lb = c > a, rb = d > b;      // bottom row wins the column only if strictly greater
        float l = lb ? c : a, r = rb ? d : b;
        int right = r > l;               // right column wins only if strictly greater
        float m = right ? r : l;
        ao[ox] = (uint8_t)(right ? 2 * rb + 1 : 2 * lb);
        // relu(max) = max(relu): negative windows give 0 and pass no gradient
        yo[ox] = relu && !(m > 0.0f) ? 0.0f : m;
    }
}

static void pool_forward(float *y, uint8_t *arg, const float *x, int C, int H, int W, int relu) {
    int Ho = H / 2, Wo = W / 2;
    for (int c = 0; c < C; c++) {
        for (int oy = 0; oy < Ho; oy++) {
            const float *r0 = x + ((int64_t)c * H + 2 * oy) * W;
            pool_row(y + ((int64_t)c * Ho + oy) * Wo, arg + ((int64_t)c * Ho + oy) * Wo, r0, r0 + W, Wo, relu);
        }
    }
}

// Writes the whole 2x2 window (dy at the maximum, 0 elsewhere), so dx needs no
// clearing beforehand.
static void pool_backward_row(float *d0, float *d1, const float *dy, const float *yo, const uint8_t *a, int Wo) {
    int ox = 0;
#if defined(__AVX512F__)
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    const __m512 zero = _mm512_setzero_ps();
    for (; ox < Wo; ox += 16) {
        int nw = Wo - ox < 16 ? Wo - ox : 16;
        __mmask16 mw = (__mmask16)(nw == 16 ? 0xFFFF : (1u << nw) - 1);
        __m512 g = _mm512_maskz_loadu_ps(mw, dy + ox);
        if (yo) g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(mw, yo + ox), zero, _CMP_GT_OQ), g);
        __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mw, a + ox));
        __m512 g0 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(0)), g);
        __m512 g1 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(1)), g);
        __m512 g2 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(2)), g);
        __m512 g3 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(3)), g);
        // interleave (left, right) columns back into image rows
        int n = 2 * nw;
        __mmask16 mlo = (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1);
        __mmask16 mhi = (__mmask16)(n >= 32 ? 0xFFFF : n > 16 ? (1u << (n - 16)) - 1 : 0);
        _mm512_mask_storeu_ps(d0 + 2 * ox, mlo, _mm512_permutex2var_ps(g0, lo, g1));
        _mm512_mask_storeu_ps(d0 + 2 * ox + 16, mhi, _mm512_permutex2var_ps(g0, hi, g1));
        _mm512_mask_storeu_ps(d1 + 2 * ox, mlo, _mm512_permutex2var_ps(g2, lo, g3));
        _mm512_mask_storeu_ps(d1 + 2 * ox + 16, mhi, _mm512_permutex2var_ps(g2, hi, g3));
    }
#endif
    for (; ox < Wo; ox++) {
        float g = yo && !(yo[ox] > 0.0f) ? 0.0f : dy[ox];
        int k = a[ox];
        d0[2 * ox] = k == 0 ? g : 0.0f;
        d0[2 * ox + 1] = k == 1 ? g : 0.0f;
        d1[2 * ox] = k == 2 ? g : 0.0f;
        d1[2 * ox + 1] = k == 3 ? g : 0.0f;
    }
}

static void pool_backward(float *dx, const float *dy, const float *y, const uint8_t *arg, int C, int H, int W) {
    int Ho = H / 2, Wo = W / 2;
    for (int c = 0; c < C; c++) {
        for (int oy = 0; oy < Ho; oy++) {
            int64_t o = ((int64_t)c * Ho + oy) * Wo;
            float *d0 = dx + ((int64_t)c * H + 2 * oy) * W;
            pool_backward_row(d0, d0 + W, dy + o, y ? y + o : NULL, arg + o, Wo);
        }
    }
}

void maxpool2_forward(float *y, uint8_t *arg, const float *x, int C, int H, int W) {
    pool_forward(y, arg, x, C, H, W, 0);
}
void maxpool2_backward(float *dx, const float *dy, const uint8_t *arg, int C, int H, int W) {
    pool_backward(dx, dy, NULL, arg, C, H, W);
}
void relu_maxpool2_forward(float *y, uint8_t *arg, const float *x, int C, int H, int W) {
    pool_forward(y, arg, x, C, H, W, 1);
}
void relu_maxpool2_backward(float *dx, const float *dy, const float *y, const uint8_t *arg, int C, int H, int W) {
    pool_backward(dx, dy, y, arg, C, H, W);
}

void relu_forward(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void relu_backward(float *dx, const float *dy, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

void linear_forward(float *y, const float *x, const float *w, const float *b, int IN, int OUT) {
    // y (OUT) = w (OUT, IN) @ x (IN) + b
    cblas_sgemv(CblasRowMajor, CblasNoTrans, OUT, IN, 1.0f, w, IN, x, 1, 0.0f, y, 1);
    for (int o = 0; o < OUT; o++) y[o] += b[o];
}

void linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w, float beta,
                     int IN, int OUT) {
    if (dx) cblas_sgemv(CblasRowMajor, CblasTrans, OUT, IN, 1.0f, w, IN, dy, 1, 0.0f, dx, 1);
    // dw[o][i] = beta*dw[o][i] + dy[o]*x[i]: a plain loop, so the float product is the
    // same no matter which BLAS kernel would have been picked
    for (int o = 0; o < OUT; o++) {
        float *row = dw + (int64_t)o * IN;
        float g = dy[o];
        if (beta == 0.0f)
            for (int i = 0; i < IN; i++) row[i] = g * x[i];
        else
            for (int i = 0; i < IN; i++) row[i] = beta * row[i] + g * x[i];
        db[o] = beta == 0.0f ? g : beta * db[o] + g;
    }
}

void linear_forward_batched(float *y, const float *x, const float *w, const float *b, int n, int IN, int OUT) {
    if (n <= 0) return;
    // y (n, OUT) = x (n, IN) @ w^T (IN, OUT) + b
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, OUT, IN, 1.0f, x, IN, w, IN, 0.0f, y, OUT);
    for (int s = 0; s < n; s++)
        for (int o = 0; o < OUT; o++) y[(int64_t)s * OUT + o] += b[o];
}

void linear_backward_batched(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w, int n,
                             int IN, int OUT) {
    if (n <= 0) return;
    // dx (n, IN) = dy (n, OUT) @ w (OUT, IN)
    if (dx) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, IN, OUT, 1.0f, dy, OUT, w, IN, 0.0f, dx, IN);
    // dw (OUT, IN) += dy^T (OUT, n) @ x (n, IN)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, IN, n, 1.0f, dy, OUT, x, IN, 1.0f, dw, IN);
    for (int s = 0; s < n; s++)
        for (int o = 0; o < OUT; o++) db[o] += dy[(int64_t)s * OUT + o];
}

double softmax_ce_forward(float *probs, const float *logits, int label, int V) {
    // in double, shifted by the max so exp cannot overflow
    double m = logits[0];
    for (int v = 1; v < V; v++) m = logits[v] > m ? logits[v] : m;
    double sum = 0.0;
    for (int v = 0; v < V; v++) sum += exp((double)logits[v] - m);
    for (int v = 0; v < V; v++) probs[v] = (float)(exp((double)logits[v] - m) / sum);
    return log(sum) - ((double)logits[label] - m);
}

void softmax_ce_backward(float *dlogits, const float *probs, int label, double scale, int V) {
    // d(-log p_label)/dlogit_v = p_v - [v == label]
    for (int v = 0; v < V; v++) dlogits[v] = (float)(((double)probs[v] - (v == label ? 1.0 : 0.0)) * scale);
}
