#!/usr/bin/env bash
# CTest train_fused: the ReLU after each BN fused into the BN layer (the default) and
# unfused (--unfused: plain BN layers, the ReLU in the example's pooling) must give
# bitwise identical training: the same per-step losses, test accuracy and parameter
# hash, at 1 and 2 ranks (reproducible, so also equal across the two), and at 2 ranks
# with --reduction fast. The library's mask convention (the ReLU's input > 0, as
# PyTorch's ReLU backward) is what makes them equal.
# Usage: tests/test_train_fused.sh path/to/syncbn-train
set -euo pipefail
TRAIN=$1
. "$(dirname "$0")/test_train_common.sh"
need_data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 11 steps: the last batch of the 1001-image subset holds one sample (an empty rank
# at 2 ranks), and the epoch ends with an evaluation (eval forwards of both kinds).
args=(--train-limit 1001 --test-limit 300 --batch 100 --steps 11 --print-every 4)
acc_of() { sed -n 's/^epoch 1 test accuracy \([0-9.]*\)$/\1/p' "$1"; }
ref=""
for run in "1 reproducible" "2 reproducible" "2 fast"; do
  set -- $run
  np=$1 red=$2
  for kind in fused unfused; do
    flag=()
    [ $kind = unfused ] && flag=(--unfused)
    out="$tmp/np$np-$red-$kind"
    run_train "$np" "$out.txt" "${args[@]}" --reduction "$red" --log "$out.csv" "${flag[@]}"
    grep -q "relu $( [ $kind = fused ] && echo fused || echo unfused)" "$out.txt" ||
      { echo "FAIL: the header does not say relu $kind"; head -3 "$out.txt"; exit 1; }
    grep -q "ranks agree on parameters: yes" "$out.txt" || { echo "FAIL: ranks disagree ($run $kind)"; exit 1; }
  done
  f="$tmp/np$np-$red-fused" u="$tmp/np$np-$red-unfused"
  pf=$(hash_of "$f.txt" params) pu=$(hash_of "$u.txt" params)
  lf=$(hash_of "$f.txt" losses) lu=$(hash_of "$u.txt" losses)
  echo "np=$np $red: params fused $pf unfused $pu; accuracy $(acc_of "$f.txt") / $(acc_of "$u.txt")"
  [ -n "$pf" ] && [ -n "$lf" ] && [ -n "$(acc_of "$f.txt")" ] || { echo "FAIL: no hash or accuracy printed"; cat "$f.txt"; exit 1; }
  if [ "$pf $lf" != "$pu $lu" ] || ! cmp -s "$f.csv" "$u.csv" || [ "$(acc_of "$f.txt")" != "$(acc_of "$u.txt")" ]; then
    echo "FAIL: np=$np $red: fused and unfused differ"
    diff "$f.csv" "$u.csv" | head
    exit 1
  fi
  if [ $red = reproducible ]; then
    if [ -z "$ref" ]; then ref="$pf $lf"; elif [ "$ref" != "$pf $lf" ]; then
      echo "FAIL: reproducible np=$np differs from np=1"; exit 1
    fi
  fi
done
echo "PASS: fused == unfused bitwise at 1 and 2 ranks (reproducible) and 2 ranks (fast)"
