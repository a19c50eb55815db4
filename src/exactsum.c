/*
 * exactsum.c - exact, order-independent summation (see exactsum.h for the contract).
 *
 * Representation: a signed integer sum_i acc[i] * 2^(lsb_exp + 32*i), with acc[i]
 * int64 "digits" that are nominally 32 bits wide. A deposit adds the (rounded,
 * aligned) mantissa split into the 2-3 digits it overlaps; the 31 spare bits of
 * each word absorb 2^30 deposits before carries must be propagated (xsum's "small
 * superaccumulator", Neal 2015). Only sbx_normalize and sbx_round walk all digits.
 *
 * What it deliberately does not do: validate formats in the hot path, allocate,
 * print, or use libm. Values are taken apart from their IEEE bit patterns, so
 * denormals need no special casing beyond the missing hidden bit.
 *
 * Overflow: with at most 2^30 deposits of digits below 2^32 between
 * normalizations, |acc[i]| < 2^62 + 2^32, so plain int64 arithmetic cannot overflow;
 * the only place where a sign is shifted (carry extraction) is written so that it
 * never right-shifts a negative number (implementation-defined in C).
 *
 * Portability: needs GCC or Clang (__builtin_clz*, __attribute__((cold))).
 */
#include "exactsum.h"

#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define SBX_MASK32 UINT64_C(0xFFFFFFFF)

/* floor(x / 2^32) without right-shifting a negative value. */
static inline int64_t carry_of(int64_t x)
{
    return x >= 0 ? (x >> 32) : ~((~x) >> 32);
}

/* Bits of the window that deposits may use: values must stay below 2^(lsb + W). */
static inline int32_t window_bits(sbx_format f) { return 32 * (f.ndigits - 1); }

