#!/usr/bin/env bash
# demo.sh - syncbn's main job: install, build, and show on real data that
# synchronized BN trains identically on any number of ranks.
#
#   1. installs missing Debian packages (scripts/install_deps.sh build data plot);
#   2. configures and builds syncbn-train into build/ (Release);
#   3. trains the Fashion-MNIST CNN for a short run on 1, 2, 3 and 4 MPI ranks with
#      synchronized BN (reproducible reductions, the default), and on 2 and 4 ranks
#      with plain per-rank BN (--bn local);
#   4. prints test accuracy, throughput and the parameter hash of every run, and
#      fails unless the four synchronized runs have identical hashes;
#   5. plots the loss curves (P = 1, 2, 4, sync vs local BN) and prints the PNG's path.
#
# Usage: scripts/demo.sh [--steps N] [--build DIR] [--out DIR]
#   --steps N   training steps per run (default 200, i.e. 25,600 images at batch 128);
#               a full 3-epoch run is 1407 steps
# Runs as root or not, with or without a terminal (CI=true is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=200 build=build out=out/demo
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
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

say "training: $steps steps of batch 128 per run, $(getconf _NPROCESSORS_ONLN) cores, output in $out/"
printf '%-10s %-6s %-9s %-9s %s\n' "ranks" "BN" "test acc" "images/s" "params sha256"
declare -A HASH
run() { # run NAME NP BN
  local name=$1 np=$2 bn=$3
  run_train "$np" "$out/$name.txt" --steps "$steps" --bn "$bn" --log "$out/$name.csv"
  HASH[$name]=$(hash_of "$out/$name.txt" params)
  local acc ips
  acc=$(sed -n 's/^final test accuracy \([0-9.]*\)$/\1/p; s/^epoch [0-9]* test accuracy \([0-9.]*\)$/\1/p' "$out/$name.txt" | tail -1)
  ips=$(sed -n 's/^throughput \([0-9]*\) images.*/\1/p' "$out/$name.txt")
  printf '%-10s %-6s %-9s %-9s %s\n' "$np" "$bn" "$acc" "$ips" "${HASH[$name]}"
}
for np in 1 2 3 4; do run "sync_np$np" $np sync; done
for np in 2 4; do run "local_np$np" $np local; done

say "result"
ok=1
for np in 2 3 4; do [ "${HASH[sync_np$np]}" = "${HASH[sync_np1]}" ] || ok=0; done
if [ $ok -eq 1 ]; then
  echo "synchronized BN: the parameters after $steps steps are bitwise identical on 1, 2, 3 and 4 ranks"
  echo "params sha256 ${HASH[sync_np1]}"
else
  echo "FAILED: synchronized BN gave different parameters on different numbers of ranks" >&2
  exit 1
fi
for np in 2 4; do
  [ "${HASH[local_np$np]}" = "${HASH[sync_np1]}" ] && echo "note: local BN at $np ranks equals sync BN (unexpected)" ||
    echo "per-rank BN on $np ranks: different parameters (each rank normalizes with its own $((128 / np))-sample statistics)"
done

say "loss plot"
png=$(scripts/plot_loss.sh "$out/loss.png" \
  "sync BN, 1 rank=$out/sync_np1.csv" "sync BN, 2 ranks=$out/sync_np2.csv" "sync BN, 4 ranks=$out/sync_np4.csv" \
  "local BN, 2 ranks=$out/local_np2.csv" "local BN, 4 ranks=$out/local_np4.csv")
echo "loss plot: $(cd "$(dirname "$png")" && pwd)/$(basename "$png")"
