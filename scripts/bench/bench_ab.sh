#!/usr/bin/env bash
# bench_ab.sh - paired A/B of two builds of libsyncbn under ONE syncbn-bench binary.
#
# The two libraries take turns, round after round (A B, then B A, ...), so slow
# phases of this shared machine hit both alike; for every case (shape, layout,
# reduction) it prints the median over rounds of the per-round ratio B/A of the
# fwd+bwd time, with its range. B/A < 1: B is faster.
#
# Usage: scripts/bench/bench_ab.sh A_LIBDIR B_LIBDIR [--rounds R] [--threads T] -- [syncbn-bench args]
#   A_LIBDIR, B_LIBDIR: directories holding libsyncbn (e.g. build/src of two
#   checkouts of the same ABI version: the bench binary asks for its own soname). The bench binary is build/examples/syncbn-bench of this tree, or
#   $BENCH. Example (the library before and after a change, buffers at +1 float):
#   git worktree add /tmp/old HEAD~3 && cmake -S /tmp/old -B /tmp/old/build && cmake --build /tmp/old/build
#   scripts/bench/bench_ab.sh /tmp/old/build/src build/src --rounds 7 -- --aligned --offset 1
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
liba=$(cd "$1" && pwd) libb=$(cd "$2" && pwd)
shift 2
rounds=5 threads=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "bench_ab.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
bench=${BENCH:-$root/build/examples/syncbn-bench}
[ -x "$bench" ] || { echo "bench_ab.sh: no $bench (build first)" >&2; exit 1; }
mpirun_cmd=(mpirun -np 1 --bind-to none)
[ "$(id -u)" -ne 0 ] || mpirun_cmd+=(--allow-run-as-root)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}" OMP_NUM_THREADS=$threads

out=$(mktemp)
trap 'rm -f "$out"' EXIT
for ((r = 1; r <= rounds; r++)); do
  order="A B"
  [ $((r % 2)) -eq 1 ] || order="B A"
  for side in $order; do
    lib=$liba
    [ "$side" = A ] || lib=$libb
    echo "bench_ab.sh: round $r/$rounds, $side" >&2
    # LD_LIBRARY_PATH is searched before the binary's RUNPATH.
    LD_LIBRARY_PATH="$lib" "${mpirun_cmd[@]}" -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x OMP_WAIT_POLICY \
      "$bench" --machine "$@" | sed -n "s/^RESULT /RESULT side=$side round=$r /p" >>"$out"
  done
done
echo "B/A of fwd+bwd ms, median over $rounds rounds [min-max], OMP_NUM_THREADS=$threads; bench args: $*"
echo "A = $liba"
echo "B = $libb"
awk '
{ delete f; for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  k = f["shape"] " " f["layout"] " " f["impl"] (f["act"] != "" ? " " f["act"] "/" f["dtype"] : ""); t[k, f["side"], f["round"]] = f["fwdbwd_ms"] + 0
  if (!(k in seen)) { seen[k] = 1; keys[++nk] = k }; if (f["round"] + 0 > nr) nr = f["round"] + 0 }
END {
  for (q = 1; q <= nk; q++) {
    k = keys[q]; n = 0; sa = 0
    for (r = 1; r <= nr; r++) if (((k, "A", r) in t) && ((k, "B", r) in t)) { v[++n] = t[k, "B", r] / t[k, "A", r]; sa += t[k, "A", r] }
    for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
    med = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    printf "  %-36s A %8.3f ms  B/A %.2f [%.2f-%.2f]\n", k, sa / n, med, v[1], v[n]
  }
}' "$out"
