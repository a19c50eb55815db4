/*
 * exactsum.h - exact, order-independent summation of doubles in integer fixed point.
 *
 * Internal API (not exported from libsyncbn.so; the training example compiles
 * exactsum.c into itself). In the spirit of Radford Neal's "small superaccumulator"
 * (xsum, arXiv 1505.05571): 32-bit digits held in int64 words, so that up to 2^30
 * deposits need no carry propagation, and so that many accumulators side by side
 * form ONE contiguous int64 buffer that MPI_Allreduce(MPI_INT64_T, MPI_SUM) combines
 * exactly and associatively across ranks.
 *
 * Because integer addition is exact and associative, the rounded result depends
 * only on the multiset of deposited values: not on their order, on how they were
 * grouped into accumulators, or on how many ranks or threads took part.
 *
 * What it deliberately does not do: cover the whole double range. A format picks a
 * window [2^lsb_exp, 2^(lsb_exp + 32*ndigits)); each deposited value is first rounded
 * to a multiple of 2^lsb_exp (to nearest, ties to even - a deterministic function of
 * the value alone, so reproducibility is kept) and values whose rounded magnitude
 * does not fit below 2^(lsb_exp + 32*ndigits - 32) (one digit of headroom for
 * carries and for sums of many values) are counted as +Inf or -Inf.
 *
 * Layout of one accumulator (sbx_words(f) int64 words):
 *   acc[0 .. ndigits-1]   digits, least significant first; digit i weighs
 *                         2^(lsb_exp + 32*i). Between normalizations a digit word
 *                         may hold any int64 of magnitude at most 2^62 + 2^32 (what
 *                         2^30 deposits, or a sum over ranks of unnormalized words
 *                         below 2^62 / P, can reach); sbx_normalize, sbx_merge and
 *                         sbx_round rely on that bound. After sbx_normalize, digits
 *                         0..ndigits-2 are in [0, 2^32) and the top digit carries the sign.
 *   acc[ndigits + 0]      count of NaN deposits
 *   acc[ndigits + 1]      count of +Inf deposits (incl. out-of-window positives)
 *   acc[ndigits + 2]      count of -Inf deposits (incl. out-of-window negatives)
 *
 * Threads: an accumulator must be touched by one thread at a time; distinct
 * accumulators are independent.
 */
#ifndef SYNCBN_EXACTSUM_H
#define SYNCBN_EXACTSUM_H

#include <mpi.h>
#include <stdint.h>

#define SBX_SPECIALS 3

typedef struct {
    int32_t lsb_exp; /* weight of digit 0 is 2^lsb_exp; a multiple of 32 */
    int32_t ndigits; /* number of 32-bit digits, 2 <= ndigits <= 64 */
} sbx_format;

/* int64 words in one accumulator of format f. */
static inline int64_t sbx_words(sbx_format f) { return (int64_t)f.ndigits + SBX_SPECIALS; }

/* Sets acc (sbx_words(f) words) to an exact zero. */
void sbx_zero(int64_t *acc, sbx_format f);

/* Adds v exactly (after rounding it to a multiple of 2^lsb_exp as described above).
 * NaN, +-Inf and out-of-window values go to the special counters. At most 2^30
 * deposits may be made between two calls of sbx_normalize. */
void sbx_add(int64_t *acc, sbx_format f, double v);

/* Adds v * 2^exp2 exactly, for exp2 >= f.lsb_exp (so no rounding is ever needed):
 * the way to deposit a sum that the caller formed exactly in a wider integer. It
 * counts as ONE deposit towards the 2^30 contract (each digit gets less than 2^32).
 * A value whose magnitude does not fit below 2^(lsb_exp + 32*ndigits - 32) is
 * counted as +Inf or -Inf, exactly as sbx_add treats an out-of-window double. */
void sbx_add_scaled(int64_t *acc, sbx_format f, __int128 v, int32_t exp2);

/* Adds n floats (a convenience for gradients; same as n calls of sbx_add). */
void sbx_add_floats(int64_t *acc, sbx_format f, const float *v, int64_t n);

/* Propagates carries so that digits 0..ndigits-2 lie in [0, 2^32); the exact value is
 * unchanged. Needed before 2^30 further deposits, and before sbx_merge or MPI. */
void sbx_normalize(int64_t *acc, sbx_format f);

/* acc += other, exactly (both normalized; acc is normalized afterwards). */
void sbx_merge(int64_t *acc, const int64_t *other, sbx_format f);

