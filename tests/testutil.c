/* testutil.c - see testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tu_rank = 0, tu_nranks = 1;
static int fails = 0;
static char first_failure[512];

uint64_t tu_hash(uint64_t z)
{
    /* splitmix64 finalizer */
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double tu_uniform(uint64_t key) { return (double)(tu_hash(key) >> 11) * 0x1.0p-53; }

double tu_normal(uint64_t key)
{
    double u1 = tu_uniform(2 * key) + 0x1.0p-54, u2 = tu_uniform(2 * key + 1);
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

void tu_fail(const char *file, int line, const char *fmt, ...)
{
    if (fails++ == 0) {
        int k = snprintf(first_failure, sizeof first_failure, "rank %d %s:%d: ", tu_rank, file, line);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_failure + k, sizeof first_failure - (size_t)k, fmt, ap);
        va_end(ap);
        fprintf(stderr, "%s\n", first_failure);
    }
}

int tu_close(double got, double ref, double rtol, double floor)
{
    double scale = fabs(ref) > floor ? fabs(ref) : floor;
    return fabs(got - ref) <= rtol * scale; /* false for NaN */
}

tu_image tu_take_image(syncbn_layer *l)
{
    syncbn_config c;
    syncbn_get_config(l, &c);
    const size_t arr = (size_t)c.channels * sizeof(float);
    tu_image im = {malloc(4 * arr + 8), 0};
    float *a[4] = {syncbn_weight(l), syncbn_bias(l), syncbn_running_mean(l), syncbn_running_var(l)};
    for (int k = 0; k < 4; k++)
        if (a[k])
            memcpy(im.bytes + im.len, a[k], arr), im.len += arr;
    int64_t nbt = syncbn_num_batches_tracked(l);
    memcpy(im.bytes + im.len, &nbt, 8), im.len += 8;
    return im;
}

int tu_same_image(tu_image a, tu_image b) { return a.len == b.len && memcmp(a.bytes, b.bytes, a.len) == 0; }

void tu_verdict(void)
{
    int mine = fails, total = 0;
    MPI_Allreduce(&mine, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    fails = 0;
    ck_assert_msg(total == 0, "%d failed expectation(s) across ranks; first on this rank: %s", total,
                  mine ? first_failure : "(none here)");
}

int tu_main(int argc, char **argv, Suite *(*make_suite)(void))
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &tu_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &tu_nranks);
    SRunner *sr = srunner_create(make_suite());
    srunner_set_fork_status(sr, CK_NOFORK); /* Open MPI processes must not fork */
    srunner_run_all(sr, tu_rank == 0 ? CK_NORMAL : CK_SILENT);
    int mine = srunner_ntests_failed(sr), worst = 0;
    srunner_free(sr);
    MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (tu_rank == 0)
        printf("%d ranks: %s\n", tu_nranks, worst ? "FAILED" : "all ranks passed");
    MPI_Finalize();
    return worst ? 1 : 0;
}

/* This rank's slice under split k: 0 even, 1 all on rank 0, 2 all on the last rank,
 * 3 [0, everything, 0, ...] style holes, 4.. pseudo-random uneven. */
void tu_split(int k, int64_t B, int64_t *lo, int64_t *n)
{
    const int P = tu_nranks;
    int64_t cnt[64] = {0}, left = B;
    for (int q = 0; q < P; q++) {
        switch (k) {
        case 0: cnt[q] = (q + 1) * B / P - q * B / P; break;
        case 1: cnt[q] = q == 0 ? B : 0; break;
        case 2: cnt[q] = q == P - 1 ? B : 0; break;
        case 3: cnt[q] = q == 1 % P ? B : 0; break;
        default: cnt[q] = q == P - 1 ? left : (int64_t)(tu_uniform(31u * (uint64_t)k + (uint64_t)q) * (double)(left + 1));
        }
        left -= cnt[q];
    }
    *lo = 0;
    for (int q = 0; q < tu_rank; q++)
        *lo += cnt[q];
    *n = cnt[tu_rank];
}

double tu_bf16_value(uint16_t h)
{
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

uint16_t tu_bf16_round(double d)
{
    if (d != d)
        return 0x7FC0;
    const uint16_t sign = signbit(d) ? 0x8000 : 0;
    const double a = fabs(d);
    if (a >= ldexp(2 - ldexp(1, -8), 127))
        return sign | 0x7F80;
    const float f = (float)a;
    uint32_t fb;
    memcpy(&fb, &f, sizeof fb);
    const int h0 = (int)(fb >> 16);
    int best = -1;
    double bestd = INFINITY;
    for (int h = h0 - 1; h <= h0 + 1; h++) {
        if (h < 0 || h > 0x7F7F)
            continue;
        const double dist = fabs(tu_bf16_value((uint16_t)h) - a);
        if (dist < bestd || (dist == bestd && !(h & 1)))
            best = h, bestd = dist;
    }
    return sign | (uint16_t)best;
}
