# The bfloat16 elementwise passes called directly (src/apply.c compiled in): the float
# path with its exact fallback against an independent reference, on ordinary and
# adversarial data, and the test switch that shows the tests tell the paths apart.
syncbn_add_check_exe(test_apply SOURCES test_apply.c testutil.c ${PROJECT_SOURCE_DIR}/src/apply.c
                     LIBS syncbn OpenMP::OpenMP_C)
syncbn_add_mpi_test(apply test_apply RANKS 1)
