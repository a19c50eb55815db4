# Deadlines (cfg.timeout): ranks that skip a call, a NULL layer, out-of-step calls of
# different message sizes, a slow rank within the deadline, syncbn_last_error texts.
# The library's timeout is 1 s; the whole program takes about 15 s per rank count.
syncbn_add_check_exe(test_timeout SOURCES test_timeout.c testutil.c LIBS syncbn)
syncbn_add_mpi_test(timeout test_timeout RANKS 2 3 4 TIMEOUT 180)
