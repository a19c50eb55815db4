/*
 * hello.c - the smallest complete syncbn program: every rank holds an uneven slice of
 * one global batch, and all of them normalize with the global statistics.
 *
 *   mpirun -np 2 ./syncbn-hello
 */
#include <stdio.h>
#include <stdlib.h>

#include <syncbn.h>

#define CHECK(call)                                                                      \
    do {                                                                                 \
        int rc_ = (call);                                                                \
        if (rc_ != SYNCBN_OK) {                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, syncbn_strerror(rc_)); \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                \
        }                                                                                \
    } while (0)

enum { B = 10, C = 3, S = 4 }; /* global batch, channels, spatial (H*W) */

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, P;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &P);

    /* Rank r holds samples [lo, hi) of the global batch: uneven when P does not divide B. */
    int lo = rank * B / P, hi = (rank + 1) * B / P, n = hi - lo;
    float *x = malloc(sizeof(float) * (n ? n : 1) * C * S), *y = malloc(sizeof(float) * (n ? n : 1) * C * S);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < C; c++)
            for (int s = 0; s < S; s++)
                x[(i * C + c) * S + s] = (float)((lo + i) * (c + 1) + s); /* a function of the GLOBAL index */

    syncbn_config cfg = syncbn_config_default(C);
    syncbn_layer *bn;
    CHECK(syncbn_create(&cfg, MPI_COMM_WORLD, &bn));
    CHECK(syncbn_forward(bn, x, n, S, 1, y));

    /* The global mean of channel c is (c+1)*(B-1)/2 + (S-1)/2, whatever P is. */
    const float *rm = syncbn_running_mean(bn);
    if (rank == 0)
        printf("ranks %d: running_mean after one step = [%g %g %g] (momentum 0.1)\n", P, rm[0], rm[1], rm[2]);
    for (int i = 0; i < n; i++)
        printf("rank %d sample %d channel 0: y = [% .4f % .4f % .4f % .4f]\n", rank, lo + i, y[i * C * S],
               y[i * C * S + 1], y[i * C * S + 2], y[i * C * S + 3]);

    syncbn_destroy(bn);
    free(x);
    free(y);
    MPI_Finalize();
    return 0;
}
