#!/usr/bin/env bash
# torch_ddp_curves.sh [steps] - runs examples/train_torch_ddp.py (PyTorch DDP over
# gloo, CPU) at P = 1, 2 and 4 ranks with the same global batch of 32, once with
# syncbn's SyncBatchNorm and once with plain BatchNorm2d (per-rank batches of 32/P),
# and compares every step's loss with the P = 1 run of the same kind.
# Expected: SyncBatchNorm agrees to rounding (max relative difference below 1e-5);
# plain BN does not (differences of percents). Exit 1 otherwise.
# Writes out/torch_ddp/{sync,plain}_P<P>.txt and, with gnuplot, out/torch_ddp/curves.png.
# CTest runs a short version (test torch_ddp_curves): SYNCBN_LIBRARY set means "use
# that library, do not install or build"; RANKS and OUT override the rank counts and
# the output directory. Exit 77 (skip) without the Fashion-MNIST files.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-100}
if [ -z "${SYNCBN_LIBRARY:-}" ]; then
  scripts/install_deps.sh build data python
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j2 --target syncbn >/dev/null
  export SYNCBN_LIBRARY=$PWD/build/src/libsyncbn.so
fi
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || { echo "SKIP: no Fashion-MNIST"; exit 77; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src/python
ranks=${RANKS:-1 2 4}
out=${OUT:-out/torch_ddp}
mkdir -p "$out"

for bn in sync plain; do
  for P in $ranks; do
    ${SYNCBN_MPIEXEC:-mpirun} -np "$P" --oversubscribe /usr/bin/python3 examples/train_torch_ddp.py --steps "$steps" --bn "$bn" \
      >"$out/${bn}_P$P.txt"
  done
done

# max over steps of |loss_P - loss_1| / loss_1, and the final test accuracies
status=0
printf '%-6s %-3s %-28s %s\n' bn P "max rel. loss diff vs P=1" "test accuracy"
for bn in sync plain; do
  for P in $ranks; do
    diff=$(awk '/^step/ { k = $2; l = $4 } FNR == NR && /^step/ { ref[k] = l; next }
                /^step/ { d = (l - ref[k]) / ref[k]; if (d < 0) d = -d; if (d > m) m = d }
                END { printf "%.2e", m }' "$out/${bn}_P1.txt" "$out/${bn}_P$P.txt")
    acc=$(awk '/test accuracy/ { print $3 }' "$out/${bn}_P$P.txt")
    printf '%-6s %-3s %-28s %s\n' "$bn" "$P" "$diff" "$acc"
    if [ "$P" != 1 ]; then
      if [ "$bn" = sync ] && awk -v d="$diff" 'BEGIN { exit !(d > 1e-5) }'; then status=1; fi
      if [ "$bn" = plain ] && awk -v d="$diff" 'BEGIN { exit !(d < 1e-3) }'; then status=1; fi
    fi
  done
done

if [ "$ranks" = "1 2 4" ] && command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 900,800 noenhanced
set output "$out/curves.png"
set multiplot layout 2,1 title "PyTorch DDP on Fashion-MNIST, global batch 32: syncbn SyncBatchNorm vs plain BatchNorm2d"
set xlabel "step"; set ylabel "training loss"
plot for [f in "sync_P1 sync_P2 sync_P4 plain_P2 plain_P4"] "$out/".f.".txt" using 2:4 with lines title f
set logscale y; set format y "1e%L"; set ylabel "|loss - loss(P=1)| / loss(P=1)"
plot for [f in "sync_P2 sync_P4"] "< paste $out/sync_P1.txt $out/".f.".txt" using 2:(abs(\$8-\$4)/\$4) \\
       with lines title f, \\
     for [f in "plain_P2 plain_P4"] "< paste $out/plain_P1.txt $out/".f.".txt" using 2:(abs(\$8-\$4)/\$4) \\
       with lines title f
unset multiplot
GP
  echo "plot: $out/curves.png"
fi
[ $status = 0 ] && echo "OK: SyncBatchNorm curves agree to rounding at P = 1, 2, 4; plain BN's do not" ||
  echo "FAILED: see the table above"
exit $status
