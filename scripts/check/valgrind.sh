#!/usr/bin/env bash
# valgrind memcheck on the MPI test binaries at 2 ranks:
#   scripts/check/valgrind.sh [test binary names...]
# Default: the MPI tests of the layer (test_layer test_checkpoint test_misuse
# test_reproducible). test_exactsum is pure integer arithmetic already covered by
# the ASan+UBSan build and takes over 15 minutes under valgrind: name it to include it.
# Fails (exit 1) when valgrind reports an error or a definite leak that is not in
# Open MPI's suppression file or tests/valgrind.supp (Open MPI start-up/shut-down
# only). Logs: build-valgrind/valgrind/<test>.<pid>.log
#
# Own build without -march=native: valgrind 3.19 cannot execute AVX-512.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${SYNCBN_VALGRIND_BUILD:-build-valgrind}
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(test_layer test_checkpoint test_misuse test_reproducible)

command -v valgrind >/dev/null || { echo "valgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
ompi_supp=$(dpkg -L libopenmpi3 2>/dev/null | grep 'openmpi-valgrind.supp$' | head -1 || true)
ompi_supp=${ompi_supp:-/usr/share/openmpi/openmpi-valgrind.supp}
[ -f "$ompi_supp" ] || { echo "valgrind.sh: Open MPI suppression file not found" >&2; exit 1; }

cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSYNCBN_NATIVE=OFF -DSYNCBN_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$dir" -j2 >/dev/null

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1
logs=$dir/valgrind
rm -rf "$logs"
mkdir -p "$logs"
failed=()
for t in "${tests[@]}"; do
  [ -x "$dir/tests/$t" ] || { echo "valgrind.sh: no $dir/tests/$t" >&2; failed+=("$t"); continue; }
  cmd=(mpirun -np 2 --oversubscribe
       valgrind --tool=memcheck --error-exitcode=99 --leak-check=full --show-leak-kinds=definite
       --errors-for-leak-kinds=definite --num-callers=50 --track-origins=yes
       --suppressions="$ompi_supp" --suppressions=tests/valgrind.supp
       --log-file="$logs/$t.%p.log" "$dir/tests/$t")
  echo "+ ${cmd[*]}" | tee -a "$logs/commands.txt"
  start=$SECONDS
  if "${cmd[@]}" >"$logs/$t.out" 2>&1; then
    echo "  $t: clean ($((SECONDS - start)) s): $(grep -h 'ERROR SUMMARY' "$logs/$t".*.log | sed 's/==[0-9]*== //' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  else
    echo "  $t: FAILED ($((SECONDS - start)) s)"
    grep -l -v 'ERROR SUMMARY: 0 errors' "$logs/$t".*.log | head -2 | xargs -r sed -n '/definitely lost in\|Invalid\|uninitialised\|Conditional jump/,/^==[0-9]*== $/p' | head -60
    tail -5 "$logs/$t.out"
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "valgrind.sh: FAILED: ${failed[*]} (logs in $logs)"
  exit 1
fi
echo "valgrind.sh: no errors from our code in: ${tests[*]}"
