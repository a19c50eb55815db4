#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs the whole CTest suite
# twice - the Release build, then an AddressSanitizer + UBSan build - and then 30 s
# of libFuzzer on the checkpoint loader (scripts/check/fuzz.sh; 60 s by hand).
# After the Release suite it also builds the library for other x86-64 instruction-set
# levels (build-portable: -DSYNCBN_NATIVE=OFF; build-avx2: x86-64-v3, when the CPU has
# AVX2; build-fastmath: the portable build configured with CMAKE_C_FLAGS=-ffast-math,
# which CMakeLists.txt must undo) and requires reproducible-mode outputs to be bitwise
# equal across the builds (tests/test_repro_builds.sh, about a minute and a half).
# The full run adds a ThreadSanitizer build (clang, LLVM's OpenMP under its Archer
# tool): the kernel tests at 2 and 4 OpenMP threads on 1 rank (3-5 minutes).
#   scripts/test.sh            both suites
#   scripts/test.sh --quick    Release suite and the cross-build check only
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install_deps.sh build data fuzz tsan python sim

# Open MPI refuses to run as root unless told; harmless for other users.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Oversubscribed ranks must yield the CPU instead of spinning.
export OMPI_MCA_mpi_yield_when_idle=1

run_suite() { # <build dir> <extra cmake args...>
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$dir" -j2
  ctest --test-dir "$dir" --output-on-failure -j2 --timeout 900
}

echo "== Release build =="
run_suite build

echo "== reproducible mode across builds: native, AVX2-only, AVX+FMA without AVX2, portable, portable under -ffast-math =="
# Only the library, tests/repro_dump and tests/test_moments are built in the extra
# directories.
levels=(build)
extra_build() { # <dir> <extra cmake args...>
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DSYNCBN_NATIVE=OFF -DSYNCBN_BUILD_EXAMPLES=OFF "$@" >/dev/null
  cmake --build "$dir" -j2 --target repro_dump test_moments test_apply
  levels+=("$dir")
  # The kernels of this build on their own: sums against references, the bfloat16
  # rounding (whose fast and general ways differ per instruction set), and the
  # bfloat16 float path with its exact fallback (whose decisions may differ too).
  (cd "$dir" && OMP_NUM_THREADS=2 mpirun -np 1 --oversubscribe tests/test_moments)
  (cd "$dir" && OMP_NUM_THREADS=2 mpirun -np 1 --oversubscribe tests/test_apply)
}
grep -qw avx2 /proc/cpuinfo && extra_build build-avx2 -DCMAKE_C_FLAGS=-march=x86-64-v3
# AVX and FMA without AVX2 (Sandy Bridge with FMA, AMD Piledriver): the kernels' 256-bit
# and FMA-only branches, which no other build here compiles.
grep -qw avx /proc/cpuinfo && grep -qw fma /proc/cpuinfo && extra_build build-avx-fma -DCMAKE_C_FLAGS="-mavx -mfma"
extra_build build-portable
# A user's -ffast-math must not reach the kernels (CMakeLists.txt undoes it).
extra_build build-fastmath -DCMAKE_C_FLAGS=-ffast-math
tests/test_repro_builds.sh "${levels[@]}"

if [ "${1:-}" != "--quick" ]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer build =="
  # Open MPI's own allocations at exit are not ours to fix: leak checking is done by
  # scripts/check/valgrind.sh with Open MPI's suppression file instead.
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-asan -DSYNCBN_SANITIZE=ON

  echo "== ThreadSanitizer build (clang, libomp + Archer): kernel tests at 2 and 4 threads =="
  # Archer tells TSan about libomp's barriers and locks through OMPT, so only real
  # races between our threads are reported; tests/tsan.supp covers only libomp's and
  # Open MPI's own internals. Only the kernel tests are built; test_layer runs its
  # "core" case and test_moments its "sums" case (their other cases are single-
  # threaded or repeat the same kernels on 17 MB, 10x slower under TSan).
  CC=clang cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Release -DSYNCBN_TSAN=ON -DSYNCBN_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build build-tsan -j2 --target test_fused test_layer test_moments
  tsan_env=(OMP_TOOL_LIBRARIES=/usr/lib/llvm-14/lib/libarcher.so
            TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp")
  for threads in 2 4; do
    for test_case in test_fused: test_layer:core test_moments:sums; do # <binary>:<Check case, or all>
      echo "-- $test_case at $threads threads"
      tcase=${test_case#*:}
      (cd build-tsan && env "${tsan_env[@]}" OMP_NUM_THREADS=$threads ${tcase:+CK_RUN_CASE=$tcase} \
        mpirun -np 1 --oversubscribe "tests/${test_case%%:*}")
    done
  done

  echo "== libFuzzer on syncbn_load (clang build of the library) =="
  scripts/check/fuzz.sh 30
fi
