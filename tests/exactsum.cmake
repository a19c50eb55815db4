# Exact accumulator (src/exactsum.c): unit tests at 1..4 ranks.
# `test_exactsum --bench` prints ns/deposit (not registered as a test).
syncbn_add_check_exe(test_exactsum SOURCES test_exactsum.c LIBS syncbn_exactsum)
syncbn_add_mpi_test(exactsum test_exactsum RANKS 1 2 3 4 TIMEOUT 300)