static inline int bitlen64(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

void sbx_zero(int64_t *acc, sbx_format f)
{
    memset(acc, 0, (size_t)sbx_words(f) * sizeof *acc);
}

/* Adds sign * m * 2^(lsb + s) for s >= 0, m < 2^54 (a mantissa, or a float bin),
 * whose top bit is below the window: each of the three digits gets less than 2^32.
 * neg is 0 or -1; (x ^ neg) - neg negates branch-free. */
static inline void deposit3(int64_t *acc, uint64_t m, int32_t s, int64_t neg)
{
    int32_t k = s >> 5, o = s & 31;
    uint64_t lo = (m << o) & SBX_MASK32;
    uint64_t hi = (m >> 1) >> (31 - o); /* = m * 2^o / 2^32, no shift by 32 at o = 0 */
    acc[k] += ((int64_t)lo ^ neg) - neg;
    acc[k + 1] += ((int64_t)(hi & SBX_MASK32) ^ neg) - neg;
    acc[k + 2] += ((int64_t)(hi >> 32) ^ neg) - neg;
}

/* Everything off the fast path: specials, values needing rounding to 2^lsb,
 * values near the top of the window, denormals near the edges. */
__attribute__((noinline, cold)) static void add_slow(int64_t *acc, sbx_format f, uint64_t bits)
{
    int64_t neg = -(int64_t)(bits >> 63);
    uint32_t e = (uint32_t)(bits >> 52) & 0x7FF;
    uint64_t m = bits & ((UINT64_C(1) << 52) - 1);
    if (e == 0x7FF) {
        acc[f.ndigits + (m ? 0 : (neg ? 2 : 1))] += 1;
        return;
    }
    if (e) m |= UINT64_C(1) << 52;
    if (!m) return;
    int32_t s = (int32_t)(e ? e : 1) - 1075 - f.lsb_exp;
    if (s < 0) {
        /* Round m * 2^s to an integer, ties to even. m < 2^53, so for -s >= 54
         * the value is below 1/2 and rounds to zero. */
        if (s <= -54) return;
        int32_t r = -s;
        uint64_t q = m >> r, rem = m & ((UINT64_C(1) << r) - 1), half = UINT64_C(1) << (r - 1);
        if (rem > half || (rem == half && (q & 1))) q += 1;
        if (!q) return;
        m = q;
        s = 0;
    }
    if (s + bitlen64(m) > window_bits(f)) {
        acc[f.ndigits + (neg ? 2 : 1)] += 1;
        return;
    }
    deposit3(acc, m, s, neg);
}

void sbx_add(int64_t *acc, sbx_format f, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    uint32_t e = (uint32_t)(bits >> 52) & 0x7FF;
    int32_t s = (int32_t)e - 1075 - f.lsb_exp;
    /* Fast path: a normal number (e - 1 < 0x7FE) that needs no rounding (s >= 0) and
     * fits entirely (s + 53 <= W); the last two in one unsigned comparison, which is
     * valid because W >= 53 is tested first (W is 32 for two-digit formats). */
    int32_t room = window_bits(f) - 53;
    if (e - 1 < 0x7FE && room >= 0 && (uint32_t)s <= (uint32_t)room) {
        uint64_t m = (bits & ((UINT64_C(1) << 52) - 1)) | (UINT64_C(1) << 52);
        deposit3(acc, m, s, -(int64_t)(bits >> 63));
        return;
    }
    add_slow(acc, f, bits);
}

void sbx_add_scaled(int64_t *acc, sbx_format f, __int128 v, int32_t exp2)
{
    if (!v) return;
    int64_t neg = v < 0 ? -1 : 0;
    /* Unsigned negation is defined for every value, including the most negative. */
    unsigned __int128 m = (unsigned __int128)v;
    if (neg) m = -m;
    uint64_t mhi = (uint64_t)(m >> 64);
    int32_t len = mhi ? 64 + bitlen64(mhi) : bitlen64((uint64_t)m);
    /* 64-bit arithmetic: exp2 may be anything, and s + len must not wrap. */
    int64_t s = (int64_t)exp2 - f.lsb_exp;
    if (s + len > window_bits(f)) {
        acc[f.ndigits + (neg ? 2 : 1)] += 1;
        return;
    }
    /* s >= 0 by contract and the top bit is below the window, so the digits touched,
     * k .. k + ceil((o + len) / 32) - 1, all lie below ndigits - 1. */
    int32_t k = (int32_t)(s >> 5), o = (int32_t)(s & 31);
    acc[k] += ((int64_t)(((uint64_t)m << o) & SBX_MASK32) ^ neg) - neg;
    m >>= 32 - o; /* o <= 31: never a shift by the full width */
    for (int32_t i = k + 1; m; i++, m >>= 32)
        acc[i] += ((int64_t)((uint64_t)m & SBX_MASK32) ^ neg) - neg;
}

/* One float, directly into the digits. */
static inline void add_float_direct(int64_t *acc, sbx_format f, uint32_t b)
{
    uint32_t e = (b >> 23) & 0xFF;
    uint32_t m = (b & 0x7FFFFF) | (e ? 0x800000u : 0);
    int32_t s = (int32_t)(e ? e : 1) - 150 - f.lsb_exp;
    if (e != 0xFF && s >= 0 && s + 24 <= window_bits(f)) {
        /* 24 mantissa bits + at most 31 bits of offset span at most 2 digits. */
        int64_t neg = -(int64_t)(b >> 31);
        int32_t k = s >> 5;
        uint64_t x = (uint64_t)m << (s & 31);
        acc[k] += ((int64_t)(x & SBX_MASK32) ^ neg) - neg;
        acc[k + 1] += ((int64_t)(x >> 32) ^ neg) - neg;
    } else {
        float v;
        memcpy(&v, &b, sizeof v);
        sbx_add(acc, f, (double)v); /* exact widening */
    }
}

/* Long arrays go through one int64 bin per float exponent (Neal's "large"
 * accumulator, on the stack): one read-modify-write per float instead of two, and
 * the bins are folded into the digits at the end of each chunk. A chunk holds at
 * most 2^30 floats, so |bin| < 2^24 * 2^30 = 2^54 and a flushed bin adds less than
 * 2^32 to each of the (at most 3) digits it overlaps - no more than the floats
 * themselves would have, so the 2^30-deposit contract is unchanged. Exponents whose
 * bin could reach the top of the window take the direct path. */
#define SBX_BIN_MIN_N 2048
#define SBX_BIN_CHUNK (INT64_C(1) << 30)

void sbx_add_floats(int64_t *acc, sbx_format f, const float *v, int64_t n)
{
    /* Bin e (e' = max(e, 1)) weighs 2^(e' - 150) = 2^(lsb + s): need s >= 0 and
     * s + 54 <= window bits. */
    int32_t elo = 150 + f.lsb_exp < 0 ? 0 : 150 + f.lsb_exp;
    int32_t ehi = window_bits(f) - 54 + 150 + f.lsb_exp;
    if (ehi > 254) ehi = 254;
    if (n < SBX_BIN_MIN_N || ehi < elo) {
        for (int64_t i = 0; i < n; i++) {
            uint32_t b;
            memcpy(&b, &v[i], sizeof b);
            add_float_direct(acc, f, b);
        }
        return;
    }
    const uint32_t span = (uint32_t)(ehi - elo);
    int64_t bins[256] = {0};
    for (int64_t c0 = 0; c0 < n; c0 += SBX_BIN_CHUNK) {
        int64_t c1 = n - c0 < SBX_BIN_CHUNK ? n : c0 + SBX_BIN_CHUNK;
        for (int64_t i = c0; i < c1; i++) {
            uint32_t b;
            memcpy(&b, &v[i], sizeof b);
            uint32_t e = (b >> 23) & 0xFF;
            if (e - (uint32_t)elo <= span) {
                int64_t neg = -(int64_t)(b >> 31);
                int64_t m = (int64_t)((b & 0x7FFFFF) | (e ? 0x800000u : 0));
                bins[e] += (m ^ neg) - neg;
            } else {
                add_float_direct(acc, f, b);
            }
        }
        for (int32_t e = elo; e <= ehi; e++) {
            int64_t x = bins[e];
            if (!x) continue;
            bins[e] = 0;
            int32_t s = (e ? e : 1) - 150 - f.lsb_exp;
            int64_t neg = x < 0 ? -1 : 0;
            deposit3(acc, (uint64_t)((x ^ neg) - neg), s, neg);
        }
    }
}

void sbx_normalize(int64_t *acc, sbx_format f)
{
    int32_t top = f.ndigits - 1;
    for (int32_t i = 0; i < top; i++) {
        int64_t c = carry_of(acc[i]);
        acc[i] = (int64_t)((uint64_t)acc[i] & SBX_MASK32);
        acc[i + 1] += c;
    }
}

void sbx_merge(int64_t *acc, const int64_t *other, sbx_format f)
{
    /* Normalized digits are below 2^32 and the specials are counts, so the word-wise
     * sums cannot overflow; the top digit is the signed high part of the value. */
    int64_t w = sbx_words(f);
    for (int64_t i = 0; i < w; i++) acc[i] += other[i];
    sbx_normalize(acc, f);
}

int sbx_allreduce(int64_t *accs, int64_t count, sbx_format f, MPI_Comm comm)
{
    int64_t w = sbx_words(f);
    for (int64_t c = 0; c < count; c++) sbx_normalize(accs + c * w, f);
    /* After the sum over P ranks the low digits are below P * 2^32 (fine for
     * P < 2^31) and each top digit is a sum of P signed top digits, which is the
     * signed high part of the exact total: the representation is positional, so
     * the signed top digit needs no special treatment. */
    int64_t total = count * w;
    int rc = MPI_SUCCESS;
    /* MPI counts are int; split very large buffers (not expected in practice). */
    while (total > 0 && rc == MPI_SUCCESS) {
        int n = total > (1 << 30) ? (1 << 30) : (int)total;
        rc = MPI_Allreduce(MPI_IN_PLACE, accs + (count * w - total), n, MPI_INT64_T, MPI_SUM, comm);
        total -= n;
    }
    if (rc != MPI_SUCCESS) return rc;
    for (int64_t c = 0; c < count; c++) sbx_normalize(accs + c * w, f);
    return MPI_SUCCESS;
}

/* Bits [pos, pos+53) of the magnitude held in d (uint32 digits, zero-padded by at
 * least 3 digits above the last nonzero one); pos >= -52. */
static uint64_t bits53_at(const uint32_t *d, int32_t pos)
{
    uint64_t r;
    if (pos < 0) {
        r = ((uint64_t)d[0] | ((uint64_t)d[1] << 32)) << (-pos);
    } else {
        int32_t i = pos >> 5, o = pos & 31;
        uint64_t lo = (uint64_t)d[i] | ((uint64_t)d[i + 1] << 32);
        r = (lo >> o) | (o ? (uint64_t)d[i + 2] << (64 - o) : 0);
    }
    return r & ((UINT64_C(1) << 53) - 1);
}

static int bit_at(const uint32_t *d, int32_t pos)
{
    return pos >= 0 && ((d[pos >> 5] >> (pos & 31)) & 1);
}

/* Any bit set in [0, pos)? */
static int sticky_below(const uint32_t *d, int32_t pos)
{
    if (pos <= 0) return 0;
    int32_t i = pos >> 5, o = pos & 31;
    for (int32_t j = 0; j < i; j++)
        if (d[j]) return 1;
    return o && (d[i] & ((UINT32_C(1) << o) - 1)) != 0;
}

static double dbl_of(uint64_t bits)
{
    double r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

/* The general rounding of a magnitude given as uint32 digits d[lo..top] (weights
 * 2^(lsb + 32 i); d is zeroed here outside that range, up to index nd + 2), with
 * the given sign bit: any exponent, subnormal and overflowing results included. */
__attribute__((noinline, cold)) static double round_general(uint32_t *d, int32_t lo, int32_t top, sbx_format f,
                                                            uint64_t sign)
{
    for (int32_t i = 0; i < lo; i++) d[i] = 0;
    for (int32_t i = top + 1; i <= f.ndigits + 2; i++) d[i] = 0;
    uint64_t out;
    int32_t h = top;
    while (h >= 0 && d[h] == 0) h--;
    if (h < 0)
        return dbl_of(sign); /* exact zero: +0 (a negated zero never occurs, see sbx_round) */
    int32_t p = 32 * h + 31 - __builtin_clz(d[h]); /* msb position */
    if ((int64_t)p + f.lsb_exp > 1023) {
        out = sign | UINT64_C(0x7FF0000000000000);
    } else {
        /* Lowest kept bit: 53 significant bits, but never below 2^-1074. */
        int32_t pos = p - 52;
        if (pos < -1074 - f.lsb_exp) pos = -1074 - f.lsb_exp;
        /* Sums of deposits are multiples of 2^-1074, so pos <= p; hand-made words
         * could violate that, and anything below half of 2^-1074 rounds to zero. */
        uint64_t m = 0;
        if (pos - 1 <= p) {
            m = bits53_at(d, pos);
            if (bit_at(d, pos - 1) && ((m & 1) || sticky_below(d, pos - 1))) m += 1;
        }
        /* m * 2^E with E = pos + lsb >= -1074 and m <= 2^53. For m in [2^52, 2^53]
         * adding m to (E + 1074) << 52 yields the biased exponent E + 1075 with the
         * hidden bit folded in (also when rounding carried to 2^53); for m < 2^52,
         * E = -1074 and m is the subnormal encoding itself. Since p + lsb <= 1023,
         * the only overflow is a carry from DBL_MAX's exponent, which lands exactly
         * on the Inf pattern. */
        out = (((uint64_t)(int64_t)(pos + f.lsb_exp + 1074) << 52) + m) | sign;
    }
    return dbl_of(out);
}

/* Rounding reads only the occupied words: an accumulator of float-derived sums has
 * nonzero words on a few digits of its window (data near 1 and 2^-24 resolution
 * fill about 2 of the 12 LINEAR digits), and the words below the lowest nonzero one
 * neither carry nor round. The words lo..hi are normalized once, bottom up, into
 * uint32 magnitude digits, negating on the way when the carry out of hi says the
 * value is negative; rounding then looks at the top three digits and, for the sticky
 * bit, at whether anything below them is nonzero. */
double sbx_round(const int64_t *acc, sbx_format f)
{
    int32_t nd = f.ndigits;
    int64_t nan = acc[nd], pinf = acc[nd + 1], ninf = acc[nd + 2];
    if (nan || (pinf && ninf))
        return dbl_of(UINT64_C(0x7FF8000000000000));
    if (pinf || ninf)
        return dbl_of(UINT64_C(0x7FF0000000000000) | (ninf ? UINT64_C(1) << 63 : 0));

    /* Occupied words, found without a branch per word. */
    uint64_t occ = 0;
#ifdef __AVX512F__
    for (int32_t i = 0; i < nd; i += 8) {
        const __mmask8 in = (__mmask8)(nd - i >= 8 ? 0xFF : (1u << (nd - i)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi64(in, acc + i);
        occ |= (uint64_t)_mm512_test_epi64_mask(v, v) << i;
    }
#else
    for (int32_t i = 0; i < nd; i++) occ |= (uint64_t)(acc[i] != 0) << i;
#endif
    if (!occ)
        return 0.0; /* exact zero is +0 */
    const int32_t lo = __builtin_ctzll(occ), hi = 63 - __builtin_clzll(occ);

    /* value = c 2^(32(hi+1)) + sum_{lo <= i <= hi} d_i 2^(32 i), d_i in [0, 2^32). The
     * words are below 2^62 + 2^32 in magnitude and carries below 2^31, so x cannot
     * overflow and |c| < 2^31. nz marks the nonzero digits of the magnitude. */
    uint32_t d[64 + 3 + 1];
    uint64_t nz = 0;
    int64_t c = 0;
    for (int32_t i = lo; i <= hi; i++) {
        int64_t x = acc[i] + c;
        d[i] = (uint32_t)((uint64_t)x & SBX_MASK32);
        nz |= (uint64_t)(d[i] != 0) << i;
        c = carry_of(x);
    }
    uint64_t sign = 0;
    if (c < 0) {
        /* |value| = -c 2^(32(hi+1)) - L: negate L digit-wise with borrows (b is 0 or -1),
         * and the top digit -c + b >= 0 takes the final borrow. */
        sign = UINT64_C(1) << 63;
        int64_t b = 0;
        nz = 0;
        for (int32_t i = lo; i <= hi; i++) {
            int64_t x = b - (int64_t)d[i];
            d[i] = (uint32_t)((uint64_t)x & SBX_MASK32);
            nz |= (uint64_t)(d[i] != 0) << i;
            b = carry_of(x);
        }
        c = -c + b;
    }
    int32_t top = hi;
    if (c > 0) {
        d[++top] = (uint32_t)c; /* c < 2^31; top <= nd */
        if (top == 64)
            return round_general(d, lo, top, f, sign);
        nz |= UINT64_C(1) << top;
    }
    if (!nz)
        return 0.0; /* the words cancelled: exact zero */

    /* The common case, a normal result: the top nonzero digit h and the two below it
     * hold the leading 65 to 96 bits as an integer u (bit 0 weighs 2^(lsb + 32(h-2)));
     * the digits further down only decide the sticky bit. */
    const int32_t h = 63 - __builtin_clzll(nz);
    const uint64_t d1 = h - 1 >= lo ? d[h - 1] : 0, d2 = h - 2 >= lo ? d[h - 2] : 0;
    const unsigned __int128 u = (unsigned __int128)d[h] << 64 | (unsigned __int128)(d1 << 32 | d2);
    const int32_t p = 64 + 31 - __builtin_clz(d[h]);         /* msb of u, >= 64 */
    const int64_t E = (int64_t)p + 32 * (h - 2) + f.lsb_exp; /* 2^E <= |value| < 2^(E+1) */
    if (E < -1022 || E > 1023)
        return round_general(d, lo, top, f, sign);
    const int sticky = h > 2 && (nz & ((UINT64_C(1) << (h - 2)) - 1)) != 0;
    const int32_t sh = p - 52; /* in [12, 43] */
    uint64_t m = (uint64_t)(u >> sh);
    const uint64_t rem = (uint64_t)u & ((UINT64_C(1) << sh) - 1), half = UINT64_C(1) << (sh - 1);
    if (rem > half || (rem == half && (sticky || (m & 1)))) m += 1;
    /* m in [2^52, 2^53]: its hidden bit adds one to the biased exponent E + 1022, and a
     * carry to 2^53 moves to the next binade (from E = 1023: the Inf pattern). */
    return dbl_of((((uint64_t)(E + 1022) << 52) + m) | sign);
}

/* ---- the wire format (exactsum.h) ---- */

#define WK (SBX_WIRE_WORDS - 1) /* digit words of an element, the signed top one included */
#define WMASK ((UINT64_C(1) << SBX_WIRE_DIGIT) - 1)
_Static_assert(SBX_WIRE_DIGIT == 62 && WK >= 2, "two 62-bit digits add without overflow");

/* Bits [pos, pos + 62) of the two's complement integer in limbs u[0 .. nl-1],
 * sign-extended by `fill` above; the 62 bits start at most 31 bits into a limb, so
 * three limbs hold them. */
static uint64_t bits62_at(const uint32_t *u, int32_t nl, uint32_t fill, int32_t pos)
{
    int32_t i = pos >> 5, o = pos & 31;
    uint64_t a = i < nl ? u[i] : fill, b = i + 1 < nl ? u[i + 1] : fill, c = i + 2 < nl ? u[i + 2] : fill;
    uint64_t r = ((a | b << 32) >> o) | (o ? c << (64 - o) : 0);
    return r & WMASK;
}

int sbx_wire_pack(int64_t *w, const int64_t *acc, sbx_format f)
{
    const int32_t nd = f.ndigits, nl = nd + 1;
    uint32_t u[64 + 1];
    for (int32_t i = 0; i < nd - 1; i++) u[i] = (uint32_t)acc[i];
    const int64_t t = acc[nd - 1];
    u[nd - 1] = (uint32_t)(uint64_t)t, u[nd] = (uint32_t)((uint64_t)t >> 32);
    const int neg = t < 0;
    const uint32_t fill = neg ? UINT32_C(0xFFFFFFFF) : 0;
    memset(w, 0, SBX_WIRE_WORDS * sizeof *w);
    int32_t i = 0;
    while (i < nl && !u[i]) i++;
    if (i == nl) { /* exact zero (a negative value has a nonzero top limb) */
        w[0] = SBX_WIRE_EMPTY;
        return 0;
    }
    const int32_t lowbit = 32 * i + __builtin_ctz(u[i]);
    /* |value| <= 2^p: p is the top bit of a positive value, and one above the highest
     * bit differing from the sign for a negative one. */
    int32_t j = nl - 1, p = 0;
    while (j >= 0 && u[j] == fill) j--;
    if (j >= 0) p = 32 * j + 31 - __builtin_clz(u[j] ^ fill) + neg;
    const int32_t lo = lowbit / SBX_WIRE_DIGIT, hi = p / SBX_WIRE_DIGIT;
    if (hi - lo > WK - 2) {
        w[0] = SBX_WIRE_OVER;
        return -1;
    }
    /* Every bit from 62 (hi + 1) up equals the sign: the top word is 0 or -1. */
    w[0] = (int64_t)lo | (int64_t)hi << 32;
    for (int32_t g = 0; g < WK - 1; g++) w[1 + g] = (int64_t)bits62_at(u, nl, fill, SBX_WIRE_DIGIT * (lo + g));
    w[WK] = neg ? -1 : 0;
    return 0;
}

int sbx_wire_unpack(int64_t *acc, const int64_t *w, sbx_format f)
{
    const int32_t nd = f.ndigits;
    sbx_zero(acc, f);
    if (w[0] == SBX_WIRE_OVER)
        return -1;
    if (w[0] == SBX_WIRE_EMPTY)
        return 0;
    const int32_t lo = (int32_t)(w[0] & 0xFFFF), s = (int32_t)(w[0] >> 32) + 1 - lo;
    /* Digits from s = hi + 1 - lo up hold only carries and the sign (every rank's value
     * is below 2^(62 (hi + 1)) in magnitude): folded into one signed word, computed
     * modulo 2^64, which is exact since the sum of P such values gives |word| <= P.
     * The digits below and that word then go to the 32-bit digits they overlap, as
     * chunks below 2^32 (the last one signed); what lies at or above the top digit goes
     * into it whole, in 128 bits, and a top digit that would leave the range sbx_round
     * takes (never reached by sums of deposits, which stay far below) makes the value
     * an infinity. */
    int64_t d[WK] = {0};
    for (int32_t g = 0; g < s; g++) d[g] = w[1 + g];
    uint64_t fold = (uint64_t)w[WK];
    for (int32_t g = WK - 2; g >= s; g--) fold = (fold << SBX_WIRE_DIGIT) + (uint64_t)w[1 + g];
    d[s] = (int64_t)fold;
    __int128 top = acc[nd - 1];
    for (int32_t g = 0; g <= s; g++) {
        const int64_t v = d[g];
        if (!v) continue;
        const int32_t b = SBX_WIRE_DIGIT * (lo + g), k = b >> 5;
        __int128 x = (__int128)v * ((__int128)1 << (b & 31)); /* |x| < 2^94 */
        for (int32_t idx = k; idx <= k + 2; idx++) {
            if (idx >= nd - 1) { /* all that is left, signed, into the top digit */
                const int32_t sh = 32 * (idx - (nd - 1));
                if (x && (sh >= 64 || x >= ((__int128)1 << (62 - (sh < 62 ? sh : 62))) ||
                          x <= -((__int128)1 << (62 - (sh < 62 ? sh : 62)))))
                    goto huge;
                top += x * ((__int128)1 << sh);
                if (top >= ((__int128)1 << 62) || top <= -((__int128)1 << 62)) goto huge;
                break;
            }
            const int64_t chunk = idx == k + 2 ? (int64_t)x : (int64_t)((uint64_t)x & SBX_MASK32);
            acc[idx] += chunk;
            x = (x - chunk) / ((__int128)1 << 32); /* exact: no shift of a negative */
        }
    }
    acc[nd - 1] = (int64_t)top;
    return 0;
huge:
    sbx_zero(acc, f);
    acc[nd + ((int64_t)fold < 0 ? 2 : 1)] = 1;
    return 0;
}

/* d[0 .. WK-1] = the digit words of w on a grid starting s digits lower (the same
 * value, every digit moved up by s words). The new top word
 * is the sum of the words that no longer fit, weighted; computed modulo 2^64, which is
 * exact because the fit condition keeps the true top word small. */
static void wire_align(uint64_t *d, const int64_t *w, int32_t s)
{
    for (int32_t g = 0; g < WK - 1; g++) d[g] = g >= s ? (uint64_t)w[1 + g - s] : 0;
    int32_t from = WK - 1 - s;
    if (from < 0) from = 0;
    uint64_t top = (uint64_t)w[WK];
    for (int32_t g = WK - 2; g >= from; g--) top = (top << SBX_WIRE_DIGIT) + (uint64_t)w[1 + g];
    d[WK - 1] = top;
}

void sbx_wire_op(void *in_, void *inout_, int *len, MPI_Datatype *type)
{
    (void)type;
    const int64_t *in = in_;
    int64_t *io = inout_;
    for (int e = 0; e < *len; e++, in += SBX_WIRE_WORDS, io += SBX_WIRE_WORDS) {
        const int64_t a = in[0], b = io[0];
        if (a == SBX_WIRE_PLAIN || b == SBX_WIRE_PLAIN) {
            for (int g = 1; g < SBX_WIRE_WORDS; g++) io[g] = (int64_t)((uint64_t)io[g] + (uint64_t)in[g]);
            io[0] = SBX_WIRE_PLAIN;
            continue;
        }
        if (b == SBX_WIRE_OVER || a == SBX_WIRE_EMPTY)
            continue;
        if (a == SBX_WIRE_OVER || b == SBX_WIRE_EMPTY) {
            memcpy(io, in, SBX_WIRE_WORDS * sizeof *io);
            continue;
        }
        const int32_t loa = (int32_t)(a & 0xFFFF), hia = (int32_t)(a >> 32);
        const int32_t lob = (int32_t)(b & 0xFFFF), hib = (int32_t)(b >> 32);
        const int32_t lo = loa < lob ? loa : lob, hi = hia > hib ? hia : hib;
        if (hi - lo > WK - 2) {
            memset(io, 0, SBX_WIRE_WORDS * sizeof *io);
            io[0] = SBX_WIRE_OVER;
            continue;
        }
        uint64_t da[WK], db[WK];
        wire_align(da, in, loa - lo);
        wire_align(db, io, lob - lo);
        uint64_t c = 0;
        for (int g = 0; g < WK - 1; g++) {
            uint64_t x = da[g] + db[g] + c; /* < 2^63 + 2 */
            io[1 + g] = (int64_t)(x & WMASK);
            c = x >> SBX_WIRE_DIGIT;
        }
        io[WK] = (int64_t)(da[WK - 1] + db[WK - 1] + c);
        io[0] = (int64_t)lo | (int64_t)hi << 32;
    }
}
