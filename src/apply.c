/*
 * apply.c - the elementwise passes of BN: normalize (with the residual addition and
 * ReLU epilogues, writing the ReLU mask) and the input gradient (reading the mask,
 * writing dz).
 *
 * One body, ew_span, serves every pass: the variant (operation, element type,
 * epilogue) is a compile-time constant at each instantiation (the EW_* flags below),
 * and each variant has its own parallel region (sbn_normalize / sbn_backward_dx), so
 * the outlined body is specialised and carries no run-time branch per element.
 *
 * Exactness: vector bodies compute every element with the same double operations, in
 * the same order, as the scalar steps, and round once (simd.h), so the output bits
 * depend neither on where a vector boundary falls nor on the alignment of any buffer.
 *
 * Alignment. Users pass buffers at any element alignment (malloc, numpy, tensor
 * slices), and x, z, dy and the outputs may each be aligned differently. Loads are
 * unaligned vector loads wherever they fall. Large outputs are written with streaming
 * stores, and a streaming store that fills only part of a cache line, or a line
 * written partly by streaming and partly by ordinary stores, costs a partial write
 * to memory (measured 2-3x slower on narrow NHWC rows). So streaming stores are used
 * for whole 64-byte lines of the output only, located on the output's own address
 * grid, never on the row grid; the partial lines at either end of a span go through
 * ordinary stores. NHWC spans run over a thread's whole share of the tensor, with the
 * channel index wrapping, so only its two ends can be partial lines. (With two
 * outputs, dx and dz, the grid is dx's; dz gets ordinary stores where it is off it.)
 *
 * The mask: one bit per element, in element order, written by the training forward
 * of a ReLU layer as whole 64-bit words. A thread's share starts and ends anywhere,
 * so the two words at its ends are shared with its neighbours: those are merged with
 * atomic and/or of this thread's bits only; every other word is a plain store.
 */
#include "moments.h"
#include "simd.h"

#include <omp.h>


/* Outputs at least this large are written with non-temporal (streaming) stores: they
 * cannot stay in cache anyway, and streaming skips the read-for-ownership of every
 * destination line, so a pass moves 8 instead of 12 bytes per element of y (12 instead
 * of 16 for dx). Only the store instruction differs; the values are the same. */
#define SBN_NT_MIN_BYTES ((int64_t)16 << 20)

void sbn_coef_wrap(double *a, int64_t C)
{
    for (int64_t j = 0; j < SBN_COEF_PAD; j++)
        a[C + j] = a[j % C];
}

/* A pass variant, as the bits of one compile-time constant:
 *   EW_DX      0: normalize  out = act((x - m) * k + a [+ z])
 *              1: gradient   out = k * (g - a - (x - m) * b), g = dy or masked dy
 *   EW_BF16    elements are bfloat16 (else float)
 *   EW_ADD     normalize: z is added before the activation
 *   EW_RELU    normalize: ReLU; gradient: g is dy masked by the ReLU mask
 *   EW_MASK    normalize: write the mask (training)
 *   EW_DZ      gradient: write dz = g
 *   EW_NOOUT   gradient: no dx (dz only) */
enum { EW_DX = 1, EW_BF16 = 2, EW_ADD = 4, EW_RELU = 8, EW_MASK = 16, EW_DZ = 32, EW_NOOUT = 64 };

typedef struct {
    void *out, *out2;     /* y or dx; dz */
    const void *x, *dy;   /* dy: the gradient, or z for normalize */
    const double *m, *k, *a, *b; /* [C + SBN_COEF_PAD] each (b unused when normalizing) */
    uint8_t *mask;
    int64_t C;
    int nt2; /* out2 may stream too: its cache lines fall where out's do */
} ew_args;

/* Coefficients of 8 consecutive outputs as vectors: the same channel in every lane
 * (NCHW: one row), or channels c .. c+7 (NHWC; the pad makes the wrap past C - 1 a
 * plain load). */
typedef struct {
    sbn_v8d m, k, a, b;
} ew_coef;

SBN_INLINE void ew_coef_row(int v, const ew_args *e, int64_t c, ew_coef *q)
{
    q->m = sbn_bcast8(e->m[c]), q->k = sbn_bcast8(e->k[c]), q->a = sbn_bcast8(e->a[c]);
    q->b = v & EW_DX ? sbn_bcast8(e->b[c]) : (sbn_v8d){0};
}

SBN_INLINE void ew_coef_lanes(int v, const ew_args *e, int64_t c, ew_coef *q)
{
    q->m = sbn_loadd8(e->m + c), q->k = sbn_loadd8(e->k + c), q->a = sbn_loadd8(e->a + c);
    q->b = v & EW_DX ? sbn_loadd8(e->b + c) : (sbn_v8d){0};
}

