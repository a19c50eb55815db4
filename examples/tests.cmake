# Tests of the syncbn-train example. Included from tests/CMakeLists.txt.
if(NOT TARGET syncbn_train_core AND NOT SYNCBN_BUILD_EXAMPLES)
  return()
endif()

# Layer-by-layer and whole-model finite-difference gradient checks, SHA-256
# vectors, data-loader errors, checkpoint corruption (one process).
syncbn_add_check_exe(test_train_layers SOURCES ${PROJECT_SOURCE_DIR}/tests/test_train_layers.c
                     LIBS syncbn_train_core)
syncbn_add_mpi_test(train_layers test_train_layers RANKS 1 TIMEOUT 120)

# Multi-rank runs of the real program on a small subset (exit 77 = data not installed);
# train_blas: the choice and pinning of OpenBLAS kernels (examples/train_blas.h);
# train_fused: the BN layers' fused ReLU and --unfused give the same bits.
foreach(_t invariance resume blas fused elastic)
  add_test(NAME train_${_t}
    COMMAND ${PROJECT_SOURCE_DIR}/tests/test_train_${_t}.sh $<TARGET_FILE:syncbn-train>)
  set_tests_properties(train_${_t} PROPERTIES
    ENVIRONMENT "OMP_NUM_THREADS=1;SYNCBN_MPIEXEC=${MPIEXEC_EXECUTABLE}"
    PROCESSORS 2 TIMEOUT 180 SKIP_RETURN_CODE 77)
endforeach()

# --timeout: a rank leaves early on purpose; the others end the job with the message.
foreach(_np 2 3)
  add_test(NAME train_timeout_np${_np}
    COMMAND ${PROJECT_SOURCE_DIR}/tests/test_train_timeout.sh $<TARGET_FILE:syncbn-train> ${_np})
  set_tests_properties(train_timeout_np${_np} PROPERTIES
    ENVIRONMENT "OMP_NUM_THREADS=1;SYNCBN_MPIEXEC=${MPIEXEC_EXECUTABLE}"
    PROCESSORS ${_np} TIMEOUT 180 SKIP_RETURN_CODE 77)
endforeach()
