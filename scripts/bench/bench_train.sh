#!/usr/bin/env bash
# bench_train.sh - training throughput of syncbn-train (both reduction modes, each
# with the ReLUs fused into the BN layers, the default, and --unfused) next to
# PyTorch CPU on the same model, batch and data, at equal thread counts:
# 1 thread = 1 rank / torch.set_num_threads(1), 2 threads = 2 ranks / 2 threads.
# Runs are interleaved (a b c a b c ...) so that background load hits every
# configuration alike; the table shows the median images/s of the repetitions,
# counting only the time spent in training steps (no data loading, no evaluation).
# Fused and unfused runs of a repetition must print the same parameter hash (they
# compute the same bits); the script fails if they do not.
# PyTorch (Debian python3-torch, /usr/bin/python3) is optional: skipped if missing.
#
# Usage: scripts/bench/bench_train.sh [--build DIR] [--steps N] [--reps R] [--threads "1 2"]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=build steps=150 reps=3 threads="1 2"
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    *) echo "bench_train.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
TRAIN=$build/examples/syncbn-train
[ -x "$TRAIN" ] || { echo "bench_train.sh: $TRAIN not found; build first" >&2; exit 2; }
. tests/test_train_common.sh
need_data
have_torch=0
/usr/bin/python3 -c 'import torch' 2>/dev/null && have_torch=1 ||
  echo "bench_train.sh: PyTorch not installed (scripts/install_deps.sh peers); measuring syncbn-train only"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ips() { sed -n 's/^throughput \([0-9]*\) images.*/\1/p' "$1"; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

declare -A R
rows="reproducible reproducible-unfused fast fast-unfused"
for rep in $(seq "$reps"); do
  for t in $threads; do
    for row in $rows; do
      mode=${row%-unfused} flag=()
      [ "$row" = "$mode" ] || flag=(--unfused)
      # alternate which of the pair runs first, so that neither always follows the other
      OMP_NUM_THREADS=1 run_train "$t" "$tmp/$row.txt" --steps "$steps" --no-eval --print-every 1000000 \
        --reduction "$mode" "${flag[@]}"
      R[$row,$t]+="$(ips "$tmp/$row.txt") "
      blas=$(sed -n 's/^syncbn-train: \(OpenBLAS.*\)$/\1/p' "$tmp/$row.txt")
    done
    for mode in reproducible fast; do
      [ "$(hash_of "$tmp/$mode.txt" params)" = "$(hash_of "$tmp/$mode-unfused.txt" params)" ] ||
        { echo "bench_train.sh: --reduction $mode: fused and --unfused give different parameters" >&2; exit 1; }
    done
    rows=$(echo "$rows" | awk '{ print $2, $1, $4, $3 }') # unfused first in the next repetition
    if [ $have_torch -eq 1 ]; then
      OMP_NUM_THREADS=$t /usr/bin/python3 scripts/bench/train_torch.py --threads "$t" --steps "$steps" --no-eval \
        --data "$DATA" >"$tmp/torch.txt" 2>&1 || { cat "$tmp/torch.txt"; exit 1; }
      R[torch,$t]+="$(ips "$tmp/torch.txt") "
    fi
  done
  echo "repetition $rep/$reps done" >&2
done

echo "training throughput, images/s (median of $reps runs of $steps steps, batch 128, $(getconf _NPROCESSORS_ONLN) cores)"
echo "CPU: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1); syncbn-train ran $blas"
printf '%-48s' "threads (= MPI ranks for syncbn-train)"
for t in $threads; do printf '%12s' "$t"; done
echo
for row in reproducible reproducible-unfused fast fast-unfused torch; do
  [ "$row" = torch ] && [ $have_torch -eq 0 ] && continue
  case $row in
    reproducible) label="syncbn-train --reduction reproducible" ;;
    reproducible-unfused) label="syncbn-train --reduction reproducible --unfused" ;;
    fast) label="syncbn-train --reduction fast" ;;
    fast-unfused) label="syncbn-train --reduction fast --unfused" ;;
    torch) label="PyTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)') CPU" ;;
  esac
  printf '%-48s' "$label"
  for t in $threads; do printf '%12s' "$(echo "${R[$row,$t]}" | median)"; done
  printf '   (runs: '
  for t in $threads; do printf '[%s]' "${R[$row,$t]% }"; done
  echo ')'
done
# The machine's load changes between repetitions: the paired ratio (both sides from
# the same repetition) is steadier than a ratio of medians.
# paired_ratio A B: median [min-max] of A/B over the repetitions (space-separated lists)
paired_ratio() {
  paste -d' ' <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
    awk '{ print $1 / $2 }' | sort -g |
    awk '{ r[NR] = $1 } END { m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
           printf "%.2f [%.2f-%.2f]", m, r[1], r[NR] }'
}
echo "fused / unfused throughput, median of the per-repetition ratios [min-max]"
for mode in reproducible fast; do
  printf '%-48s' "syncbn-train --reduction $mode"
  for t in $threads; do printf '%20s' "$(paired_ratio "${R[$mode,$t]}" "${R[$mode-unfused,$t]}")"; done
  echo
done
[ $have_torch -eq 1 ] || exit 0
echo "ratio to PyTorch, median of the per-repetition ratios [min-max]"
for row in reproducible fast; do
  printf '%-48s' "syncbn-train --reduction $row"
  for t in $threads; do printf '%20s' "$(paired_ratio "${R[$row,$t]}" "${R[torch,$t]}")"; done
  echo
done
