# Fused BN+ReLU, BN+add(+ReLU) and bfloat16 tensors (syncbn_forward_ex /
# syncbn_backward_ex) against float64 references, error paths (ENOMEM injected with
# sbn_test_fail_alloc, exported from the library for tests) and reproducible mode.
syncbn_add_check_exe(test_fused SOURCES test_fused.c testutil.c LIBS syncbn OpenMP::OpenMP_C)
syncbn_add_mpi_test(fused test_fused RANKS 1 2 3 4)
