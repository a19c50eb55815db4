#!/usr/bin/env bash
# CTest train_resume: a run stopped at step 4 with --save and resumed with --resume
# (on a different number of ranks, across an epoch boundary) must end with the same
# parameters and log the same per-step losses as an uninterrupted run; with --bn
# local (same rank count) also the same test accuracy, which needs every rank's
# own BN statistics back. A corrupt checkpoint must be refused.
# Usage: tests/test_train_resume.sh path/to/syncbn-train
set -euo pipefail
TRAIN=$1
. "$(dirname "$0")/test_train_common.sh"
need_data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

args=(--train-limit 600 --test-limit 300 --batch 100 --print-every 5)
run_train 2 "$tmp/full.txt" "${args[@]}" --steps 10 --log "$tmp/full.csv"
run_train 2 "$tmp/a.txt" "${args[@]}" --steps 4 --log "$tmp/part.csv" --save "$tmp/ck.bin"
[ -f "$tmp/ck.bin" ] || { echo "FAIL: no checkpoint written"; exit 1; }
ls "$tmp" | grep -q '\.tmp\.' && { echo "FAIL: temporary checkpoint left behind"; exit 1; }
run_train 3 "$tmp/b.txt" "${args[@]}" --steps 10 --log "$tmp/part.csv" --resume "$tmp/ck.bin"
full=$(hash_of "$tmp/full.txt" params)
resumed=$(hash_of "$tmp/b.txt" params)
echo "uninterrupted $full"
echo "resumed       $resumed"
[ -n "$full" ] && [ "$full" = "$resumed" ] || { echo "FAIL: hashes differ"; exit 1; }
cmp "$tmp/full.csv" "$tmp/part.csv" || { echo "FAIL: loss logs differ"; diff "$tmp/full.csv" "$tmp/part.csv"; exit 1; }
# local BN: every rank's own running statistics are restored (same rank count)
run_train 2 "$tmp/lfull.txt" "${args[@]}" --steps 10 --bn local
run_train 2 "$tmp/la.txt" "${args[@]}" --steps 4 --bn local --save "$tmp/lck.bin"
run_train 2 "$tmp/lb.txt" "${args[@]}" --steps 10 --bn local --resume "$tmp/lck.bin"
for f in lfull lb; do grep -E '^(params sha256|final test accuracy|epoch [0-9]+ test accuracy)' "$tmp/$f.txt" >"$tmp/$f.sum"; done
echo "local BN uninterrupted $(hash_of "$tmp/lfull.txt" params)"
echo "local BN resumed       $(hash_of "$tmp/lb.txt" params)"
cmp -s "$tmp/lfull.sum" "$tmp/lb.sum" || { echo "FAIL: local BN resume differs"; diff "$tmp/lfull.sum" "$tmp/lb.sum"; exit 1; }
# a corrupt checkpoint must be refused
printf 'X' | dd of="$tmp/ck.bin" bs=1 seek=1000 conv=notrunc status=none
if "$MPIEXEC" -np 1 --oversubscribe --allow-run-as-root "$TRAIN" --data "$DATA" "${args[@]}" --steps 10 \
     --resume "$tmp/ck.bin" >"$tmp/c.txt" 2>&1; then
  echo "FAIL: a corrupt checkpoint was accepted"; exit 1
fi
grep -q "CRC" "$tmp/c.txt" || { echo "FAIL: no CRC error message"; cat "$tmp/c.txt"; exit 1; }
echo "PASS: resume gives the uninterrupted hash"
