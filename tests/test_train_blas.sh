#!/usr/bin/env bash
# CTest train_blas: syncbn-train's choice of OpenBLAS kernels (examples/train_blas.h).
#   1. --blas-core Haswell at 2 ranks: the header and both hash lines name core Haswell;
#   2. SYNCBN_BLAS_CORE=Prescott: the header names core Prescott (the pin by environment);
#   3. ranks started with different OPENBLAS_CORETYPE: the job fails with a message
#      naming both cores; the same job with --blas-core Haswell runs and gives the hash
#      of run 1 (a mixed cluster pinned to one core stays rank-count invariant);
#   4. a simulated unrecognised CPU (OpenBLAS falling back to Prescott): the program
#      replaces Prescott with the widest core the CPU runs;
#   5. a pin to a name OpenBLAS does not know fails instead of running other kernels.
# Needs a CPU with AVX2 (Haswell kernels); exits 77 (skip) otherwise.
# Usage: tests/test_train_blas.sh path/to/syncbn-train
set -euo pipefail
TRAIN=$1
. "$(dirname "$0")/test_train_common.sh"
need_data
grep -qw avx2 /proc/cpuinfo || { echo "SKIP: the CPU has no AVX2 (Haswell kernels)"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
args=(--data "$DATA" --train-limit 640 --batch 64 --steps 4 --no-eval --print-every 1000)
mpi=("$MPIEXEC" --oversubscribe --allow-run-as-root)
fail() { echo "FAIL: $*"; exit 1; }
header() { grep '^syncbn-train: OpenBLAS' "$1" || true; }

run_train 2 "$tmp/haswell.txt" "${args[@]:2}" --blas-core Haswell
h=$(header "$tmp/haswell.txt")
echo "1. $h"
grep -q 'core Haswell (pinned by --blas-core)' <<<"$h" || fail "--blas-core Haswell not in effect"
[ "$(grep -c 'sha256 [0-9a-f]*  (OpenBLAS [0-9.]*, core Haswell)$' "$tmp/haswell.txt")" -eq 2 ] ||
  fail "the hash lines do not name core Haswell"
ref=$(hash_of "$tmp/haswell.txt" params)

SYNCBN_BLAS_CORE=Prescott run_train 1 "$tmp/prescott.txt" "${args[@]:2}"
h=$(header "$tmp/prescott.txt")
echo "2. $h"
grep -q 'core Prescott (pinned by SYNCBN_BLAS_CORE)' <<<"$h" || fail "SYNCBN_BLAS_CORE=Prescott not in effect"

if "${mpi[@]}" -np 1 env OPENBLAS_CORETYPE=Prescott "$TRAIN" "${args[@]}" : \
  -np 1 env OPENBLAS_CORETYPE=Haswell "$TRAIN" "${args[@]}" >"$tmp/mixed.txt" 2>&1; then
  fail "ranks with different cores ran without an error"
fi
grep -q 'different OpenBLAS cores (rank 0 Prescott, rank 1 Haswell)' "$tmp/mixed.txt" ||
  { cat "$tmp/mixed.txt"; fail "no clear message for mixed cores"; }
echo "3. mixed cores without a pin: $(grep -o 'the ranks run different OpenBLAS cores ([^)]*)' "$tmp/mixed.txt")"
"${mpi[@]}" -np 1 env OPENBLAS_CORETYPE=Prescott "$TRAIN" "${args[@]}" --blas-core Haswell : \
  -np 1 env OPENBLAS_CORETYPE=Haswell "$TRAIN" "${args[@]}" --blas-core Haswell >"$tmp/pinned.txt" 2>&1 ||
  { cat "$tmp/pinned.txt"; fail "mixed cores pinned to Haswell failed"; }
[ "$(hash_of "$tmp/pinned.txt" params)" = "$ref" ] || fail "mixed cores pinned to Haswell: hash differs from run 1"
echo "   mixed cores with --blas-core Haswell: params sha256 ${ref:0:16}..., as in run 1"

SYNCBN_BLAS_SIMULATE_FALLBACK=Prescott run_train 2 "$tmp/auto.txt" "${args[@]:2}"
h=$(header "$tmp/auto.txt")
echo "4. $h"
want=Haswell
grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512dq /proc/cpuinfo && want=SkylakeX
grep -q "core $want (auto: OpenBLAS chose Prescott, the CPU runs $want)" <<<"$h" ||
  fail "the fallback to Prescott was not replaced by $want"

if "${mpi[@]}" -np 1 "$TRAIN" "${args[@]}" --blas-core NoSuchCore >"$tmp/bogus.txt" 2>&1; then
  fail "--blas-core NoSuchCore ran"
fi
grep -q "pinned OpenBLAS core 'NoSuchCore' did not take effect" "$tmp/bogus.txt" || fail "no clear message for a bad pin"
echo "5. $(grep -o "the pinned OpenBLAS core 'NoSuchCore' did not take effect[^(]*" "$tmp/bogus.txt")"
echo "PASS"