/* Normalizes `count` consecutive accumulators and combines them over comm in place
 * with ONE MPI_Allreduce(MPI_IN_PLACE, ..., MPI_INT64_T, MPI_SUM); afterwards they
 * are normalized again. Returns the MPI error code (MPI_SUCCESS on success).
 * Collective. Exact for up to 2^30 ranks (summed low digits stay below 2^62). */
int sbx_allreduce(int64_t *accs, int64_t count, sbx_format f, MPI_Comm comm);

/* The exact sum rounded once to double, to nearest with ties to even.
 * NaN if any NaN was deposited or both +Inf and -Inf were; +-Inf if only one sign
 * of infinity was deposited or the exact sum exceeds the double range.
 * acc need not be normalized (this function normalizes a private copy). */
double sbx_round(const int64_t *acc, sbx_format f);

/* Formats used by the library (documented here so the window choice is in one place):
 * SBX_LINEAR: sums of float-derived values (float data, double partial sums of up to
 *   2^40 floats): every float is a multiple of 2^-149 and below 2^128.
 * SBX_QUADRATIC: sums of products of two such values (x*x, dy*(x-mean)). */
/* Digits span 2^-160 .. 2^224; single deposits must stay below 2^192, larger ones count as +-Inf. */
#define SBX_LINEAR ((sbx_format){.lsb_exp = -160, .ndigits = 12})
/* Digits span 2^-320 .. 2^384; single deposits must stay below 2^352. */
#define SBX_QUADRATIC ((sbx_format){.lsb_exp = -320, .ndigits = 22})

/* ---- The wire format: what ranks send each other ----
 *
 * An accumulator above is 15 (LINEAR) or 25 (QUADRATIC) words, most of them zero: the
 * window must cover every value a sum might take, while one sum's occupied bits span
 * the range of its data (about 70 bits for sum x of N(0,1) floats, 110-150 for the
 * quadratic sums). The wire element of one sum is SBX_WIRE_WORDS int64 words:
 *
 *   w[0]            lo | hi << 32: the digits occupied on the sending ranks, on a grid
 *                   of 62-bit digits (digit g weighs 2^(lsb_exp + 62 g)): lo the lowest
 *                   digit holding a set bit, hi the digit holding the top bit of |value|.
 *                   SBX_WIRE_EMPTY for an exact zero, SBX_WIRE_OVER when the digits do
 *                   not fit, SBX_WIRE_PLAIN for a header element (plain int64 sums).
 *   w[1 .. K-1]     digits lo .. lo+K-2, each in [0, 2^62)
 *   w[K]            the signed rest above them (K = SBX_WIRE_WORDS - 1)
 *
 * sbx_wire_op (an MPI_Op over elements of SBX_WIRE_WORDS int64) merges two elements:
 * lo = min, hi = max, the digits aligned on the merged lo, added, and carries
 * propagated, so no word grows with the number of ranks. Exactness: the merged value
 * is kept only if hi - lo <= K - 2, i.e. every rank's value has a zero top word in
 * the merged window, so any partial sum of P such values is below P 2^(62 (K-1)) in
 * magnitude and its top word below P: exact for P < 2^62 (MPI counts ranks in an int).
 * Otherwise the element becomes SBX_WIRE_OVER, which absorbs everything. Whether that
 * happens depends only on the global min of lo and max of hi, never on the order or
 * grouping of the merges, so every rank sees the same verdict; the caller then sends
 * the full accumulators (one more allreduce, exact as before). A merged element is
 * the exact sum, so the rounded result is the same bits whichever way it travelled.
 * NaN/Inf counters do not travel per sum: the caller counts them per message. */
#define SBX_WIRE_WORDS 6
#define SBX_WIRE_DIGIT 62
#define SBX_WIRE_EMPTY ((int64_t)0xFFFF)   /* lo = 0xFFFF, hi = 0: neutral for min/max */
#define SBX_WIRE_OVER ((int64_t)-1)
#define SBX_WIRE_PLAIN INT64_MIN

/* Writes the wire element of acc (normalized; its NaN/Inf counters are not read).
 * Returns 0, or -1 if this value alone does not fit (w is then SBX_WIRE_OVER). */
int sbx_wire_pack(int64_t *w, const int64_t *acc, sbx_format f);

/* acc (sbx_words(f) words, written whole, counters zero) = the value of element w,
 * ready for sbx_round. Returns 0, or -1 for SBX_WIRE_OVER (acc is then zero). */
int sbx_wire_unpack(int64_t *acc, const int64_t *w, sbx_format f);

/* out += in, elementwise over *len elements, as MPI_User_function (commutative). */
void sbx_wire_op(void *in, void *inout, int *len, MPI_Datatype *type);

#endif /* SYNCBN_EXACTSUM_H */
