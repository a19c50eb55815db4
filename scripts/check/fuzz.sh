#!/usr/bin/env bash
# Fuzzes syncbn_load with libFuzzer for a set time (default 60 s):
#   scripts/check/fuzz.sh [seconds]
# Builds tests/fuzz/fuzz_load.c with clang -fsanitize=fuzzer,address,undefined
# directly from the library sources (not through the main CMake build), starts from
# the seed corpus in tests/fuzz/corpus/ (read only; new inputs go to a scratch
# directory), and fails on any crash, sanitizer report or property violation.
# Needs clang and libclang-rt-14-dev (scripts/install_deps.sh fuzz).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
out=${SYNCBN_FUZZ_DIR:-build-fuzz}
# Scratch files for each input: on tmpfs when there is one (save fsyncs).
tmp=$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp)/syncbn_fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out/corpus"

CC=${CC_FUZZ:-$(command -v clang || command -v clang-14)}
# The kernels use OpenMP: clang's own omp.h, GCC's libgomp runtime (no libomp needed).
mpi_cflags=$(mpicc --showme:compile)
mpi_libs=$(mpicc --showme:link)
set -x
"$CC" -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -fopenmp=libgomp -DSYNCBN_BUILDING -Wall -Wextra -Wno-psabi \
  -Iinclude -Isrc $mpi_cflags \
  tests/fuzz/fuzz_load.c src/*.c \
  -o "$out/fuzz_load" $mpi_libs -lgomp -lz -lm
set +x

# MPI_Init without mpirun (singleton). Open MPI wants these when run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export SYNCBN_FUZZ_TMP=$tmp OMP_NUM_THREADS=1
# Open MPI's own allocations at exit are not the loader's: no leak checking here.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$out/fuzz_load" -max_total_time="$secs" -max_len=512 -timeout=10 -print_final_stats=1 \
  -artifact_prefix="$out/" "$out/corpus" tests/fuzz/corpus 2>&1 | tee "$out/fuzz.log" | grep -v '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)' || true
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "fuzz.sh: FAILED (exit $status); see $out/fuzz.log and $out/crash-*" >&2
  exit "$status"
fi
echo "fuzz.sh: $secs s without a crash: $(grep -o 'stat::number_of_executed_units: [0-9]*' "$out/fuzz.log")"
