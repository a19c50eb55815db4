/*
 * exactref.h - an independent exact reference for tests of exact sums: a test-local
 * two's-complement big integer (no code shared with src/exactsum.c), fed doubles
 * through frexp and rounded by the hardware uint64 -> double conversion with a sticky
 * bit. Used by test_exactsum.c (the accumulator) and test_moments.c (the sum kernels).
 */
#ifndef SYNCBN_EXACTREF_H
#define SYNCBN_EXACTREF_H

#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exactsum.h"

/* Two's complement, REF_N uint32 words, bit 0 weighs 2^REF_LSB. */
#define REF_N 84
#define REF_LSB (-1280)
typedef struct {
    uint32_t w[REF_N];
} ref_t;

/* r += (neg ? -1 : 1) * m * 2^(REF_LSB + pos), m < 2^64. */
static inline void ref_add_int(ref_t *r, uint64_t m, int neg, int pos)
{
    ck_assert(pos >= 0 && pos + 64 < REF_N * 32);
    /* Spread m << pos over words, then add or subtract with a running carry. */
    uint32_t part[REF_N] = {0};
    for (int b = 0; b < 64; b++)
        if ((m >> b) & 1) part[(pos + b) / 32] |= UINT32_C(1) << ((pos + b) % 32);
    if (!neg) {
        uint64_t c = 0;
        for (int i = 0; i < REF_N; i++) {
            uint64_t t = (uint64_t)r->w[i] + part[i] + c;
            r->w[i] = (uint32_t)t;
            c = t >> 32;
        }
    } else {
        int64_t b = 0;
        for (int i = 0; i < REF_N; i++) {
            int64_t t = (int64_t)r->w[i] - part[i] - b;
            b = t < 0;
            r->w[i] = (uint32_t)(t + (b ? (INT64_C(1) << 32) : 0));
        }
    }
}

static inline void ref_add(ref_t *r, double x)
{
    if (x == 0) return;
    ck_assert(isfinite(x));
    int ex;
    double fr = frexp(fabs(x), &ex);
    uint64_t m = (uint64_t)ldexp(fr, 53); /* exact: fr has at most 53 bits */
    ref_add_int(r, m, x < 0, ex - 53 - REF_LSB);
}

/* Rounds to double via the hardware uint64 -> double conversion: the top 64 bits with
 * every lower bit ORed into bit 0 round exactly like the full number. Valid when the
 * result is normal, zero or overflows (ldexp then scales exactly or overflows). */
static inline double ref_round_any(const ref_t *r0) /* any result; only the range below is right */
{
    ref_t r = *r0;
    int neg = (r.w[REF_N - 1] >> 31) & 1;
    if (neg) { /* negate: invert and add one */
        uint64_t c = 1;
        for (int i = 0; i < REF_N; i++) {
            uint64_t t = (uint64_t)(uint32_t)~r.w[i] + c;
            r.w[i] = (uint32_t)t;
            c = t >> 32;
        }
    }
    int p = -1;
    for (int i = REF_N * 32 - 1; i >= 0; i--)
        if ((r.w[i / 32] >> (i % 32)) & 1) {
            p = i;
            break;
        }
    if (p < 0) return 0.0;
    int lo = p >= 63 ? p - 63 : 0;
    uint64_t u = 0;
    for (int i = lo; i <= p; i++) u |= (uint64_t)((r.w[i / 32] >> (i % 32)) & 1) << (i - lo);
    for (int i = 0; i < lo; i++)
        if ((r.w[i / 32] >> (i % 32)) & 1) {
            u |= 1;
            break;
        }
    double x = ldexp((double)u, lo + REF_LSB);
    return neg ? -x : x;
}

static inline double ref_round(const ref_t *r0)
{
    const double x = ref_round_any(r0);
    ck_assert_msg(x == 0 || isinf(x) || fabs(x) >= DBL_MIN, "reference used outside its range");
    return x;
}

/* The normalized accumulator words that hold the reference's value: digits are the
 * reference's words from the format's lsb on, the top digit the signed rest. */
static inline void ref_words(const ref_t *r, sbx_format f, int64_t *want)
{
    int off = (f.lsb_exp - REF_LSB) / 32;
    ck_assert(off >= 0 && off + f.ndigits + 1 < REF_N);
    for (int i = 0; i < f.ndigits - 1; i++) want[i] = r->w[off + i];
    want[f.ndigits - 1] =
        (int64_t)((uint64_t)r->w[off + f.ndigits - 1] | (uint64_t)r->w[off + f.ndigits] << 32);
}

#endif /* SYNCBN_EXACTREF_H */
