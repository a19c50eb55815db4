#!/usr/bin/env bash
# CTest train_invariance: a short reproducible run on a small subset at 1, 2 and 3
# ranks (batch 100, which 3 does not divide; the 11th step's batch holds ONE sample,
# so some ranks hold none) must give identical per-step losses and final
# parameters; --bn local must give different ones (the hash is sensitive).
# Usage: tests/test_train_invariance.sh path/to/syncbn-train
set -euo pipefail
TRAIN=$1
. "$(dirname "$0")/test_train_common.sh"
need_data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

args=(--train-limit 1001 --test-limit 300 --batch 100 --print-every 4)
ref=""
for np in 1 2 3; do
  run_train $np "$tmp/np$np.txt" "${args[@]}" --steps 11 --log "$tmp/np$np.csv"
  p=$(hash_of "$tmp/np$np.txt" params)
  l=$(hash_of "$tmp/np$np.txt" losses)
  echo "np=$np params $p losses $l"
  [ -n "$p" ] && [ -n "$l" ] || { echo "FAIL: no hash printed"; cat "$tmp/np$np.txt"; exit 1; }
  grep -q "ranks agree on parameters: yes" "$tmp/np$np.txt" || { echo "FAIL: ranks disagree at np=$np"; exit 1; }
  if [ -z "$ref" ]; then
    ref="$p $l"
  elif [ "$ref" != "$p $l" ]; then
    echo "FAIL: np=$np differs from np=1"
    diff "$tmp/np1.csv" "$tmp/np$np.csv" | head
    exit 1
  fi
  cmp -s "$tmp/np1.csv" "$tmp/np$np.csv" || { echo "FAIL: loss logs differ"; exit 1; }
done
run_train 2 "$tmp/local.txt" "${args[@]}" --steps 10 --bn local
run_train 1 "$tmp/sync10.txt" "${args[@]}" --steps 10
p=$(hash_of "$tmp/local.txt" params)
echo "np=2 --bn local params $p"
[ "$p" != "$(hash_of "$tmp/sync10.txt" params)" ] || { echo "FAIL: --bn local gave the sync hash"; exit 1; }
echo "PASS: identical at 1, 2, 3 ranks"
