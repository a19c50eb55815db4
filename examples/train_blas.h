/*
 * train_blas.h - which OpenBLAS kernels syncbn-train runs, chosen before OpenBLAS
 * can matter, and the same on every rank.
 *
 * OpenBLAS (DYNAMIC_ARCH builds such as Debian's) picks its kernels ("core") once,
 * when the library loads, from CPUID or from the environment variable
 * OPENBLAS_CORETYPE. A CPU newer than the OpenBLAS release is not recognised and
 * gets the oldest kernels ("Prescott"), several times slower. Different cores also
 * round sgemm differently, so the core is part of what makes a run's hash.
 *
 * train_blas_select() runs first in main(), BEFORE MPI_Init. If the core must
 * change, it sets OPENBLAS_CORETYPE and re-executes the program (execv of
 * /proc/self/exe with the same arguments: same process, so mpirun does not notice).
 * Precedence, highest first:
 *   1. --blas-core NAME on the command line, or SYNCBN_BLAS_CORE=NAME: a pin; the
 *      program stops with an error if OpenBLAS does not then run exactly NAME;
 *   2. OPENBLAS_CORETYPE set by the user: respected as it is;
 *   3. automatic: OpenBLAS's own choice, unless the CPU supports a wider instruction
 *      set than that core uses (AVX-512 F/BW/VL/DQ: SkylakeX; AVX2 + FMA: Haswell;
 *      AVX: Sandybridge), in which case that core replaces it.
 * train_blas_check() runs after MPI_Init: every rank must run the same core, or the
 * job stops with a message naming the cores and the way to pin one.
 *
 * What it does not do: choose OpenBLAS's threading (the example pins one thread), or
 * detect CPUs that are not x86-64 (elsewhere only precedence 1 and 2 apply).
 */
#ifndef TRAIN_BLAS_H
#define TRAIN_BLAS_H

/* Before MPI_Init. May not return (re-executes the program). */
void train_blas_select(int argc, char **argv);
/* Collective over MPI_COMM_WORLD, after MPI_Init: dies unless all ranks agree and a
 * pin, if any, took effect. */
void train_blas_check(void);
/* "OpenBLAS 0.3.21, core SkylakeX": what a hash depends on; static storage. */
const char *train_blas_core(void);
/* The same followed by why this core runs, e.g. "(pinned by --blas-core)". */
const char *train_blas_describe(void);

#endif /* TRAIN_BLAS_H */
