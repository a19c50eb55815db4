# SYNCBN_REPRODUCIBLE: bitwise equality across rank counts, splits and thread counts.
syncbn_add_check_exe(test_reproducible SOURCES test_reproducible.c testutil.c LIBS syncbn OpenMP::OpenMP_C)
syncbn_add_mpi_test(reproducible test_reproducible RANKS 1 2 3 4)