/* ---- the mask writer of one thread's share [F0, F1) ----
 * Bits arrive in element order. Kept by value in the span (never by address outside
 * inlined code), so that the word under construction, its position and its address
 * stay in registers: a word kept in memory made every vector step wait for the
 * previous one's read-modify-write (1.9x on a normalize in cache). */
typedef struct {
    uint64_t *w;       /* the word being filled */
    uint64_t acc;      /* its bits so far */
    int64_t off;       /* the next bit's position in it */
    uint64_t *w0, *w1; /* the share's first and last words, */
    uint64_t own0, own1; /* and the bits of them that belong to it */
} bitw;

static bitw bw_start(uint8_t *mask, int64_t F0, int64_t F1)
{
    bitw b = {0};
    if (!mask || F1 <= F0)
        return b;
    uint64_t *m = (uint64_t *)mask;
    b.w = b.w0 = m + F0 / 64, b.w1 = m + (F1 - 1) / 64;
    b.off = F0 % 64;
    b.own0 = ~UINT64_C(0) << b.off;
    b.own1 = F1 % 64 ? (UINT64_C(1) << F1 % 64) - 1 : ~UINT64_C(0);
    if (b.w0 == b.w1)
        b.own0 = b.own1 = b.own0 & b.own1;
    return b;
}

/* A word at either end of a share is shared with the neighbour: only this share's
 * bits of it are written, atomically. */
static void bw_merge(uint64_t *w, uint64_t acc, uint64_t own)
{
    __atomic_fetch_and(w, ~own, __ATOMIC_RELAXED);
    __atomic_fetch_or(w, acc & own, __ATOMIC_RELAXED);
}

SBN_INLINE void bw_flush(const bitw *b)
{
    if (b->w == b->w0 || b->w == b->w1)
        bw_merge(b->w, b->acc, b->w == b->w0 ? b->own0 : b->own1);
    else
        *b->w = b->acc;
}

/* The k bits (k <= 64) of the next k elements. */
SBN_INLINE void bw_put(bitw *b, uint64_t bits, int64_t k)
{
    b->acc |= bits << b->off;
    b->off += k;
    if (b->off >= 64) {
        bw_flush(b);
        b->w++;
        b->off -= 64;
        b->acc = b->off ? bits >> (k - b->off) : 0;
    }
}

/* ---- one step ---- */

/* Outputs f .. f+t-1 (t = 8, or 0 < t < 8 by masked loads and stores). Returns their
 * ReLU mask bits (normalize with EW_RELU; else 0). */
SBN_INLINE unsigned ew_vec(int v, const ew_args *e, int64_t f, const ew_coef *q, int64_t t, int nt)
{
    const int dt = v & EW_BF16 ? SYNCBN_BF16 : SYNCBN_F32;
    const sbn_v8d x = t == 8 ? sbn_ld8(dt, e->x, f) : sbn_ld8_first(dt, e->x, f, t);
    if (!(v & EW_DX)) {
        sbn_v8d r = (x - q->m) * q->k + q->a;
        if (v & EW_ADD)
            r += t == 8 ? sbn_ld8(dt, e->dy, f) : sbn_ld8_first(dt, e->dy, f, t);
        sbn_v8f o = sbn_round8(dt, &r);
        const unsigned bits = v & EW_RELU ? sbn_relu8(&o) & ((1u << t) - 1) : 0;
        if (t == 8)
            sbn_st8(dt, e->out, f, o, nt);
        else
            sbn_st8_first(dt, e->out, f, o, t);
        return bits;
    }
    const int relu = (v & EW_RELU) != 0;
    const sbn_v8d g = t == 8 ? sbn_ldg8(dt, relu, e->dy, e->mask, f) : sbn_ldg8_first(dt, relu, e->dy, e->mask, f, t);
    if (!(v & EW_NOOUT)) {
        const sbn_v8d r = q->k * (g - q->a - (x - q->m) * q->b);
        const sbn_v8f o = sbn_round8(dt, &r);
        if (t == 8)
            sbn_st8(dt, e->out, f, o, nt);
        else
            sbn_st8_first(dt, e->out, f, o, t);
    }
    if (v & EW_DZ) { /* g is exact in the element type: no rounding */
        const sbn_v8f o = sbn_exact8(&g);
        if (t == 8)
            sbn_st8(dt, e->out2, f, o, v & EW_NOOUT ? nt : nt && e->nt2);
        else
            sbn_st8_first(dt, e->out2, f, o, t);
    }
    return 0;
}

