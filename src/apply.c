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

#include <float.h>
#include <math.h>
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
    const float *fk, *fc, *fb, *fe; /* bfloat16 in float: [C + SBN_COEF_PAD] each, or fk NULL */
    float R, R1p, R1m; /* the test's factor R ("bfloat16 in float"), 1 + R and 1 - R */
    uint8_t *mask;
    int64_t C;
    int nt2; /* out2 may stream too: its cache lines fall where out's do */
} ew_args;

/* Coefficients of 8 consecutive outputs as vectors: the same channel in every lane
 * (NCHW: one row), or channels c .. c+7 (NHWC; the pad makes the wrap past C - 1 a
 * plain load). */
typedef struct {
    sbn_v8d m, k, a, b;
    sbn_v8d na; /* NCHW gradient with the ReLU: 0 - a, g - a where g is masked to +0 */
} ew_coef;

SBN_INLINE void ew_coef_row(int v, const ew_args *e, int64_t c, ew_coef *q)
{
    q->m = sbn_bcast8(e->m[c]), q->k = sbn_bcast8(e->k[c]), q->a = sbn_bcast8(e->a[c]);
    q->b = v & EW_DX ? sbn_bcast8(e->b[c]) : (sbn_v8d){0};
    q->na = (v & EW_DX) && (v & EW_RELU) ? sbn_bcast8(0.0 - e->a[c]) : (sbn_v8d){0};
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

/* The rounded results of outputs f .. f+t-1 (t = 8, or 0 < t < 8 by masked loads),
 * before the ReLU (normalize), and g, the masked dy (gradient; nothing else with
 * EW_NOOUT). gb: the mask bits of f .. f+7 (gradient with EW_RELU and t = 8). Nothing
 * is stored. */
SBN_INLINE sbn_v8f ew_val(int v, const ew_args *e, int64_t f, const ew_coef *q, int64_t t, unsigned gb,
                          sbn_v8d *g)
{
    const int dt = v & EW_BF16 ? SYNCBN_BF16 : SYNCBN_F32;
    if (v & EW_DX) {
        if (!(v & EW_RELU))
            *g = t == 8 ? sbn_ld8(dt, e->dy, f) : sbn_ld8_first(dt, e->dy, f, t);
        else
            *g = t == 8 ? sbn_ldg8_bits(dt, e->dy, f, gb) : sbn_ldg8_first(dt, 1, e->dy, e->mask, f, t);
        if (v & EW_NOOUT)
            return (sbn_v8f){0};
    }
    const sbn_v8d x = t == 8 ? sbn_ld8(dt, e->x, f) : sbn_ld8_first(dt, e->x, f, t);
    if (v & EW_DX) {
        const sbn_v8d r = q->k * (*g - q->a - (x - q->m) * q->b);
        return sbn_round8(dt, &r);
    }
    sbn_v8d r = (x - q->m) * q->k + q->a;
    if (v & EW_ADD)
        r += t == 8 ? sbn_ld8(dt, e->dy, f) : sbn_ld8_first(dt, e->dy, f, t);
    return sbn_round8(dt, &r);
}

/* Outputs f .. f+t-1 (t as in ew_val), stored. Returns their ReLU mask bits
 * (normalize with EW_RELU; else 0). */
SBN_INLINE unsigned ew_vec(int v, const ew_args *e, int64_t f, const ew_coef *q, int64_t t, int nt)
{
    const int dt = v & EW_BF16 ? SYNCBN_BF16 : SYNCBN_F32;
    sbn_v8d g;
    const unsigned gb = (v & EW_DX) && (v & EW_RELU) && t == 8 ? sbn_mask8(e->mask, f) : 0;
    sbn_v8f o = ew_val(v, e, f, q, t, gb, &g);
    const unsigned bits = !(v & EW_DX) && (v & EW_RELU) ? sbn_relu8(&o) & ((1u << t) - 1) : 0;
    if (!(v & EW_NOOUT)) {
        if (t == 8)
            sbn_st8(dt, e->out, f, o, nt);
        else
            sbn_st8_first(dt, e->out, f, o, t);
    }
    if (v & EW_DZ) { /* g is exact in the element type: no rounding */
        const sbn_v8f d = sbn_exact8(&g);
        if (t == 8)
            sbn_st8(dt, e->out2, f, d, v & EW_NOOUT ? nt : nt && e->nt2);
        else
            sbn_st8_first(dt, e->out2, f, d, t);
    }
    return bits;
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

/* ---- bfloat16 in float, with an exact fallback ----
 *
 * The contract: a bfloat16 output is RNE16(Y), Y the double result of the exact path
 * above (ew_vec), RNE16 rounding to nearest-even at bfloat16's 8 bits. Double has 8
 * lanes per 512-bit vector; float has 16, and a rounding that is one instruction.
 * So each vector of 16 outputs is first computed in float, as y, together with two
 * floats lo < hi per lane that PROVABLY hold Y strictly between them; where no lane's
 * [lo, hi] holds a bfloat16 rounding boundary (the midpoints between neighbouring
 * bfloat16 values, and the overflow threshold, which is the midpoint between the
 * largest bfloat16 and 2^128), Y lies strictly inside the same rounding interval as
 * lo and hi, and their common rounding is RNE16(Y): it is stored. Otherwise the
 * vector is recomputed on the exact path. The bits are those of the exact path
 * whatever the decision, so the decision may differ between builds (it does, rarely:
 * where rho below rounds half away from zero instead of to even, a handful more
 * vectors in a million fall back).
 *
 * Notation: u = 2^-24 (float's unit roundoff), ud = 2^-53 (double's). fl(.) is one
 * IEEE float operation to nearest: |fl(v) - v| <= u |fl(v)| + 2^-150 (the second term
 * only where the result is subnormal; a sum whose result is subnormal is exact); double
 * operations likewise with ud and 2^-1075. fm(a, b, c) is a b + c rounded once to
 * float (a fused multiply-add: ew_fm16); builds without one form it in double, where
 * a b is exact, and round that to float, two roundings: |fm - v| <= u1 |fm| + 2^-149
 * and <= u1 |v| + 2^-149, v = a b + c, with u1 = (1 + 2^-28) u, cover every build. x, z, g are bfloat16 values, exact in
 * float. The coefficients are doubles (k, m, a, b: the per-channel arrays); their
 * float versions are rounded, and that rounding is included below. Build flags:
 * -ffp-contract=off, so each line below is the operations it shows (fm where it
 * says so, and no other fused multiply-add), and no -ffast-math (CMakeLists.txt).
 *
 * Normalize. Target T = k(x - m) + a, exactly (real numbers); Y0 = fl64(fl64(fl64(x -
 * m) k) + a) (the exact path's order). Float path, with coefficients computed once
 * per call in double: kf = fl32(k), c = fl64(a - fl64(k m)), cf = fl32(c); and
 *     y0 = fm(kf, x, cf).
 * (1) kf = k(1 + r), |r| <= u, when kf is 0 (only for k = 0) or a normal float;
 *     channels where it is not get e = +Inf (below): always the exact path.
 * (2) ec := |(a - k m) - cf| <= |c - cf| + 2^-52 (|k m| + |c|): the first term is
 *     computed exactly in double (Sterbenz), the second bounds c's two roundings.
 * (3) y0 = kf x + cf + h, |h| <= u1 |y0| + 2^-149.
 * (4) y0 - T = r k x + (cf - (a - k m)) + h, and |k x| <= |T| + |a - k m| <= |y0| + D
 *     + |cf| + ec, with D = |y0 - T|. So D (1 - u) <= (u + u1)|y0| + u |cf| + (1 + u)
 *     ec + 2^-149: D <= 2.0001u |y0| + 1.0001u |cf| + 1.0001 ec + 2^-148.
 * (5) The exact path's own error: |Y0 - T| <= 3.0001ud |k (x - m)| + ud |a| + 2^-1074
 *     <= 3.0001ud (|y0| + D) + 4.0001ud |a| + 2^-1074.
 * (6) |y0 - Y0| <= D + |Y0 - T| <= 2.001u |y0| + E, E := 1.01u |cf| + 1.01 ec +
 *     2^-50 |a| + 2^-147 (ud terms against u terms: factor 2^-29).
 * With z (residual addition): y = fl(y0 + z), Y = fl64(Y0 + z). Then |y - Y| <=
 * |y0 - Y0| + u |y| + ud |Y| <= 2.002u |y0| + 1.001u |y| + 1.0001 E.
 *
 * Gradient. Target T = k (g - a - (x - m) b). Coefficients: kf = fl32(k), bf =
 * fl32(fl64(k b)), c = fl64(k fl64(fl64(b m) - a)), cf = fl32(c); kf and bf must be 0
 * (where k b = 0 exactly) or normal, else e = +Inf as in (1). Float path:
 *     w = fm(kf, g, cf),  r = fm(-bf, x, w).
 * (1') kf = k(1 + r1), bf = k b (1 + r2), |r1| <= u, |r2| <= u + 2ud.
 * (2') ec := |k (b m - a) - cf| <= |c - cf| + 2^-50 (|k b m| + |k a| + |c|).
 * (3') w = kf g + cf + h1, r = w - bf x + h2, |h1| <= u1 |w| + 2^-149, |h2| <= u1 |r|
 *     + 2^-149; so |kf g| <= (1 + u1)|w| + |cf| + 2^-149 and |bf x| <= |w| + (1 +
 *     u1)|r| + 2^-149.
 * (4') r - T = r1 k g - r2 k b x + (cf - k (b m - a)) + h1 + h2, with |r1 k g| <=
 *     1.0001u |kf g| and |r2 k b x| <= 1.0001u |bf x|; so
 *     |r - T| <= 3.001u |w| + 2.001u |r| + 1.0001u |cf| + ec + 2^-147.
 * (5') The exact path: |Y - T| <= 2^-51 (|k g| + |k a| + |k b x| + |k b m| + |Y|) +
 *     2^-1073 <= 2^-50 (1.0001 |w| + 1.0001 |r| + |cf| + |k a| + |k b m|) + 2^-51
 *     |r - Y| + 2^-190 (by (3'), and |Y| <= |r| + |r - Y|).
 * (6') |r - Y| <= 3.002u |w| + 2.002u |r| + E, E := 1.01u |cf| + 1.01 ec + 2^-49
 *     (|k a| + |k b m|) + 2^-146.
 *
 * The test, per lane, on y (normalize; with z the final sum) or r (gradient), all
 * called y below, and d >= 0:
 *     e = fl32(1.01 E + 2^-100), per channel, in double;
 *     d = e (normalize), fm(|y0|, R, e) (with z), fm(|w|, R, e) (gradient);
 *     F = fm(y, 1 + R, sd),  N = fm(y, 1 - R, -sd),  sd = d with y's sign bit;
 *     R = 2^-22 = 4u (1 + R and 1 - R are floats).
 * F and N are the two ends, F the one away from zero. Accept when y is neither NaN
 * nor infinite and rho(F) = rho(N), rho the build's rounding of a float to bfloat16:
 * RNE16 (vcvtneps2bf16, AVX512_BF16; subnormals flushed to zero, keeping the sign) or
 * round half away from zero (y's bits + 0x8000 cut to the upper 16, elsewhere). Both
 * are monotone, so rho is then constant between N and F, and the output is that
 * value, rho(F). Why it is RNE16(Y), for y >= +0 (y <= -0 is the mirror image: fm
 * rounds symmetrically, and sd, F, N change sign with y):
 * (a) N < Y < F. Let B >= |y - Y| be the bound above: 2.001u y + E (normalize),
 *     2.002u |y0| + 1.001u y + 1.0001 E (with z), 3.002u |w| + 2.002u y + E
 *     (gradient). F >= (y (1 + R) + d)(1 - u1) - 2^-149 (or F = +Inf), so F > y + B
 *     >= Y when (R - u1 (1 + R)) y + (1 - u1) d - 2^-149 > B; N <= y (1 - R) - d +
 *     u1 (y (1 - R) + d) + 2^-149, so N < y - B <= Y under the same condition (with
 *     1 - R for 1 + R: weaker). R - u1 (1 + R) >= 2.9999u covers the u-terms of y in
 *     every B. e >= (1.01 E + 2^-100)(1 - u) (E itself is computed in double: its few
 *     roundings are within the 1.01); so (1 - u1) d >= (1 - u1)^2 (R |y0| + e) - 2^-149
 *     (with z; |w| for the gradient; R |y0| absent without z) gives 3.9999u |y0| (or
 *     |w|), which covers 2.002u |y0| and 3.002u |w|, and more than 1.0098 E +
 *     2^-101, which covers 1.0001 E and, strictly, the 2^-149.
 * (b) rho(N) = rho(F) = b puts N and F in one of rho's intervals, whose ends (in
 *     magnitude) are bfloat16 midpoints or the overflow threshold, one end included;
 *     so the open interval (N, F), which holds Y, holds no midpoint and no threshold,
 *     and RNE16(Y) = b, both for RNE16 and for round-half-away.
 * (c) Subnormals and zero: d >= e (1 - u1) - 2^-149 > 2^-101, so F > 2^-102, and
 *     rho(F) is positive, at least 2^-103. If y (1 - R) < d, N rounds a negative
 *     number: -0 or negative, whose rounding has the sign bit set: rejected. Else N
 *     rounds y (1 - R) - d >= 0; where that is below 2^-126, rho(N) <= 2^-126 <
 *     rho(F): rejected. So an accepted lane has y (1 - R) - d >= 2^-126: y and both
 *     ends are normal, and the rounding is nonzero with y's sign. The underflow terms
 *     of the bounds (2^-146 and below) are covered by 2^-100.
 * (d) NaN and Inf: an infinite y gives F = N = y, so y is tested by class (NaN and
 *     +-Inf rejected). A finite y whose F overflows is covered by (a) (F = +Inf > Y).
 *     A channel with e = +Inf (a coefficient that is not a normal float, E not finite)
 *     has d = +Inf, so F = +Inf and N = -Inf: their roundings differ. d is NaN only
 *     where y is.
 * ReLU: an accepted rounding is nonzero with y's sign (c), so its mask bit is y > 0,
 * and the ReLU of the stored bits is +0 where it is clear (the exact path's ReLU of a
 * negative result). dz = g is copied as ever, as bits.
 * (Before, y was formed with separate multiplies and adds, and the ends as y -+ err,
 * err = fl(R s + e), R = 2^-21: one rounding more in y, and three dependent operations
 * from y to each end where there are now two (the sign into d, one fm). Earlier still,
 * the test measured y's distance to the two nearest midpoints against err.)
 *
 * All of the above is per lane: a vector of 16 is accepted only when every lane is,
 * else it is recomputed on the exact path (two vectors of 8) and stored with the
 * other half of its line (ew_exact16v). */

static int bf16_path; /* sbn_test_bf16_path */
static uint64_t bf16_vectors, bf16_fallbacks;

void sbn_test_bf16_path(int mode) { bf16_path = mode; }

void sbn_bf16_counts(uint64_t *vectors, uint64_t *fallbacks)
{
    *vectors = __atomic_load_n(&bf16_vectors, __ATOMIC_RELAXED);
    *fallbacks = __atomic_load_n(&bf16_fallbacks, __ATOMIC_RELAXED);
}

/* The float coefficient arrays of one call, [4][W] in the caller's scratch block: k,
 * c, b (gradient only), e; W = fast_stride(C) >= C + EW_FPAD. Returns NULL where
 * there is no float path (float elements, the test switch, or no scratch: the exact
 * path then does everything, with the same bits). */
#define EW_FPAD 16 /* the float arrays' wrap: entry C + j is entry j mod C (16 lanes) */
static int64_t fast_stride(int64_t C) { return (C + EW_FPAD + 15) / 16 * 16; }

int64_t sbn_apply_scratch_floats(int64_t C) { return 4 * fast_stride(C); }

static float *fast_coef(const ew_args *e, int dx, sbn_shape sh, float *f)
{
    if (sh.dt != SYNCBN_BF16 || bf16_path == 1 || !f)
        return NULL;
    const int64_t C = sh.C, W = fast_stride(C);
    const double u = 0x1p-24;
    for (int64_t j = 0; j < C; j++) {
        const double k = e->k[j], m = e->m[j], a = e->a[j], b = dx ? e->b[j] : 0;
        double c, cd, ec, E;
        float kf = (float)k, bf = 0;
        int ok = kf == 0 ? k == 0 : fabsf(kf) >= FLT_MIN;
        if (!dx) { /* (1), (2), (6) */
            const double km = k * m;
            c = a - km;
            cd = (float)c;
            ec = fabs(c - cd) + 0x1p-52 * (fabs(km) + fabs(c));
            E = 1.01 * u * fabs(cd) + 1.01 * ec + 0x1p-50 * fabs(a);
        } else { /* (1'), (2'), (6') */
            const double kb = k * b, kbm = kb * m, ka = k * a;
            bf = (float)kb;
            ok &= bf == 0 ? k == 0 || b == 0 : fabsf(bf) >= FLT_MIN;
            c = k * (b * m - a);
            cd = (float)c;
            ec = fabs(c - cd) + 0x1p-50 * (fabs(kbm) + fabs(ka) + fabs(c));
            E = 1.01 * u * fabs(cd) + 1.01 * ec + 0x1p-49 * (fabs(ka) + fabs(kbm));
        }
        float ef = (float)(1.01 * E + 0x1p-100);
        if (!ok || !isfinite(kf) || !isfinite(bf) || !isfinite((float)cd) || !isfinite(E))
            ef = INFINITY; /* NaN in E would compare false too; +Inf says so */
        if (bf16_path == 2)
            ef = 0; /* the test switch: no margin (with R = 0), float trusted */
        f[j] = kf, f[W + j] = (float)cd, f[2 * W + j] = bf, f[3 * W + j] = ef;
    }
    for (int64_t j = C; j < C + EW_FPAD; j++)
        for (int r = 0; r < 4; r++)
            f[r * W + j] = f[r * W + j % C];
    return f;
}

/* Whether the gradient's ReLU mask may be applied to kf g (ew_fast). */
#define EW_MASKED_MUL SBN_AVX512

/* The float path works on 16 lanes (one 512-bit vector on AVX-512; GNU vectors, so
 * other builds split it): 16 bfloat16 are one 32-byte load, and the rounded results
 * one 32-byte store, a vector step per 16 outputs where the exact path needs two. */
typedef struct {
    sbn_v16f k, c, b, e;
} ew_fcoef;

SBN_INLINE sbn_v16f ew_bcastf(float v) { return (sbn_v16f){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }

SBN_INLINE void ew_fcoef_row(int v, const ew_args *e, int64_t c, ew_fcoef *q)
{
    q->k = ew_bcastf(e->fk[c]), q->c = ew_bcastf(e->fc[c]), q->e = ew_bcastf(e->fe[c]);
    q->b = v & EW_DX ? ew_bcastf(e->fb[c]) : (sbn_v16f){0};
}

SBN_INLINE sbn_v16f ew_loadf16(const float *p)
{
    sbn_v16f r;
    memcpy(&r, p, sizeof r);
    return r;
}

SBN_INLINE void ew_fcoef_lanes(int v, const ew_args *e, int64_t c, ew_fcoef *q)
{
    q->k = ew_loadf16(e->fk + c), q->c = ew_loadf16(e->fc + c), q->e = ew_loadf16(e->fe + c);
    q->b = v & EW_DX ? ew_loadf16(e->fb + c) : (sbn_v16f){0};
}

SBN_INLINE sbn_v16f ew_absf(sbn_v16f v) { return (sbn_v16f)((sbn_v16u)v & 0x7FFFFFFFu); }

/* 16 bfloat16 bits (8 words) at element i, and as floats (exact). */
SBN_INLINE sbn_v8w ew_ldh16(const void *p, int64_t i)
{
    sbn_v8w w;
    memcpy(&w, (const uint16_t *)p + i, sizeof w);
    return w;
}

SBN_INLINE sbn_v16f ew_widen16(sbn_v8w w)
{
#ifdef __AVX512F__ /* vpmovzxwd + vpslld on the whole vector */
    return (sbn_v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)w), 16);
#else
    return (sbn_v16f)(__builtin_convertvector((sbn_v16h)w, sbn_v16u) << 16);
#endif
}

/* 32 bfloat16 as one vector (16 words of 32 bits: element 2j in the low half of word
 * j), and its two halves of 16. By value, so that they stay in registers (an array
 * here was built on the stack, and its two 32-byte halves read back as one 64-byte
 * load, which cannot be forwarded). */
SBN_INLINE sbn_v16u ew_join32(sbn_v8w lo, sbn_v8w hi)
{
#ifdef __AVX512F__
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else /* two registers already: GCC 12 builds the shuffle above element by element */
    sbn_v16u w;
    memcpy(&w, &lo, sizeof lo), memcpy((char *)&w + sizeof lo, &hi, sizeof hi);
    return w;
#endif
}

SBN_INLINE sbn_v8w ew_half32(sbn_v16u w, int h)
{
#ifdef __AVX512F__
    return h ? __builtin_shufflevector(w, w, 8, 9, 10, 11, 12, 13, 14, 15)
             : __builtin_shufflevector(w, w, 0, 1, 2, 3, 4, 5, 6, 7);
#else
    sbn_v8w r;
    memcpy(&r, (const char *)&w + h * sizeof r, sizeof r);
    return r;
#endif
}

/* rho of "bfloat16 in float" on 16 floats, as 16 bfloat16 bits: the one instruction
 * that rounds to nearest-even where the CPU has it (subnormals flushed to zero), else
 * the bits + 0x8000 cut to the upper 16 (ties away from zero). The test uses the same
 * rho for both ends and for the output, so either is exact where it accepts. */
SBN_INLINE sbn_v8w ew_round16(sbn_v16f y)
{
#if defined(__AVX512BF16__)
    return (sbn_v8w)(__m256i)_mm512_cvtneps_pbh((__m512)y);
#elif defined(__AVX512BW__)
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                         27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return (sbn_v8w)_mm512_castsi512_si256(_mm512_permutexvar_epi16(odd, (__m512i)((sbn_v16u)y + 0x8000u)));
#elif defined(__AVX2__)
    /* The upper halves (at most 0xFFFF) packed with unsigned saturation, which keeps
     * them, lane by lane; the permute puts the four 64-bit pieces back in order. */
    const sbn_v16u t = ((sbn_v16u)y + 0x8000u) >> 16;
    const __m256i p = _mm256_packus_epi32((__m256i)ew_half32(t, 0), (__m256i)ew_half32(t, 1));
    return (sbn_v8w)_mm256_permute4x64_epi64(p, 0xD8);
#else
    return (sbn_v8w)__builtin_convertvector(((sbn_v16u)y + 0x8000u) >> 16, sbn_v16h);
#endif
}

/* 32 bfloat16 bits at element i; streaming when nt (the address is then 64-byte
 * aligned: a whole output line). */
SBN_INLINE void ew_st32h(void *p, int64_t i, sbn_v16u w, int nt)
{
    uint16_t *d = (uint16_t *)p + i;
#ifdef __AVX512F__
    if (nt) {
        _mm512_stream_si512((void *)d, (__m512i)w);
        return;
    }
#elif defined(__AVX__)
    if (nt) { /* both halves, so the line still goes out whole */
        _mm256_stream_si256((__m256i *)d, (__m256i)ew_half32(w, 0));
        _mm256_stream_si256((__m256i *)d + 1, (__m256i)ew_half32(w, 1));
        return;
    }
#endif
    memcpy(d, &w, sizeof w);
    (void)nt;
}

/* 16 bfloat16 bits at element i; streaming when nt (the address is then 32-byte
 * aligned). */
SBN_INLINE void ew_st16h(void *p, int64_t i, sbn_v8w w, int nt)
{
    uint16_t *d = (uint16_t *)p + i;
#ifdef __AVX__
    if (nt) {
        _mm256_stream_si256((__m256i *)d, (__m256i)w);
        return;
    }
#endif
    memcpy(d, &w, sizeof w);
    (void)nt;
}

/* rho of 32 floats (lo: the first 16) as 32 bfloat16 bits in one vector: one
 * instruction for both where the CPU has it. */
SBN_INLINE sbn_v16u ew_round32(sbn_v16f lo, sbn_v16f hi)
{
#if defined(__AVX512BF16__)
    return (sbn_v16u)(__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
#else
    return ew_join32(ew_round16(lo), ew_round16(hi));
#endif
}

#ifdef __AVX__
/* Half h of 16 floats as one AVX register (also for AVX-512F builds without
 * SBN_AVX512's DQ, BW and VL, whose ew_nonfinite16 takes the AVX form). */
SBN_INLINE __m256 ew_halff(sbn_v16f v, int h)
{
    __m256 r;
    memcpy(&r, (const char *)&v + h * sizeof r, sizeof r);
    return r;
}
#endif

#if !SBN_AVX512 && defined(__AVX2__)
/* The lanes of 16 16-bit words that are all ones, as 16 bits (the signed saturating
 * pack keeps -1 and 0, in order). */
SBN_INLINE unsigned ew_bits16(__m256i ones)
{
    const __m128i p = _mm_packs_epi16(_mm256_castsi256_si128(ones), _mm256_extracti128_si256(ones, 1));
    return (unsigned)_mm_movemask_epi8(p);
}
#endif

/* The lanes where a > b (false for NaN), as 16 bits. */
SBN_INLINE unsigned ew_gt16(sbn_v16f a, sbn_v16f b)
{
#ifdef __AVX512F__
    return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GT_OQ);
#elif defined(__AVX__)
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(ew_halff(a, 0), ew_halff(b, 0), _CMP_GT_OQ)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(ew_halff(a, 1), ew_halff(b, 1), _CMP_GT_OQ)) << 8;
#else
    const sbn_v16u gt = (sbn_v16u)(a > b) & (sbn_v16u){1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                                       8192, 16384, 32768};
    unsigned r = 0;
    for (int j = 0; j < 16; j++)
        r |= gt[j];
    return r;
#endif
}

