#!/usr/bin/env bash
# demo.sh - syncbn's main job: install, build, and show on real data that
# synchronized BN trains identically on any number of ranks.
#
#   1. installs missing Debian packages (scripts/install_deps.sh build data plot);
#   2. configures and builds syncbn-train into build/ (Release);
#   3. trains the Fashion-MNIST CNN for a short run on 1, 2, 3 and 4 MPI ranks with
#      synchronized BN (reproducible reductions, the default), and on 2 and 4 ranks
#      with plain per-rank BN (--bn local);
#   4. the small-batch case, where synchronization matters: a global batch of 8 on 8
#      oversubscribed ranks (ONE sample per rank, lr 0.01), sync BN against per-rank
#      BN, and sync BN on 1 rank as the reference;
#   5. prints test accuracy, throughput and the parameter hash of every run (and the
#      OpenBLAS core the hashes belong to), and fails unless the synchronized runs
#      of each batch size have identical hashes at every rank count;
#   6. plots the loss curves (B = 128: P = 1, 2, 4, sync vs local BN; B = 8: sync vs
#      local at 8 ranks, test accuracies in the legend) and prints the PNGs' paths.
#
# Usage: scripts/demo.sh [--steps N] [--small-steps N] [--build DIR] [--out DIR]
#   --steps N        steps per batch-128 run (default 200, i.e. 25,600 images);
#                    a full 3-epoch run is 1407 steps
#   --small-steps N  steps per batch-8 run (default 400)
# Runs as root or not, with or without a terminal (CI=true is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=200 small_steps=400 build=build out=out/demo
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --small-steps) small_steps=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }

say "dependencies"
scripts/install_deps.sh build data plot

say "build ($build, Release)"
mkdir -p "$build"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" --target syncbn-train
TRAIN=$build/examples/syncbn-train

. tests/test_train_common.sh
need_data
export OMP_NUM_THREADS=1 # one thread per rank; OpenBLAS is pinned to one thread too
mkdir -p "$out"
rm -f "$out"/*.csv "$out"/*.txt

say "training: global batch 128, $steps steps per run, $(getconf _NPROCESSORS_ONLN) cores, output in $out/"
printf '%-6s %-6s %-8s %-9s %-9s %s\n' "ranks" "BN" "batch/rk" "test acc" "images/s" "params sha256"
declare -A HASH ACC
run() { # run NAME NP BN BATCH STEPS [ARGS...]
  local name=$1 np=$2 bn=$3 batch=$4 n=$5
  shift 5
  run_train "$np" "$out/$name.txt" --steps "$n" --bn "$bn" --batch "$batch" --log "$out/$name.csv" "$@"
  HASH[$name]=$(hash_of "$out/$name.txt" params)
  local ips
  ACC[$name]=$(sed -n 's/^final test accuracy \([0-9.]*\)$/\1/p; s/^epoch [0-9]* test accuracy \([0-9.]*\)$/\1/p' "$out/$name.txt" | tail -1)
  ips=$(sed -n 's/^throughput \([0-9]*\) images.*/\1/p' "$out/$name.txt")
  local per=$((batch / np))
  [ $((batch % np)) -eq 0 ] || per="$per-$((per + 1))"
  printf '%-6s %-6s %-8s %-9s %-9s %s\n' "$np" "$bn" "$per" "${ACC[$name]}" "$ips" "${HASH[$name]}"
}
for np in 1 2 3 4; do run "sync_np$np" $np sync 128 "$steps"; done
for np in 2 4; do run "local_np$np" $np local 128 "$steps"; done
blas=$(sed -n 's/^params sha256 [0-9a-f]*  (\(.*\))$/\1/p' "$out/sync_np1.txt")

say "small per-rank batch: global batch 8, lr 0.01, $small_steps steps per run"
printf '%-6s %-6s %-8s %-9s %-9s %s\n' "ranks" "BN" "batch/rk" "test acc" "images/s" "params sha256"
small=(--lr 0.01)
run small_sync_np1 1 sync 8 "$small_steps" "${small[@]}"
run small_sync_np8 8 sync 8 "$small_steps" "${small[@]}"
run small_local_np8 8 local 8 "$small_steps" "${small[@]}"
gap=$(awk -v s="${ACC[small_sync_np8]}" -v l="${ACC[small_local_np8]}" 'BEGIN { printf "%.1f", 100 * (s - l) }')

say "result ($blas)"
ok=1
for np in 2 3 4; do [ "${HASH[sync_np$np]}" = "${HASH[sync_np1]}" ] || ok=0; done
[ "${HASH[small_sync_np8]}" = "${HASH[small_sync_np1]}" ] || ok=0
if [ $ok -eq 1 ]; then
  echo "synchronized BN: the parameters are bitwise identical on 1, 2, 3 and 4 ranks (batch 128, $steps steps)"
  echo "                 and on 1 and 8 ranks (batch 8, $small_steps steps)"
  echo "params sha256 ${HASH[sync_np1]}  ($blas)"
else
  echo "FAILED: synchronized BN gave different parameters on different numbers of ranks" >&2
  exit 1
fi
for np in 2 4; do
  [ "${HASH[local_np$np]}" = "${HASH[sync_np1]}" ] && echo "note: local BN at $np ranks equals sync BN (unexpected)" ||
    echo "per-rank BN on $np ranks: different parameters (each rank normalizes with its own $((128 / np))-sample statistics)"
done
echo "one sample per rank (8 ranks, batch 8): sync BN test accuracy ${ACC[small_sync_np8]} (= 1 rank), per-rank BN ${ACC[small_local_np8]}: $gap points lower"

say "loss plots"
png=$(scripts/tools/plot_loss.sh "$out/loss.png" \
  "sync BN, 1 rank (acc ${ACC[sync_np1]})=$out/sync_np1.csv" "sync BN, 2 ranks (acc ${ACC[sync_np2]})=$out/sync_np2.csv" \
  "sync BN, 4 ranks (acc ${ACC[sync_np4]})=$out/sync_np4.csv" \
  "local BN, 2 ranks (acc ${ACC[local_np2]})=$out/local_np2.csv" "local BN, 4 ranks (acc ${ACC[local_np4]})=$out/local_np4.csv")
echo "batch 128: $(cd "$(dirname "$png")" && pwd)/$(basename "$png")"
png=$(scripts/tools/plot_loss.sh --title "batch 8 = 1 sample per rank on 8 ranks: per-rank BN loses $gap points of test accuracy" \
  "$out/loss_small_batch.png" \
  "sync BN, 1 rank (acc ${ACC[small_sync_np1]})=$out/small_sync_np1.csv" \
  "sync BN, 8 ranks (acc ${ACC[small_sync_np8]})=$out/small_sync_np8.csv" \
  "local BN, 8 ranks (acc ${ACC[small_local_np8]})=$out/small_local_np8.csv")
echo "batch 8:   $(cd "$(dirname "$png")" && pwd)/$(basename "$png")"