SBN_INLINE unsigned ew_scalar(int v, const ew_args *e, int64_t f, int64_t c)
{
    const int dt = v & EW_BF16 ? SYNCBN_BF16 : SYNCBN_F32;
    const double x = sbn_ld1(dt, e->x, f);
    if (!(v & EW_DX)) {
        double r = (x - e->m[c]) * e->k[c] + e->a[c];
        if (v & EW_ADD)
            r += sbn_ld1(dt, e->dy, f);
        float o = sbn_round1(dt, r);
        const unsigned bit = v & EW_RELU ? sbn_relu1(&o) : 0;
        sbn_st1(dt, e->out, f, o);
        return bit;
    }
    const double g = sbn_ldg1(dt, (v & EW_RELU) != 0, e->dy, e->mask, f);
    if (!(v & EW_NOOUT))
        sbn_st1(dt, e->out, f, sbn_round1(dt, e->k[c] * (g - e->a[c] - (x - e->m[c]) * e->b[c])));
    if (v & EW_DZ)
        sbn_st1(dt, e->out2, f, sbn_round1(dt, g));
    return 0;
}

/* The channel 8 elements after channel c (NHWC; a division only when C < 8). */
SBN_INLINE int64_t next8(int64_t c, int64_t C) { return C >= 8 ? (c + 8 >= C ? c + 8 - C : c + 8) : (c + 8) % C; }

/* Outputs [f0, f1). lanes == 0: all of channel c (an NCHW row). lanes == 1: channel
 * c at f0, advancing with f and wrapping at C (NHWC). Streaming stores for the whole
 * cache lines of the output only, when nt. Returns the channel after f1 (lanes == 1). */
SBN_INLINE int64_t ew_span(int v, int lanes, const ew_args *args, int64_t f0, int64_t f1, int64_t c, int nt,
                           bitw *bw)
{
    /* A local copy: the compiler then knows the output stores cannot change the
     * pointers, and keeps them in registers instead of reloading them every step. */
    const ew_args local = *args, *e = &local;
    bitw lbw = *bw; /* by value: see bitw */
    const int dt = v & EW_BF16 ? SYNCBN_BF16 : SYNCBN_F32;
    const int64_t C = e->C, es = sbn_esize(dt), line = 64 / es;
    ew_coef q;
    if (!lanes)
        ew_coef_row(v, e, c, &q);
    /* [f0, h): ordinary stores up to the first line boundary of the output; [h, g):
     * whole lines; [g, f1): the rest. */
    int64_t h = f0, g = f0;
    if (nt) {
        const uintptr_t addr = (uintptr_t)((char *)e->out + f0 * es);
        h = f0 + (int64_t)(((64 - (addr & 63)) & 63) / (uintptr_t)es);
        h = h < f1 ? h : f1;
        g = h + (f1 - h) / line * line;
    }
    int64_t f = f0;
    for (int part = 0; part < 3; part++) {
        const int64_t end = part == 0 ? h : part == 1 ? g : f1;
        const int stream = part == 1;
        if (v & EW_MASK) /* 64 outputs a step: one word of mask bits, put at once */
            for (; f + 64 <= end; f += 64) {
                uint64_t bits = 0;
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) {
                    if (lanes)
                        ew_coef_lanes(v, e, c, &q);
                    bits |= (uint64_t)ew_vec(v, e, f + 8 * j, &q, 8, stream) << 8 * j;
                    if (lanes)
                        c = next8(c, C);
                }
                bw_put(&lbw, bits, 64);
            }
        for (; f + 8 <= end; f += 8) {
            if (lanes)
                ew_coef_lanes(v, e, c, &q);
            const unsigned bits = ew_vec(v, e, f, &q, 8, stream);
            if (v & EW_MASK)
                bw_put(&lbw, bits, 8);
            if (lanes)
                c = next8(c, C);
        }
        if (SBN_HAVE_MASKED(dt) && f < end) {
            if (lanes)
                ew_coef_lanes(v, e, c, &q);
            const unsigned bits = ew_vec(v, e, f, &q, end - f, 0);
            if (v & EW_MASK)
                bw_put(&lbw, bits, end - f);
            if (lanes)
                c = (c + (end - f)) % C;
            f = end;
        }
        for (; f < end; f++) {
            const unsigned bit = ew_scalar(v, e, f, c);
            if (v & EW_MASK)
                bw_put(&lbw, bit, 1);
            if (lanes && ++c == C)
                c = 0;
        }
    }
    *bw = lbw;
    return c;
}

/* This thread's share [*r0, *r1) of R rows, contiguous (as a static schedule). */
static void thread_rows(int64_t R, int64_t *r0, int64_t *r1)
{
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    *r0 = R / T * t + (t < R % T ? t : R % T);
    *r1 = *r0 + R / T + (t < R % T);
}

