# Exact accumulator (src/exactsum.c): Check suite at 1..4 ranks.
# The 1-rank run includes a 2^31-deposit test of the normalization contract (seconds in
# Release; set SYNCBN_TEST_QUICK=1 to shrink it under valgrind and the like).
# `test_exactsum --bench` prints ns/deposit instead of testing (not registered).
syncbn_add_check_exe(test_exactsum SOURCES test_exactsum.c LIBS syncbn_exactsum)
syncbn_add_mpi_test(exactsum test_exactsum RANKS 1 2 3 4 TIMEOUT 300)
