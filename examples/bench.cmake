# syncbn-bench: the benchmark program (examples/bench.c). Not a test: performance is
# checked by running it (or scripts/bench/bench_compare.sh), never by a timed unit test.
add_executable(syncbn-bench ${CMAKE_CURRENT_SOURCE_DIR}/bench.c)
target_link_libraries(syncbn-bench PRIVATE syncbn MPI::MPI_C OpenMP::OpenMP_C)
