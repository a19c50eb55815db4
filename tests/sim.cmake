# The simulated scaling study in quick form (scripts/scale_sim.sh --quick, about two
# minutes): the study's driver, built with smpicc and run under SimGrid SMPI at
# P = 4, 16, 64, must give the REPRODUCIBLE parameter hash of the same driver built
# here with mpicc against the library and run under the real mpirun at P = 1-4.
# Registered only where SimGrid is installed (scripts/install_deps.sh sim) and not in
# the sanitizer build (the simulated half is not instrumented anyway).
find_program(SYNCBN_SMPICC smpicc)
if(SYNCBN_SMPICC AND NOT SYNCBN_SANITIZE)
  add_executable(scale_driver ${PROJECT_SOURCE_DIR}/scripts/sim/scale_driver.c)
  target_link_libraries(scale_driver PRIVATE syncbn MPI::MPI_C)
  add_test(NAME scale_sim_quick
    COMMAND ${PROJECT_SOURCE_DIR}/scripts/scale_sim.sh --quick --out ${CMAKE_CURRENT_BINARY_DIR}/scale_sim
            --real-driver $<TARGET_FILE:scale_driver>)
  set_tests_properties(scale_sim_quick PROPERTIES PROCESSORS 2 TIMEOUT 900)
endif()
