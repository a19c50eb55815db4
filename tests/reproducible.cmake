# SYNCBN_REPRODUCIBLE: bitwise equality across rank counts, splits and thread counts.
syncbn_add_check_exe(test_reproducible SOURCES test_reproducible.c testutil.c LIBS syncbn OpenMP::OpenMP_C)
syncbn_add_mpi_test(reproducible test_reproducible RANKS 1 2 3 4)

# Fingerprint of reproducible-mode outputs, compared across builds (native, AVX2-only,
# portable) by tests/test_repro_builds.sh, which scripts/test.sh runs.
add_executable(repro_dump repro_dump.c)
target_link_libraries(repro_dump PRIVATE syncbn MPI::MPI_C m)

# The reproducible wire format seen from outside: message sizes and counts (counted
# through the MPI profiling interface) and the fallback's bits.
syncbn_add_check_exe(test_wire SOURCES test_wire.c testutil.c LIBS syncbn)
syncbn_add_mpi_test(wire test_wire RANKS 1 2 3 4)
