/*
 * test_wire.c - the reproducible wire format as the layer uses it, seen from outside:
 * the size and number of the allreduce messages, counted by intercepting
 * MPI_Allreduce / MPI_Iallreduce (the MPI profiling interface, PMPI_*), and the
 * bitwise equality of the results whether the compact elements or the full-accumulator
 * fallback carried them. Run at several rank counts under real mpirun.
 *
 * What the documentation (docs/reproducible.md) says, and this checks: a call without
 * a timeout is ONE allreduce of (WIRE_HDR_ELEMS + 2C) elements of 6 int64 (48 bytes),
 * WIRE_HDR_ELEMS = 6; data whose occupied bits span more than one element's window
 * add one allreduce of the full accumulators (40 int64 per channel).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static int64_t n_calls, n_bytes;

int MPI_Allreduce(const void *sbuf, void *rbuf, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm)
{
    int size = 0;
    PMPI_Type_size(type, &size);
    n_calls++, n_bytes += (int64_t)count * size;
    return PMPI_Allreduce(sbuf, rbuf, count, type, op, comm);
}

int MPI_Iallreduce(const void *sbuf, void *rbuf, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm,
                   MPI_Request *req)
{
    int size = 0;
    PMPI_Type_size(type, &size);
    n_calls++, n_bytes += (int64_t)count * size;
    return PMPI_Iallreduce(sbuf, rbuf, count, type, op, comm, req);
}

#define WIRE_ELEM_BYTES 48 /* 6 int64: the documented element */
#define WIRE_HDR_ELEMS 6
#define FULL_ACC_BYTES 320 /* 40 int64 per channel: the fallback message */

/* Global element (i, c, s) of the batch; `wide` channels span 2^-60 .. 2^60. */
static float value(int64_t i, int64_t c, int64_t s, int64_t C, int64_t S, int wide)
{
    const uint64_t key = ((uint64_t)i * (uint64_t)C + (uint64_t)c) * (uint64_t)S + (uint64_t)s;
    double v = tu_normal(key);
    if (wide && c == 1)
        v *= ldexp(1.0, (int)(tu_hash(key) % 121) - 60);
    return (float)v;
}

/* One forward and one backward of a REPRODUCIBLE layer on samples [lo, lo+n) of a
 * batch of B; returns y and dx in out (2 n C S floats) and counts the messages. */
static void run(MPI_Comm comm, int64_t C, int64_t S, int64_t lo, int64_t n, int wide, double timeout, float *out,
                int64_t *calls, int64_t *bytes)
{
    syncbn_config cfg = syncbn_config_default(C);
    cfg.reduction = SYNCBN_REPRODUCIBLE, cfg.timeout = timeout;
    syncbn_layer *l = NULL;
    int rc = syncbn_create(&cfg, comm, &l);
    TU_EXPECT(rc == SYNCBN_OK, "create: %s", syncbn_strerror(rc));
    if (rc != SYNCBN_OK)
        return;
    const int64_t len = n * C * S;
    float *x = malloc(sizeof(float) * (size_t)(len + 1)), *dy = malloc(sizeof(float) * (size_t)(len + 1));
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                x[(i * C + c) * S + s] = value(lo + i, c, s, C, S, wide);
                dy[(i * C + c) * S + s] = value(lo + i + 1000, c, s, C, S, wide);
            }
    n_calls = n_bytes = 0;
    rc = syncbn_forward(l, x, n, S, 1, out);
    TU_EXPECT(rc == SYNCBN_OK, "forward: %s", syncbn_strerror(rc));
    rc = syncbn_backward(l, x, dy, n, S, out + len, NULL, NULL);
    TU_EXPECT(rc == SYNCBN_OK, "backward: %s", syncbn_strerror(rc));
    *calls = n_calls, *bytes = n_bytes;
    syncbn_destroy(l);
    free(x), free(dy);
}

static void check_shape(int64_t C, int64_t S, int64_t B, int wide, double timeout)
{
    int64_t lo, n;
    tu_split(2, B, &lo, &n);
    const int64_t len = n * C * S, all = B * C * S;
    float *part = calloc((size_t)(2 * len + 1), sizeof(float)), *whole = calloc((size_t)(2 * all + 1), sizeof(float));
    int64_t calls = 0, bytes = 0, calls1 = 0, bytes1 = 0;
    run(MPI_COMM_WORLD, C, S, lo, n, wide, timeout, part, &calls, &bytes);
    run(MPI_COMM_SELF, C, S, 0, B, wide, timeout, whole, &calls1, &bytes1);
    /* The bits: the same as one rank holding the whole batch. */
    TU_EXPECT(memcmp(part, whole + lo * C * S, sizeof(float) * (size_t)len) == 0 &&
                  memcmp(part + len, whole + all + lo * C * S, sizeof(float) * (size_t)len) == 0,
              "C=%lld wide=%d timeout=%g: results differ from the 1-rank run", (long long)C, wide, timeout);
    /* The messages of one forward + one backward. */
    const int64_t msg = (WIRE_HDR_ELEMS + 2 * C) * WIRE_ELEM_BYTES;
    int64_t want_calls = 2, want_bytes = 2 * msg;
    if (timeout > 0) /* plus the fixed call message of each call, 155 doubles */
        want_calls += 2, want_bytes += 2 * 155 * 8;
    /* Wide data: the forward's x^2 sums (at least) need the fallback, one more
     * allreduce of the full accumulators per call that needs it. */
    const int64_t extra = calls - want_calls;
    TU_EXPECT(wide ? extra >= 1 && extra <= 2 : extra == 0, "C=%lld wide=%d timeout=%g: %lld allreduces, want %s%lld",
              (long long)C, wide, timeout, (long long)calls, wide ? "one or two more than " : "", (long long)want_calls);
    want_bytes += (extra > 0 ? extra : 0) * C * FULL_ACC_BYTES;
    TU_EXPECT(bytes == want_bytes, "C=%lld wide=%d timeout=%g: %lld bytes in all, want %lld", (long long)C, wide,
              timeout, (long long)bytes, (long long)want_bytes);
    free(part), free(whole);
}

START_TEST(test_message_size)
{
    const int64_t Cs[] = {1, 3, 64, 2048};
    for (int k = 0; k < 4; k++)
        check_shape(Cs[k], Cs[k] > 64 ? 1 : 7, 9, 0, 0);
    tu_verdict();
}
END_TEST

START_TEST(test_message_size_timed)
{
    check_shape(64, 7, 9, 0, 30);
    tu_verdict();
}
END_TEST

/* Channel 1 spans about 2^-84 .. 2^62 (floats of N(0,1) scaled by 2^-60 .. 2^60): its
 * x^2 sum needs more bits than one element's window (248), so the forward sends the
 * full accumulators too, and the results are still the 1-rank bits. */
START_TEST(test_fallback_same_bits)
{
    check_shape(3, 5, 11, 1, 0);
    check_shape(3, 5, 11, 1, 30);
    tu_verdict();
}
END_TEST

static Suite *wire_suite(void)
{
    Suite *s = suite_create("wire");
    TCase *t = tcase_create("layer");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, test_message_size);
    tcase_add_test(t, test_message_size_timed);
    tcase_add_test(t, test_fallback_same_bits);
    suite_add_tcase(s, t);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, wire_suite); }
