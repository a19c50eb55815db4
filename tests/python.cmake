# Tests of the Python package and of the installed packages. Included from
# tests/CMakeLists.txt.
#   python_np<P>: pytest under the real mpirun at 1-4 ranks, against this build's
#                 libsyncbn (SYNCBN_LIBRARY), package from src/python;
#   install:      cmake --install into a temporary prefix, then a consumer built with
#                 find_package(syncbn) and with pkg-config, and the installed package.
# Not in the sanitizer build: an ASan libsyncbn loaded into python needs libasan
# preloaded, and the C paths it calls are covered by the Check suites there.
if(SYNCBN_SANITIZE)
  return()
endif()

add_test(NAME install COMMAND ${PROJECT_SOURCE_DIR}/tests/test_install.sh ${PROJECT_BINARY_DIR} ${SYNCBN_PYTHON})
set_tests_properties(install PROPERTIES
  ENVIRONMENT "OMP_NUM_THREADS=1;SYNCBN_MPIEXEC=${MPIEXEC_EXECUTABLE}"
  PROCESSORS 2 TIMEOUT 180 SKIP_RETURN_CODE 77)

execute_process(COMMAND ${SYNCBN_PYTHON} -c "import torch, numpy, mpi4py, pytest"
  RESULT_VARIABLE _py_rc OUTPUT_QUIET ERROR_QUIET)
if(NOT _py_rc EQUAL 0)
  message(STATUS "syncbn: ${SYNCBN_PYTHON} lacks torch/numpy/mpi4py/pytest: Python tests not registered "
                 "(scripts/install_deps.sh python)")
  return()
endif()
foreach(np 1 2 3 4)
  add_test(NAME python_np${np}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${SYNCBN_MPIEXEC_FLAGS}
            ${SYNCBN_PYTHON} -m pytest -q -p no:cacheprovider -p no:hypothesispytest
            ${PROJECT_SOURCE_DIR}/tests/python)
  set_tests_properties(python_np${np} PROPERTIES
    PROCESSORS ${np} TIMEOUT 600
    ENVIRONMENT "OMP_NUM_THREADS=1;PYTHONDONTWRITEBYTECODE=1;PYTHONPATH=${PROJECT_SOURCE_DIR}/src/python;SYNCBN_LIBRARY=$<TARGET_FILE:syncbn>")
endforeach()

# The PyTorch DDP example on Fashion-MNIST, 20 steps at P = 1 and 2: SyncBatchNorm's
# loss curves agree to rounding, plain BN's do not (scripts/check/torch_ddp_curves.sh).
add_test(NAME torch_ddp_curves COMMAND ${PROJECT_SOURCE_DIR}/scripts/check/torch_ddp_curves.sh 20)
set_tests_properties(torch_ddp_curves PROPERTIES
  ENVIRONMENT "SYNCBN_LIBRARY=$<TARGET_FILE:syncbn>;RANKS=1 2;OUT=${CMAKE_CURRENT_BINARY_DIR}/torch_ddp;SYNCBN_MPIEXEC=${MPIEXEC_EXECUTABLE}"
  PROCESSORS 2 TIMEOUT 300 SKIP_RETURN_CODE 77)

# The same example with its residual net, --fused against unfused, 20 steps in float32
# at P = 1 and 2 and under bf16 autocast at P = 2: the loss curves agree to rounding.
add_test(NAME torch_ddp_fused COMMAND ${PROJECT_SOURCE_DIR}/tests/test_torch_ddp_fused.sh 20)
set_tests_properties(torch_ddp_fused PROPERTIES
  ENVIRONMENT "SYNCBN_LIBRARY=$<TARGET_FILE:syncbn>;RANKS=1 2;OUT=${CMAKE_CURRENT_BINARY_DIR}/torch_ddp_fused;SYNCBN_MPIEXEC=${MPIEXEC_EXECUTABLE}"
  PROCESSORS 2 TIMEOUT 600 SKIP_RETURN_CODE 77)