/* The lanes where y is NaN or infinite, as 16 bits. */
SBN_INLINE unsigned ew_nonfinite16(sbn_v16f y)
{
#if SBN_AVX512
    return _mm512_fpclass_ps_mask((__m512)y, 0x99); /* QNaN, +Inf, -Inf, SNaN */
#elif defined(__AVX__)
    unsigned r = 0; /* y - y: NaN for NaN and +-Inf, else +0 */
    for (int h = 0; h < 2; h++) {
        const __m256 d = _mm256_sub_ps(ew_halff(y, h), ew_halff(y, h));
        r |= (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(d, d, _CMP_UNORD_Q)) << 8 * h;
    }
    return r;
#else
    unsigned r = 0;
    for (int j = 0; j < 16; j++)
        r |= (unsigned)!(y[j] - y[j] == 0) << j; /* y - y: NaN for NaN and +-Inf */
    return r;
#endif
}

/* The lanes where the bfloat16 bits of a and b differ, as 16 bits. */
SBN_INLINE unsigned ew_neq16(sbn_v8w a, sbn_v8w b)
{
#if SBN_AVX512
    return _mm256_cmpneq_epi16_mask((__m256i)a, (__m256i)b);
#elif defined(__AVX2__)
    return ~ew_bits16(_mm256_cmpeq_epi16((__m256i)a, (__m256i)b)) & 0xFFFFu;
#else
    const sbn_v16h x = (sbn_v16h)a, y = (sbn_v16h)b;
    unsigned r = 0;
    for (int j = 0; j < 16; j++)
        r |= (unsigned)(x[j] != y[j]) << j;
    return r;
#endif
}

