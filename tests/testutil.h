/*
 * testutil.h - shared helpers of the MPI test programs.
 *
 * Collective-safe assertions: a Check assertion that fails longjmps out of the test,
 * and a rank that leaves a test early would leave the others blocked in the next
 * collective call. So MPI tests record failures with TU_EXPECT (which never jumps),
 * keep calling every collective, and end each test with tu_verdict(), which combines
 * the failure counts of all ranks and asserts once - the same verdict on every rank.
 */
#ifndef SYNCBN_TESTUTIL_H
#define SYNCBN_TESTUTIL_H

#include <check.h>
#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

extern int tu_rank, tu_nranks;

/* Deterministic data that depends only on a key (e.g. the GLOBAL element index),
 * so every split of a batch sees the same values. */
uint64_t tu_hash(uint64_t key);
double tu_uniform(uint64_t key); /* [0, 1) */
double tu_normal(uint64_t key);  /* standard normal */

/* bfloat16 references, independent of src/simd.h. tu_bf16_value: the value of the
 * bit pattern h. tu_bf16_round: d rounded to nearest-even bfloat16, chosen by EXACT
 * distances among the candidates next to d's float conversion (which is off by at most
 * one step; each distance of two nearby doubles is exact by Sterbenz's lemma, or both
 * are multiples of 2^-1074); Inf from (2 - 2^-8) 2^127 up; NaN gives 0x7FC0. */
double tu_bf16_value(uint16_t h);
uint16_t tu_bf16_round(double d);
/* This rank's slice [*lo, *lo + *n) of B samples under split k: 0 even, 1 all on
 * rank 0, 2 all on the last rank, 3 all on rank 1 (holes elsewhere), 4.. pseudo-random
 * uneven (the same on every rank). */
void tu_split(int k, int64_t B, int64_t *lo, int64_t *n);

void tu_fail(const char *file, int line, const char *fmt, ...);
#define TU_EXPECT(cond, ...)                               \
    do {                                                   \
        if (!(cond))                                       \
            tu_fail(__FILE__, __LINE__, __VA_ARGS__);      \
    } while (0)

/* |got - ref| <= rtol * max(|ref|, floor) */
int tu_close(double got, double ref, double rtol, double floor);

/* A byte image of everything a failed call must leave alone: weight, bias,
 * running_mean, running_var (where present) and num_batches_tracked. Compared with
 * memcmp, so even NaN payloads must match. Free .bytes when done. */
typedef struct {
    unsigned char *bytes;
    size_t len;
} tu_image;
tu_image tu_take_image(syncbn_layer *l);
int tu_same_image(tu_image a, tu_image b);

/* Collective: asserts that no rank recorded a failure since the last verdict. */
void tu_verdict(void);

/* Collective: runs the suite in CK_NOFORK mode; returns the exit status, identical
 * on every rank (nonzero if any rank failed). Calls MPI_Init/MPI_Finalize itself. */
int tu_main(int argc, char **argv, Suite *(*make_suite)(void));

#endif /* SYNCBN_TESTUTIL_H */
