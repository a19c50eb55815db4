/*
 * iallreduce_mismatch.c - what Open MPI does when two ranks post MPI_Iallreduce with
 * different counts (erroneous in MPI: "undefined"). The reason why syncbn, with a
 * timeout, first exchanges a header of the same size for every call (docs/api.md,
 * "Timeouts"). Not part of the build; run it by hand under AddressSanitizer:
 *   mpicc -O1 -g -fsanitize=address,undefined -o /tmp/mm scripts/check/iallreduce_mismatch.c
 *   ASAN_OPTIONS=detect_leaks=0 mpirun -np 2 /tmp/mm 27 33      # counts of rank 0, rank 1
 * Open MPI 4.1 (vader, shared memory): small counts give MPI_ERR_TRUNCATE on one
 * rank (fatal, despite MPI_ERRORS_RETURN on the communicator) and a wrong "success"
 * on the other; from a few thousand doubles (single-copy CMA) a heap-buffer-overflow.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int r, p;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    MPI_Comm_size(MPI_COMM_WORLD, &p);
    long a = atol(argv[1]), b = atol(argv[2]);
    long n = r == 0 ? a : b;
    MPI_Comm c;
    MPI_Comm_dup(MPI_COMM_WORLD, &c);
    MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN);
    double *buf = malloc(sizeof(double) * n);
    for (long i = 0; i < n; i++) buf[i] = 1;
    MPI_Request q;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_DOUBLE, MPI_SUM, c, &q);
    double t0 = MPI_Wtime();
    int done = 0;
    while (rc == MPI_SUCCESS && !done && MPI_Wtime() - t0 < 3) { rc = MPI_Test(&q, &done, MPI_STATUS_IGNORE); usleep(100); }
    char es[256] = ""; int len;
    if (rc != MPI_SUCCESS) MPI_Error_string(rc, es, &len);
    printf("rank %d count %ld: %s %s buf[0]=%g buf[n-1]=%g\n", r, n, rc != MPI_SUCCESS ? "ERROR" : done ? "completed" : "still pending after 3 s", es, buf[0], buf[n-1]);
    fflush(stdout);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Abort(MPI_COMM_WORLD, 0);
}
