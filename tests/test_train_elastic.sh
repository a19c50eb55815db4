#!/usr/bin/env bash
# CTest train_elastic: a checkpoint holds nothing that depends on the number of ranks.
# In reproducible mode with synchronized BN, runs of the same training on 1, 2, 3 and
# 4 ranks that save at the same step must write byte-identical checkpoint files
# (parameters, momentum, BN running statistics, step, seed, batch), which is what lets
# a job resume on any number of ranks. A FAST-mode run is the control: its sums are
# rounded in a rank-dependent order, so its checkpoints differ between 1 and 3 ranks
# (if they did not, the comparison above would prove nothing).
# Usage: tests/test_train_elastic.sh path/to/syncbn-train
set -euo pipefail
TRAIN=$1
. "$(dirname "$0")/test_train_common.sh"
need_data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

args=(--train-limit 600 --test-limit 100 --batch 100 --steps 8 --no-eval --print-every 4)
for np in 1 2 3 4; do
  run_train "$np" "$tmp/r$np.txt" "${args[@]}" --save "$tmp/ck$np.bin"
done
for np in 2 3 4; do
  if ! cmp "$tmp/ck1.bin" "$tmp/ck$np.bin"; then
    echo "FAIL: the checkpoint written on $np ranks differs from the one written on 1 rank"
    exit 1
  fi
done
echo "checkpoints at step 8 on 1-4 ranks: identical ($(sha256sum <"$tmp/ck1.bin" | cut -c1-16)...)"

for np in 1 3; do
  run_train "$np" "$tmp/f$np.txt" "${args[@]}" --reduction fast --save "$tmp/fck$np.bin"
done
if cmp -s "$tmp/fck1.bin" "$tmp/fck3.bin"; then
  echo "FAIL: control: FAST-mode checkpoints on 1 and 3 ranks are identical; the comparison cannot tell"
  exit 1
fi
echo "control: FAST-mode checkpoints on 1 and 3 ranks differ, as expected"
echo "PASS: a reproducible-mode checkpoint does not depend on the number of ranks that wrote it"