SBN_INLINE uint32_t ew_neq32(sbn_v16u a, sbn_v16u b)
{
#if SBN_AVX512
    return _mm512_cmpneq_epi16_mask((__m512i)a, (__m512i)b);
#else
    return ew_neq16(ew_half32(a, 0), ew_half32(b, 0)) | (uint32_t)ew_neq16(ew_half32(a, 1), ew_half32(b, 1)) << 16;
#endif
}

/* The ReLU of 32 bfloat16 outputs that the test accepted (nonzero, with y's sign):
 * negative ones set to +0. Returns the mask bits (the positive ones). */
SBN_INLINE uint32_t ew_relu32(sbn_v16u *o)
{
#if SBN_AVX512
    const __m512i z = _mm512_setzero_si512();
    const uint32_t pos = _mm512_cmpgt_epi16_mask((__m512i)*o, z);
    *o = (sbn_v16u)_mm512_max_epi16((__m512i)*o, z);
    return pos;
#elif defined(__AVX2__)
    /* Signed 16-bit: the positive words are the nonzero ones without the sign bit,
     * and max(w, 0) keeps them and turns the others (-0 included) into +0. */
    const __m256i z = _mm256_setzero_si256(), w0 = (__m256i)ew_half32(*o, 0), w1 = (__m256i)ew_half32(*o, 1);
    *o = ew_join32((sbn_v8w)_mm256_max_epi16(w0, z), (sbn_v8w)_mm256_max_epi16(w1, z));
    return ew_bits16(_mm256_cmpgt_epi16(w0, z)) | (uint32_t)ew_bits16(_mm256_cmpgt_epi16(w1, z)) << 16;
#else
    uint16_t h[32];
    memcpy(h, o, sizeof h);
    uint32_t pos = 0;
    for (int j = 0; j < 32; j++) {
        const int p = h[j] && !(h[j] & 0x8000u);
        pos |= (uint32_t)p << j;
        h[j] = p ? h[j] : 0;
    }
    memcpy(o, h, sizeof h);
    return pos;
#endif
}

