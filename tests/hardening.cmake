# Hardening: checkpoints, misuse across ranks, fault scripts.
# Checkpoints are not collective, but the layers between saves train collectively,
# so the test also runs at 2 ranks (each rank in its own temporary directory).
syncbn_add_check_exe(test_checkpoint SOURCES test_checkpoint.c testutil.c LIBS syncbn ZLIB::ZLIB)
syncbn_add_mpi_test(checkpoint test_checkpoint RANKS 1 2 TIMEOUT 300)

# Misuse: bad arguments on one rank, disagreeing ranks, out-of-step calls.
syncbn_add_check_exe(test_misuse SOURCES test_misuse.c testutil.c LIBS syncbn)
syncbn_add_mpi_test(misuse test_misuse RANKS 1 2 3 4 TIMEOUT 300)

# Faults: SIGKILL of one rank ends the job in bounded time, and the resumed run
# reaches the uninterrupted run's hash (scripts/check/kill_resume.sh, short version, ~15 s).
if(SYNCBN_BUILD_EXAMPLES)
  add_test(NAME kill_resume
    COMMAND ${PROJECT_SOURCE_DIR}/scripts/check/kill_resume.sh --quick $<TARGET_FILE:syncbn-train>)
  set_tests_properties(kill_resume PROPERTIES PROCESSORS 2 TIMEOUT 300 SKIP_RETURN_CODE 77)
  # Elastic resume: the killed job resumes on another number of ranks and still
  # reaches the uninterrupted run's hash (reproducible mode). P -> Q: fewer ranks after
  # losing a node (4 -> 3, 3 -> 1) and more (2 -> 3).
  foreach(_pq 4_3 2_3 3_1)
    string(REPLACE "_" ";" _pql ${_pq})
    list(GET _pql 0 _p)
    list(GET _pql 1 _q)
    add_test(NAME kill_resume_elastic_${_p}to${_q}
      COMMAND ${PROJECT_SOURCE_DIR}/scripts/check/kill_resume.sh --quick $<TARGET_FILE:syncbn-train>)
    set_tests_properties(kill_resume_elastic_${_p}to${_q} PROPERTIES
      ENVIRONMENT "NP=${_p};NP_RESUME=${_q}" PROCESSORS 2 TIMEOUT 300 SKIP_RETURN_CODE 77)
  endforeach()
endif()
