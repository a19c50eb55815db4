/* consumer.c - a program outside the syncbn tree, built against an installed syncbn
 * (tests/test_install.sh: once with find_package(syncbn), once with pkg-config).
 * Two ranks hold x = {rank, rank + 2}: the global batch {0, 2, 1, 3} has mean 1.5 and
 * biased variance 1.25, so y on rank 0 is (0 - 1.5)/sqrt(1.25 + eps). Exits 0 when
 * every rank agrees with that; run with 1 rank the batch is {0, 2}. */
#include <math.h>
#include <stdio.h>

#include <syncbn.h>

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    syncbn_config cfg = syncbn_config_default(1);
    syncbn_layer *layer = NULL;
    int rc = syncbn_create(&cfg, MPI_COMM_WORLD, &layer);
    float x[2] = {(float)rank, (float)(rank + 2)}, y[2] = {0};
    if (rc == SYNCBN_OK)
        rc = syncbn_forward(layer, x, 2, 1, 1, y);
    /* Independent reference: mean and variance of {r, r + 2 : r < size} in closed form. */
    double mean = (size - 1) / 2.0 + 1.0, var = 1.0 + (size * (double)size - 1) / 12.0;
    double want = (rank - mean) / sqrt(var + cfg.eps);
    int bad = rc != SYNCBN_OK || fabs(y[0] - want) > 1e-5;
    if (bad)
        fprintf(stderr, "consumer rank %d: %s, y %g, expected %g\n", rank, syncbn_strerror(rc), y[0], want);
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    syncbn_destroy(layer);
    MPI_Finalize();
    return bad;
}
