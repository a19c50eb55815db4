# The documentation's complete programs (README quick starts, marked blocks in docs/):
# extracted, built against this build's libsyncbn, run under the real mpirun at 2
# ranks; each checks its own result (tests/test_snippets.sh). Included from
# tests/CMakeLists.txt. Release build only, as the programs are built the way a
# reader builds them (no sanitizer flags).
if(SYNCBN_SANITIZE)
  return()
endif()
add_test(NAME snippets COMMAND ${PROJECT_SOURCE_DIR}/tests/test_snippets.sh $<TARGET_FILE:syncbn> ${SYNCBN_PYTHON})
set_tests_properties(snippets PROPERTIES
  ENVIRONMENT "SYNCBN_MPIEXEC=${MPIEXEC_EXECUTABLE}"
  PROCESSORS 2 TIMEOUT 300)
