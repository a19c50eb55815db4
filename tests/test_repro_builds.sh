#!/usr/bin/env bash
# test_repro_builds.sh - SYNCBN_REPRODUCIBLE across machines: the same source, built
# for different x86-64 instruction-set levels, must give the same bits. Runs
# tests/repro_dump (36 configurations, outputs y, dx, eval y, dweight, dbias,
# running_mean, running_var; and 36 fused/bf16 ones, outputs y, dx, dz,
# eval y, dweight, dbias) from every build at 1 and 3 ranks and 1 and 2 OpenMP
# threads, and requires every fingerprint file to be byte-identical to the first
# build's at 1 rank / 1 thread. Then checks that the comparison is not blind: a
# one-bit change of one input per configuration must change the fingerprint.
# Prints the widest vector registers each build's libsyncbn.so uses, and fails if a
# build named "portable" uses any AVX register (it would not be the baseline build).
#
# Usage: tests/test_repro_builds.sh BUILD_DIR BUILD_DIR...   (scripts/test.sh builds them)
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
MPIEXEC=${SYNCBN_MPIEXEC:-mpirun}
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

widest() { # the widest vector registers in a library's code
  local d
  d=$(objdump -d --no-show-raw-insn "$1" 2>/dev/null) || { echo "unknown (no objdump)"; return; }
  if grep -q '%zmm' <<<"$d"; then echo "zmm (AVX-512)"
  elif grep -q '%ymm' <<<"$d"; then echo "ymm (AVX/AVX2)"
  else echo "xmm (SSE)"; fi
}

run_dump() { # BUILD NP THREADS OUT [--perturb]
  local b=$1 np=$2 t=$3 out=$4
  shift 4
  if ! OMP_NUM_THREADS=$t "$MPIEXEC" -np "$np" --oversubscribe --allow-run-as-root "$b/tests/repro_dump" "$out" "$@" \
    >"$out.log" 2>&1; then
    echo "FAIL: repro_dump from $b at $np ranks, $t threads exited with an error:"
    tail -20 "$out.log"
    exit 1
  fi
}

ref="" fail=0 runs=0
for b in "$@"; do
  [ -x "$b/tests/repro_dump" ] || { echo "FAIL: $b/tests/repro_dump not built"; exit 1; }
  lib=$(ls "$b"/src/libsyncbn.so.* 2>/dev/null | head -1)
  isa=$(widest "${lib:-$b/src/libsyncbn.so}")
  echo "build $b: libsyncbn uses $isa registers"
  case $b in *portable*) [ "${isa%% *}" = xmm ] || { echo "FAIL: $b is meant to be the baseline build"; fail=1; } ;; esac
  for np in 1 3; do
    for t in 1 2; do
      out="$tmp/$(basename "$b")_np${np}_t$t.txt"
      run_dump "$b" $np $t "$out"
      runs=$((runs + 1))
      if [ -z "$ref" ]; then
        ref=$out
        # 36 x 7 plain lines, 36 fused: 24 with z x 6 lines + 12 without x 5
        [ "$(wc -l <"$ref")" -eq 456 ] || { echo "FAIL: expected 456 fingerprint lines, got $(wc -l <"$ref")"; exit 1; }
      elif ! cmp -s "$ref" "$out"; then
        echo "FAIL: $b at $np ranks, $t threads differs from $1 at 1 rank, 1 thread:"
        diff "$ref" "$out" | grep '^>' | head -10
        fail=1
      fi
    done
  done
done

# not blind: one flipped bit of one input float per configuration changes the fingerprint
run_dump "$1" 3 2 "$tmp/perturbed.txt" --perturb
changed=$(diff "$ref" "$tmp/perturbed.txt" | grep -c '^>' || true)
if [ "$changed" -eq 0 ]; then
  echo "FAIL: a one-bit change of the input left the fingerprint unchanged"
  fail=1
else
  echo "control: a one-bit input change altered $changed of 456 fingerprint lines"
fi

[ $fail -eq 0 ] || { echo "test_repro_builds: FAILED"; exit 1; }
echo "PASS: $runs runs ($# builds x 1, 3 ranks x 1, 2 threads): reproducible-mode outputs bitwise identical"
