/*
 * moments.h - local (one rank, no communication) kernels of batch normalization:
 * the interface of sums.c (per-channel sums, FAST and exact) and apply.c (the
 * elementwise passes: normalize with its epilogues, and the input gradient). Both are
 * written against simd.h, once for every element type and epilogue.
 *
 * These are the named per-channel steps of BN; a synchronized BN inserts its one
 * allreduce between the sums and the normalization.
 *
 * Reduction order (a design decision, see docs/reproducible.md):
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

#include <ctype.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "exactsum.h"
#include "syncbn.h"

typedef struct {
    int64_t n, C, S;
    syncbn_layout layout;
    syncbn_dtype dt; /* element type of every activation tensor (0, the default: float) */
} sbn_shape;

/* Tensors are `const void *` of element type sh.dt, indexed by element. The ReLU
 * mask (`mask`): bit e set where element e's forward pre-activation was > 0, in
 * element order (simd.h); NULL where there is no ReLU. Readers may load a few bytes
 * past the last element's byte, so a mask buffer ends at least one 64-bit word after
 * it, as the layer's does (layer.c, mask_reserve).
 *
 * Forward sums: s1 = sum x, s2 = sum x^2 per channel.
 * FAST: acc1 == NULL; writes s1[C], s2[C] (overwritten).
 * REPRODUCIBLE: s1 == s2 == NULL; deposits into accumulators acc1[c*W1...],
 *   acc2[c*W2...] (W = sbx_words(SBX_LINEAR/QUADRATIC)), which the caller zeroed.
 * REPRODUCIBLE, rounded (all four given: one rank, nothing to merge): writes s1[C],
 *   s2[C] = the exact sums rounded once, the bits sbx_round gives for the accumulators
 *   above (NaN or +-Inf where a term was); acc1, acc2 are scratch, in any state
 *   before, unspecified after. */
void sbn_forward_sums(const void *x, sbn_shape sh, double *s1, double *s2, int64_t *acc1,
                      int64_t *acc2);

/* Backward sums: s1 = sum g, s2 = sum g*(x - mean) per channel; same modes. g = dy,
 * or with a mask, dy where the mask is set and +0 elsewhere. */
void sbn_backward_sums(const void *x, const void *dy, const uint8_t *mask, const double *mean, sbn_shape sh,
                       double *s1, double *s2, int64_t *acc1, int64_t *acc2);

/* The elementwise passes read per-channel arrays of C + SBN_COEF_PAD doubles whose
 * last SBN_COEF_PAD entries continue the first C periodically (entry C + j is entry
 * j mod C), so that an NHWC vector of channels c .. c+7 is one load even where it
 * wraps past C - 1. sbn_coef_wrap(a, C) fills them in. */
#define SBN_COEF_PAD 8

/* Below SBN_OMP_MIN_WORK elements a kernel stays on one thread. A parallel region
 * costs the wake-up of the team's other threads: next to nothing while they still
 * spin after the previous region (OpenMP's default for a while), a futex wake-up
 * through the kernel when they sleep, which OMP_WAIT_POLICY=passive makes them do at
 * once. That costs about what a second thread saves on a pass over a few hundred
 * thousand elements, so under "passive" the kernels split only from 2^20 elements
 * on, otherwise from 2^15. The variable is read once per source file (each has its
 * own cache), as the OpenMP runtimes read it (case and surrounding white space
 * ignored). Nothing but the time
 * depends on the thread count. */
#define SBN_OMP_MIN_WORK sbn_omp_min_work()
static inline int sbn_passive_wait(void)
{
    const char *s = getenv("OMP_WAIT_POLICY");
    static const char word[] = "passive";
    if (!s)
        return 0;
    while (isspace((unsigned char)*s))
        s++;
    for (size_t i = 0; i < sizeof word - 1; i++, s++)
        if ((*s | 0x20) != word[i])
            return 0;
    while (isspace((unsigned char)*s))
        s++;
    return *s == '\0';
}
static inline int64_t sbn_omp_min_work(void)
{
    static int64_t min_work; /* 0: not read yet; every thread computes the same value */
    int64_t w = __atomic_load_n(&min_work, __ATOMIC_RELAXED);
    if (!w) {
        w = sbn_passive_wait() ? (int64_t)1 << 20 : (int64_t)1 << 15;
        __atomic_store_n(&min_work, w, __ATOMIC_RELAXED);
    }
    return w;
}
void sbn_coef_wrap(double *a, int64_t C);

/* y = act((x - mean[c]) * scale[c] + shift[c] [+ z]), in double, rounded once to the
 * element type; act is ReLU when relu != 0 (then, if mask is not NULL, the mask of
 * the rounded pre-activations is written: one bit per element, mask 8-byte aligned
 * with room for n*C*S bits). z may be NULL; y may equal x or z. mean, scale, shift:
 * [C + SBN_COEF_PAD], wrapped. Any alignment of the tensors gives the same bits. */
void sbn_normalize(void *y, const void *x, const void *z, int relu, uint8_t *mask, const double *mean,
                   const double *scale, const double *shift, float *scratch, sbn_shape sh);

/* dx = k[c] * (g - a[c] - (x - mean[c]) * b[c]), in double, rounded once, and dz = g
 * (g as in sbn_backward_sums). dx or dz may be NULL (both: nothing to do); dx may
 * equal dy or x, dz may equal dy. mean, k, a, b: [C + SBN_COEF_PAD], wrapped. */
void sbn_backward_dx(void *dx, void *dz, const void *x, const void *dy, const uint8_t *mask, const double *mean,
                     const double *k, const double *a, const double *b, float *scratch, sbn_shape sh);

/* scratch (both passes): the bfloat16 passes' float coefficients, written by every
 * call, sbn_apply_scratch_floats(C) floats, 64-byte aligned, owned by the caller (the
 * layer allocates it at create, so no call allocates). NULL: every bfloat16 output
 * takes the exact double path (the same bits, slower); unused for float elements. */
int64_t sbn_apply_scratch_floats(int64_t C);

/* bfloat16 passes compute in float and fall back to the exact double path per vector
 * of 16 outputs where a bound says the rounding could differ (apply.c). For tests and
 * benchmarks, not part of the API: sbn_bf16_counts reads the vectors tried in float
 * and those that fell back, since the process started (all threads); and
 * sbn_test_bf16_path(mode) selects 0: the real test (the default), 1: the exact path
 * only, 2: a margin of zero, which trusts float wherever it is finite. Mode 2 breaks
 * the bitwise contract on purpose, so that tests can show they tell the paths apart.
 * Not thread-safe. */
SYNCBN_EXTERN void sbn_bf16_counts(uint64_t *vectors, uint64_t *fallbacks);
SYNCBN_EXTERN void sbn_test_bf16_path(int mode);

/* REPRODUCIBLE S == 1 sums, for tests: the sums of single channels (lanes) that one
 * checked pass formed since the process started (all threads, forward and backward),
 * and those of them that the check did not certify, so that their group of lanes was
 * summed again (sums.c, s1_verify). */
SYNCBN_EXTERN void sbn_s1_counts(uint64_t *checked, uint64_t *missed);

#endif /* SYNCBN_MOMENTS_H */