/* fm(a, b, c) of "bfloat16 in float" on 16 lanes: a b + c rounded once (a fused
 * multiply-add), or, without one, in double (a b exact) and rounded to float. */
SBN_INLINE sbn_v16f ew_fm16(sbn_v16f a, sbn_v16f b, sbn_v16f c)
{
#if defined(__AVX512F__)
    return (sbn_v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    __m256 h[3][2];
    memcpy(h[0], &a, sizeof a), memcpy(h[1], &b, sizeof b), memcpy(h[2], &c, sizeof c);
    const __m256 r[2] = {_mm256_fmadd_ps(h[0][0], h[1][0], h[2][0]), _mm256_fmadd_ps(h[0][1], h[1][1], h[2][1])};
    sbn_v16f o;
    memcpy(&o, r, sizeof o);
    return o;
#else
    typedef double v16d __attribute__((vector_size(128)));
    const v16d p = __builtin_convertvector(a, v16d) * __builtin_convertvector(b, v16d);
    return __builtin_convertvector(p + __builtin_convertvector(c, v16d), sbn_v16f);
#endif
}

/* y's two ends for the test: fm(y, 1 + R, sd) in *far and fm(y, 1 - R, -sd) in *near,
 * sd = d >= 0 with y's sign bit. */
SBN_INLINE void ew_ends16(const ew_args *e, sbn_v16f y, sbn_v16f d, sbn_v16f *far, sbn_v16f *near)
{
    const sbn_v16f sd = (sbn_v16f)(((sbn_v16u)y & 0x80000000u) | (sbn_v16u)d);
    *far = ew_fm16(y, ew_bcastf(e->R1p), sd);
    *near = ew_fm16(y, ew_bcastf(e->R1m), -sd);
}

/* 16 outputs at f in float, up to the test above: y, its ends *F and *N, and g's bits
 * in *gh (dx: the masked dy, which is dz; with EW_NOOUT nothing else). Nothing is
 * stored. */
SBN_INLINE void ew_fast_ends(int v, const ew_args *e, int64_t f, const ew_fcoef *q, sbn_v16f *yo, sbn_v16f *F,
                             sbn_v16f *N, sbn_v8w *gh)
{
    sbn_v16f y, d; /* the result, and d of the test */
    const sbn_v16f R = ew_bcastf(e->R);
    if (v & EW_DX) {
        *gh = ew_ldh16(e->dy, f);
        if ((v & EW_RELU) && ((v & EW_DZ) || !EW_MASKED_MUL))
            *gh = sbn_keep16_at(*gh, e->mask, f);
    }
    if (v & EW_NOOUT) /* dz only: a copy */
        return;
    const sbn_v16f x = ew_widen16(ew_ldh16(e->x, f));
    if (!(v & EW_DX)) {
        y = ew_fm16(q->k, x, q->c);
        d = q->e;
        if (v & EW_ADD) {
            d = ew_fm16(ew_absf(y), R, q->e);
            y += ew_widen16(ew_ldh16(e->dy, f));
        }
    } else {
        const sbn_v16f g = ew_widen16(*gh);
        sbn_v16f w;
#if EW_MASKED_MUL
        /* With the ReLU and no dz, where the mask is clear w is cf itself (a masked
         * fused multiply-add keeps its addend) instead of fm(kf, +0, cf): the mask's
         * load is then off the path from dy's load to the result, and no operation is
         * added. The two differ only in the sign of a zero w, which can change only
         * the sign of a zero r, which the test rejects (c): every accepted value is
         * the same. */
        if ((v & EW_RELU) && !(v & EW_DZ))
            w = (sbn_v16f)_mm512_mask3_fmadd_ps((__m512)q->k, (__m512)g, (__m512)q->c, sbn_kmask16(e->mask, f));
        else
#endif
            w = ew_fm16(q->k, g, q->c);
        y = ew_fm16(-q->b, x, w);
        d = ew_fm16(ew_absf(w), R, q->e);
    }
    *yo = y;
    ew_ends16(e, y, d, F, N);
}

/* 16 outputs at f in float. Returns 1 when the test above accepts them, with their
 * bfloat16 bits in *o (normalize and dx), the ReLU mask bits in *bits (normalize),
 * and g's bits in *gh (dx); else 0, and the exact path must do them. Nothing is
 * stored. */
SBN_INLINE int ew_fast(int v, const ew_args *e, int64_t f, const ew_fcoef *q, sbn_v8w *o, sbn_v8w *gh,
                       unsigned *bits)
{
    sbn_v16f y, F, N;
    ew_fast_ends(v, e, f, q, &y, &F, &N, gh);
    if (v & EW_NOOUT)
        return 1;
    const sbn_v8w hi = ew_round16(F);
    *o = hi;
    if (!(v & EW_DX) && (v & EW_RELU)) { /* accepted: y's rounding is nonzero with its sign */
        *bits = ew_gt16(y, (sbn_v16f){0});
        *o = sbn_keep16(hi, *bits);
    }
    return !(ew_nonfinite16(y) | ew_neq16(hi, ew_round16(N)));
}

/* Stores what ew_fast accepted: 16 outputs at f. */
SBN_INLINE void ew_fast_store(int v, const ew_args *e, int64_t f, sbn_v8w o, sbn_v8w g, int nt)
{
    if (!(v & EW_NOOUT))
        ew_st16h(e->out, f, o, nt);
    if (v & EW_DZ)
        ew_st16h(e->out2, f, g, v & EW_NOOUT ? nt : nt && e->nt2);
}

/* Points e's float coefficients into the block of fast_coef (NULL: none). */
static void ew_fast_args(ew_args *e, const float *f, int64_t C, float R)
{
    const int64_t W = fast_stride(C);
    e->fk = f, e->fc = f ? f + W : NULL, e->fb = f ? f + 2 * W : NULL, e->fe = f ? f + 3 * W : NULL;
    e->R = bf16_path == 2 ? 0.0f : R; /* the test switch's mode 2: no margin */
    e->R1p = 1 + e->R, e->R1m = 1 - e->R; /* exact */
}

/* The channel k elements after channel c (NHWC; a division only when C < k). */
SBN_INLINE int64_t next_c(int64_t c, int64_t k, int64_t C)
{
    return C >= k ? (c + k >= C ? c + k - C : c + k) : (c + k) % C;
}

/* 8 outputs at f on the exact path (channel c at f when lanes). */
SBN_INLINE unsigned ew_step8(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q, int nt)
{
    if (lanes)
        ew_coef_lanes(v, e, c, q);
    return ew_vec(v, e, f, q, 8, nt);
}

/* 16 bfloat16 outputs at f on the exact path: two vectors of 8. */
SBN_INLINE unsigned ew_exact16(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q, int nt)
{
    const unsigned lo = ew_step8(v, lanes, e, f, c, q, nt);
    return lo | ew_step8(v, lanes, e, f + 8, lanes ? next_c(c, 8, e->C) : c, q, nt) << 8;
}

/* 16 bfloat16 outputs at f on the exact path, as ew_exact16 gives them, but not
 * stored: their bits in *o (dz, which is g's bits, ew_fast or ew_fast_ends has already). Returns the
 * ReLU mask bits. So that a vector which falls back still goes out in its whole
 * 64-byte line: two 32-byte or four 16-byte streaming stores into one line cost a
 * partial write each time the line leaves the write-combining buffer before it is
 * full (on a 1.7 % fallback rate, the bfloat16 normalize took twice as long).
 * dz's bits can differ from the exact path's only for a signalling NaN in dy, which
 * passing through double quiets on some builds and not on others; the layer never
 * writes such a dz: a NaN or Inf in an unmasked dy makes the gradient sums
 * non-finite, and the call fails before dz is written. */
SBN_INLINE unsigned ew_exact16v(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q, sbn_v8w *o)
{
    sbn_v8f r[2];
    unsigned bits = 0;
    for (int h = 0; h < 2; h++) {
        if (lanes)
            ew_coef_lanes(v, e, h ? next_c(c, 8, e->C) : c, q);
        const unsigned gb = (v & EW_DX) && (v & EW_RELU) ? sbn_mask8(e->mask, f + 8 * h) : 0;
        sbn_v8d g;
        r[h] = ew_val(v, e, f + 8 * h, q, 8, gb, &g);
        if (!(v & EW_DX) && (v & EW_RELU))
            bits |= sbn_relu8(&r[h]) << 8 * h;
    }
    /* bfloat16 values as floats (low 16 bits zero): their upper halves */
    const sbn_v16u u = __builtin_shufflevector((sbn_v8w)r[0], (sbn_v8w)r[1], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                               12, 13, 14, 15);
    *o = (sbn_v8w)__builtin_convertvector(u >> 16, sbn_v16h);
    return bits;
}

/* The halves of 32 bfloat16 outputs at f (in *o, with their ReLU mask bits, returned)
 * where the test rejected a lane (rej: a bit per lane), recomputed on the exact path
 * (ew_exact16v). Returns the mask bits, and counts the halves in *fallbacks. */
SBN_INLINE uint32_t ew_redo32(int v, int lanes, const ew_args *e, int64_t f, int64_t c, int64_t c1, ew_coef *q,
                              uint32_t rej, sbn_v16u *o, uint32_t bits, int64_t *fallbacks)
{
    sbn_v8w h[2] = {ew_half32(*o, 0), ew_half32(*o, 1)};
    for (int j = 0; j < 2; j++)
        if (rej >> 16 * j & 0xFFFFu) {
            ++*fallbacks;
            const uint32_t b = ew_exact16v(v, lanes, e, f + 16 * j, j ? c1 : c, q, &h[j]);
            bits = (bits & ~(UINT32_C(0xFFFF) << 16 * j)) | b << 16 * j;
        }
    *o = ew_join32(h[0], h[1]);
    return bits;
}

/* 32 bfloat16 outputs at f (channel c at f when lanes): in float, two vectors of 16,
 * tested together (one rounding of 32 ends, one compare, one branch); a half with a
 * rejected lane is redone on the exact path (ew_redo32). Stored as one 64-byte store
 * either way (a whole line when streaming). cnt[1] counts the fallbacks (halves).
 * Returns the 32 ReLU mask bits. */
SBN_INLINE unsigned ew_step32(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q,
                              const ew_fcoef *fq, int nt, int64_t *cnt)
{
    const int64_t c1 = lanes ? next_c(c, 16, e->C) : c;
    if (!e->fk)
        return ew_exact16(v, lanes, e, f, c, q, nt) | ew_exact16(v, lanes, e, f + 16, c1, q, nt) << 16;
    ew_fcoef l0, l1;
    if (lanes)
        ew_fcoef_lanes(v, e, c, &l0), ew_fcoef_lanes(v, e, c1, &l1);
    sbn_v16f y0, y1, F0, F1, N0, N1;
    sbn_v8w g0 = {0}, g1 = {0};
    ew_fast_ends(v, e, f, lanes ? &l0 : fq, &y0, &F0, &N0, &g0);
    ew_fast_ends(v, e, f + 16, lanes ? &l1 : fq, &y1, &F1, &N1, &g1);
    uint32_t bits = 0;
    if (!(v & EW_NOOUT)) {
        sbn_v16u o = ew_round32(F0, F1);
        const uint32_t rej =
            (ew_nonfinite16(y0) | ew_nonfinite16(y1) << 16) | ew_neq32(o, ew_round32(N0, N1));
        if (!(v & EW_DX) && (v & EW_RELU))
            bits = ew_relu32(&o);
        if (__builtin_expect(rej != 0, 0))
            bits = ew_redo32(v, lanes, e, f, c, c1, q, rej, &o, bits, &cnt[1]);
        ew_st32h(e->out, f, o, nt);
    }
    if (v & EW_DZ)
        ew_st32h(e->out2, f, ew_join32(g0, g1), v & EW_NOOUT ? nt : nt && e->nt2);
    return bits;
}

/* 16 bfloat16 outputs at f, as one half of ew_step32. */
SBN_INLINE unsigned ew_step16(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q,
                              const ew_fcoef *fq, int nt, int64_t *cnt)
{
    if (e->fk) {
        ew_fcoef l;
        if (lanes)
            ew_fcoef_lanes(v, e, c, &l);
        sbn_v8w o = {0}, gh = {0};
        unsigned bits = 0;
        if (ew_fast(v, e, f, lanes ? &l : fq, &o, &gh, &bits)) {
            ew_fast_store(v, e, f, o, gh, nt);
            return bits;
        }
        cnt[1]++;
    }
    return ew_exact16(v, lanes, e, f, c, q, nt);
}

/* ---- float on 16 lanes ----
 * A float step does 16 outputs: two exact vectors of 8 (ew_val: 8 doubles each), whose
 * rounded results are joined into one vector of 16 floats, so that the ReLU (compare
 * and clamp) runs once per 16 lanes and its 16 mask bits come from one compare, and
 * the outputs go out as one 64-byte store (a whole line when streaming). The values
 * are ew_vec's. AVX-512 builds only; the others step by 8. */
#if SBN_AVX512
#define EW_F32_W 16

/* The ReLU as a vfixupimmps table: one 4-bit response per class of input (QNaN, SNaN,
 * zero, one, -Inf, +Inf, negative, positive, from the low nibble up): 1 = the input,
 * 2 = the input quieted, 8 = +0. */
#define EW_RELU_FIXUP 0x18181821

SBN_INLINE __m512 ew_join16(sbn_v8f lo, sbn_v8f hi)
{
    return _mm512_insertf32x8(_mm512_castps256_ps512((__m256)lo), (__m256)hi, 1);
}

/* 16 floats at element i; streaming when nt (i's address is then 64-byte aligned). */
SBN_INLINE void ew_st16f(void *p, int64_t i, __m512 o, int nt)
{
    if (nt)
        _mm512_stream_ps((float *)p + i, o);
    else
        _mm512_storeu_ps((float *)p + i, o);
}

/* 8 gradient outputs at f of one channel with the ReLU (bits gb) and no dz: ew_val's
 * values with the mask applied to g - a instead of g. Where the bit is clear, g is +0
 * and g - a is fl(0 - a), which the row's coefficients hold (q->na): a merge-masked
 * subtraction gives it, so dy is widened unmasked (its load a memory operand of the
 * conversion, as in the plain pass) and the masking costs no operation. */
SBN_INLINE sbn_v8f ew_dx_merge(const ew_args *e, int64_t f, const ew_coef *q, unsigned gb)
{
    const sbn_v8d g = sbn_ld8(SYNCBN_F32, e->dy, f), x = sbn_ld8(SYNCBN_F32, e->x, f);
    const sbn_v8d ga = (sbn_v8d)_mm512_mask_sub_pd((__m512d)q->na, (__mmask8)gb, (__m512d)g, (__m512d)q->a);
    const sbn_v8d r = q->k * (ga - (x - q->m) * q->b);
    return sbn_round8(SYNCBN_F32, &r);
}

/* Returns the 16 ReLU mask bits (normalize with EW_RELU) in a mask register. gb0, gb1:
 * the mask bits of outputs f .. f+7 and f+8 .. f+15 (gradient with EW_RELU): two
 * bytes, so that each can go to its mask register straight from memory. */
SBN_INLINE __mmask16 ew_step16k(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q, int nt,
                                unsigned gb0, unsigned gb1)
{
    sbn_v8d g0, g1;
    if ((v & EW_DX) && (v & EW_RELU) && !(v & EW_DZ) && !lanes) { /* one row: see ew_dx_merge */
        const sbn_v8f lo = ew_dx_merge(e, f, q, gb0), hi = ew_dx_merge(e, f + 8, q, gb1);
        ew_st16f(e->out, f, ew_join16(lo, hi), nt);
        return 0;
    }
    if (lanes)
        ew_coef_lanes(v, e, c, q);
    const sbn_v8f o0 = ew_val(v, e, f, q, 8, gb0, &g0);
    if (lanes)
        ew_coef_lanes(v, e, next_c(c, 8, e->C), q);
    const sbn_v8f o1 = ew_val(v, e, f + 8, q, 8, gb1, &g1);
    __mmask16 bits = 0;
    if (!(v & EW_NOOUT)) {
        __m512 o = ew_join16(o0, o1);
        if (!(v & EW_DX) && (v & EW_RELU)) { /* sbn_relu8's values, on 16 lanes */
            bits = _mm512_cmp_ps_mask(o, _mm512_setzero_ps(), _CMP_GT_OQ);
            /* One vfixupimmps for sbn_relu8's add and max: a table per class of
             * input, here +0 for -Inf, negatives and +-0, the value itself for
             * positives, +Inf and quiet NaN, and a signalling NaN quieted (as the
             * addition does; tests/test_apply compares the two on every class). */
            o = _mm512_fixupimm_ps(o, o, _mm512_set1_epi32(EW_RELU_FIXUP), 0);
        }
        ew_st16f(e->out, f, o, nt);
    }
    if (v & EW_DZ)
        ew_st16f(e->out2, f, ew_join16(sbn_exact8(&g0), sbn_exact8(&g1)), v & EW_NOOUT ? nt : nt && e->nt2);
    return bits;
}

SBN_INLINE unsigned ew_step16f(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q, int nt)
{
    const unsigned gb = (v & EW_DX) && (v & EW_RELU) ? sbn_mask16(e->mask, f) : 0;
    return ew_step16k(v, lanes, e, f, c, q, nt, gb & 0xFFu, gb >> 8);
}

/* 64 outputs at f (4 steps of 16, channel c at f when lanes; *c advanced), and their
 * mask bits as one word, put together in mask registers (kunpckwd, kunpckdq): the
 * 16-bit pieces never pass through general registers one by one. */
SBN_INLINE uint64_t ew_step64k(int v, int lanes, const ew_args *e, int64_t f, int64_t *c, ew_coef *q, int nt)
{
    __mmask16 b[4];
    for (int j = 0; j < 4; j++) {
        b[j] = ew_step16k(v, lanes, e, f + 16 * j, *c, q, nt, 0, 0);
        if (lanes)
            *c = next_c(*c, 16, e->C);
    }
    return _cvtmask64_u64(_mm512_kunpackd(_mm512_kunpackw(b[3], b[2]), _mm512_kunpackw(b[1], b[0])));
}

/* 64 gradient outputs at f with the ReLU mask. Where bit f starts a byte, the bits of
 * each 8 outputs are one byte, loaded as such (no shifts); else its 64 bits are read
 * as one word (two) and cut into bytes. */
SBN_INLINE void ew_step64g(int v, int lanes, const ew_args *e, int64_t f, int64_t *c, ew_coef *q, int nt)
{
    if (!(f & 7)) {
        const uint8_t *mb = e->mask + f / 8;
        for (int j = 0; j < 4; j++) {
            ew_step16k(v, lanes, e, f + 16 * j, *c, q, nt, mb[2 * j], mb[2 * j + 1]);
            if (lanes)
                *c = next_c(*c, 16, e->C);
        }
        return;
    }
    const uint64_t gb = sbn_mask64(e->mask, f);
    for (int j = 0; j < 4; j++) {
        ew_step16k(v, lanes, e, f + 16 * j, *c, q, nt, (unsigned)(gb >> 16 * j) & 0xFFu,
                   (unsigned)(gb >> (16 * j + 8)) & 0xFFu);
        if (lanes)
            *c = next_c(*c, 16, e->C);
    }
}
#else
#define EW_F32_W 8
#define ew_step16f ew_step8
#endif

/* W outputs at f: ew_step32 (bfloat16, W = 32), or float, W = EW_F32_W. */
SBN_INLINE unsigned ew_step(int v, int lanes, const ew_args *e, int64_t f, int64_t c, ew_coef *q,
                            const ew_fcoef *fq, int nt, int64_t *cnt)
{
    if (v & EW_BF16)
        return ew_step32(v, lanes, e, f, c, q, fq, nt, cnt);
    return EW_F32_W == 16 ? ew_step16f(v, lanes, e, f, c, q, nt) : ew_step8(v, lanes, e, f, c, q, nt);
}

/* Outputs [f0, f1). lanes == 0: all of channel c (an NCHW row). lanes == 1: channel
 * c at f0, advancing with f and wrapping at C (NHWC). Streaming stores for the whole
 * cache lines of the output only, when nt. Returns the channel after f1 (lanes == 1). */
SBN_INLINE int64_t ew_span(int v, int lanes, const ew_args *args, int64_t f0, int64_t f1, int64_t c, int nt,
                           bitw *bw, int64_t *count)
{
    /* A local copy: the compiler then knows the output stores cannot change the
     * pointers, and keeps them in registers instead of reloading them every step. */
    const ew_args local = *args, *e = &local;
    bitw lbw = *bw; /* by value: see bitw */
    const int dt = v & EW_BF16 ? SYNCBN_BF16 : SYNCBN_F32;
    const int64_t C = e->C, es = sbn_esize(dt), line = 64 / es;
    const int W = v & EW_BF16 ? 32 : EW_F32_W; /* outputs per step */
    ew_coef q;
    ew_fcoef fq = {.k = {0}};
    int64_t cnt[2] = {count[0], count[1]}; /* vectors of 16 tried in float, fallbacks */
    if (!lanes)
        ew_coef_row(v, e, c, &q);
    if (!lanes && (v & EW_BF16) && e->fk)
        ew_fcoef_row(v, e, c, &fq);
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
        const int64_t end = part == 0 ? h : part == 1 ? g : f1, fs = f;
        const int stream = part == 1;
#if EW_F32_W == 16
        if ((v & EW_MASK) && !(v & EW_BF16))
            for (; f + 64 <= end; f += 64)
                bw_put(&lbw, ew_step64k(v, lanes, e, f, &c, &q, stream), 64);
        if ((v & EW_DX) && (v & EW_RELU) && !(v & EW_BF16))
            for (; f + 64 <= end; f += 64)
                ew_step64g(v, lanes, e, f, &c, &q, stream);
#endif
        if (v & EW_MASK) /* 64 outputs a step: one word of mask bits, put at once */
            for (; f + 64 <= end; f += 64) {
                uint64_t bits = 0;
#pragma GCC unroll 8
                for (int j = 0; j < 64 / W; j++) {
                    bits |= (uint64_t)ew_step(v, lanes, e, f + W * j, c, &q, &fq, stream, cnt) << W * j;
                    if (lanes)
                        c = next_c(c, W, C);
                }
                bw_put(&lbw, bits, 64);
            }
        for (; f + W <= end; f += W) {
            const unsigned bits = ew_step(v, lanes, e, f, c, &q, &fq, stream, cnt);
            if (v & EW_MASK)
                bw_put(&lbw, bits, W);
            if (lanes)
                c = next_c(c, W, C);
        }
        if (W == 32 && f + 16 <= end) {
            const unsigned bits = ew_step16(v, lanes, e, f, c, &q, &fq, stream, cnt);
            if (v & EW_MASK)
                bw_put(&lbw, bits, 16);
            if (lanes)
                c = next_c(c, 16, C);
            f += 16;
        }
        if ((v & EW_BF16) && e->fk) /* every vector of 16 so far went through ew_fast_ends */
            cnt[0] += (f - fs) / 16;
        if (W >= 16 && f + 8 <= end) {
            const unsigned bits = ew_step8(v, lanes, e, f, c, &q, stream);
            if (v & EW_MASK)
                bw_put(&lbw, bits, 8);
            if (lanes)
                c = next_c(c, 8, C);
            f += 8;
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
    count[0] = cnt[0], count[1] = cnt[1];
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
    int64_t count[2] = {0, 0};
    if (nchw) {
        for (int64_t r = r0; r < r1; r++)
            ew_span(v, 0, e, r * sh.S, (r + 1) * sh.S, r % sh.C, nt, &bw, count);
    } else {
        ew_span(v, 1, e, f0, f1, 0, nt, &bw, count);
    }
    if (count[0]) {
        __atomic_fetch_add(&bf16_vectors, (uint64_t)count[0], __ATOMIC_RELAXED);
        __atomic_fetch_add(&bf16_fallbacks, (uint64_t)count[1], __ATOMIC_RELAXED);
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
                   const double *scale, const double *shift, float *scratch, sbn_shape sh)
{
    ew_args e = {.out = y, .x = x, .dy = z, .m = mean, .k = scale, .a = shift, .mask = mask, .C = sh.C};
    const float *fc = fast_coef(&e, 0, sh, scratch);
    ew_fast_args(&e, fc, sh.C, 0x1p-22f);
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
                     const double *k, const double *a, const double *b, float *scratch, sbn_shape sh)
{
    if (!dx && !dz)
        return;
    /* With no dx, dz is the output that owns the streaming grid. */
    ew_args e = {.out = dx ? dx : dz, .out2 = dz, .x = x, .dy = dy, .m = mean, .k = k, .a = a, .b = b,
                       .mask = (uint8_t *)mask, .C = sh.C,
                       .nt2 = dx && dz && (((uintptr_t)dx ^ (uintptr_t)dz) & 63) == 0};
    const float *fc = fast_coef(&e, 1, sh, scratch);
    ew_fast_args(&e, fc, sh.C, 0x1p-22f);
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