/* This thread's share of a pass. Called inside the parallel region of each variant,
 * so that the region's outlined body sees v as a constant. */
SBN_INLINE void ew_share(int v, const ew_args *e, sbn_shape sh, int nt)
{
    int64_t r0, r1, f0, f1;
    const int nchw = sh.layout == SYNCBN_NCHW && sh.S > 1; /* S == 1: same memory as NHWC */
    thread_rows(nchw ? sh.n * sh.C : sh.n * sh.S, &r0, &r1);
    const int64_t per_row = nchw ? sh.S : sh.C;
    f0 = r0 * per_row, f1 = r1 * per_row;
    bitw bw = bw_start(v & EW_MASK ? e->mask : NULL, f0, f1);
    if (nchw) {
        for (int64_t r = r0; r < r1; r++)
            ew_span(v, 0, e, r * sh.S, (r + 1) * sh.S, r % sh.C, nt, &bw);
    } else {
        ew_span(v, 1, e, f0, f1, 0, nt, &bw);
    }
    if ((v & EW_MASK) && bw.off > 0)
        bw_flush(&bw); /* the last, partial word */
    sbn_nt_fence(nt);
}

/* Whether a pass writes its output with streaming stores: from SBN_NT_MIN_BYTES of
 * float output, i.e. 4M elements, for both types (a bfloat16 pass of that size reads
 * and writes, with x and dy or z, far more than the last-level cache holds). */
static int ew_streams(sbn_shape sh)
{
    return SBN_HAVE_NT && sh.n * sh.C * sh.S * 4 >= SBN_NT_MIN_BYTES;
}

/* One parallel region per variant: EW_CASE(v) instantiates ew_share for v. */
#define EW_CASE(V)                                                                 \
    case V: {                                                                      \
        _Pragma("omp parallel if (big)") ew_share(V, &e, sh, nt);                  \
    } break;
#define EW_CASES_DT(V) EW_CASE(V) EW_CASE((V) | EW_BF16)

void sbn_normalize(void *y, const void *x, const void *z, int relu, uint8_t *mask, const double *mean,
                   const double *scale, const double *shift, sbn_shape sh)
{
    const ew_args e = {.out = y, .x = x, .dy = z, .m = mean, .k = scale, .a = shift, .mask = mask, .C = sh.C};
    const int nt = ew_streams(sh), big = sh.n * sh.C * sh.S >= SBN_OMP_MIN_WORK;
    const int v = (sh.dt == SYNCBN_BF16 ? EW_BF16 : 0) | (z ? EW_ADD : 0) | (relu ? EW_RELU : 0) |
                  (relu && mask ? EW_MASK : 0);
    switch (v) {
        EW_CASES_DT(0)
        EW_CASES_DT(EW_ADD)
        EW_CASES_DT(EW_RELU)
        EW_CASES_DT(EW_RELU | EW_MASK)
        EW_CASES_DT(EW_ADD | EW_RELU)
        EW_CASES_DT(EW_ADD | EW_RELU | EW_MASK)
    }
}

void sbn_backward_dx(void *dx, void *dz, const void *x, const void *dy, const uint8_t *mask, const double *mean,
                     const double *k, const double *a, const double *b, sbn_shape sh)
{
    if (!dx && !dz)
        return;
    /* With no dx, dz is the output that owns the streaming grid. */
    const ew_args e = {.out = dx ? dx : dz, .out2 = dz, .x = x, .dy = dy, .m = mean, .k = k, .a = a, .b = b,
                       .mask = (uint8_t *)mask, .C = sh.C,
                       .nt2 = dx && dz && (((uintptr_t)dx ^ (uintptr_t)dz) & 63) == 0};
    const int nt = ew_streams(sh), big = sh.n * sh.C * sh.S >= SBN_OMP_MIN_WORK;
    const int v = EW_DX | (sh.dt == SYNCBN_BF16 ? EW_BF16 : 0) | (mask ? EW_RELU : 0) | (dz ? EW_DZ : 0) |
                  (dx ? 0 : EW_NOOUT);
    switch (v) {
        EW_CASES_DT(EW_DX)
        EW_CASES_DT(EW_DX | EW_DZ)
        EW_CASES_DT(EW_DX | EW_DZ | EW_NOOUT)
        EW_CASES_DT(EW_DX | EW_RELU)
        EW_CASES_DT(EW_DX | EW_RELU | EW_DZ)
        EW_CASES_DT(EW_DX | EW_RELU | EW_DZ | EW_NOOUT)
    }
}
