/*
 * bench_util.h - the helpers of the per-pass benchmarks (bench_passes.c,
 * bench_apply_ab.c): a clock, the median of a few values, float to bfloat16.
 * Included by one program each; everything is static.
 */
#ifndef SYNCBN_BENCH_UTIL_H
#define SYNCBN_BENCH_UTIL_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Seconds: the thread's CPU time at 1 thread (less sensitive to a shared machine),
 * else wall time. */
static double now(void)
{
    struct timespec t;
    clock_gettime(omp_get_max_threads() == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmpd(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double med(const double *v, int n)
{
    double c[64];
    memcpy(c, v, (size_t)n * sizeof *c);
    qsort(c, (size_t)n, sizeof *c, cmpd);
    return n % 2 ? c[n / 2] : (c[n / 2 - 1] + c[n / 2]) / 2;
}

static uint16_t to_bf16(float f) /* to nearest-even (finite f) */
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

#endif /* SYNCBN_BENCH_UTIL_H */
