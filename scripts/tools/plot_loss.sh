#!/usr/bin/env bash
# plot_loss.sh - PNG of syncbn-train loss curves (gnuplot), from --log CSV files.
# Top panel: per-step training loss of every run. Bottom panel: each run's loss
# minus the FIRST run's, step by step: runs that are bitwise identical to it lie
# exactly on zero.
#
# Usage: scripts/tools/plot_loss.sh [--title TEXT] OUT.png LABEL=FILE.csv [LABEL=FILE.csv ...]
#   e.g. scripts/tools/plot_loss.sh out/loss.png "sync P=1=out/s1.csv" "local P=4=out/l4.csv"
#   (the label is everything before the LAST '='; --title adds a line under the title)
set -euo pipefail
subtitle=""
[ "${1:-}" = --title ] && { subtitle=$2; shift 2; }
[ $# -ge 2 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
command -v gnuplot >/dev/null || { echo "plot_loss.sh: gnuplot not found (scripts/install_deps.sh plot)" >&2; exit 2; }
out=$1
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

labels=() files=()
for arg in "$@"; do
  labels+=("${arg%=*}")
  files+=("${arg##*=}")
  [ -f "${arg##*=}" ] || { echo "plot_loss.sh: ${arg##*=} not found" >&2; exit 2; }
done
# step,loss,loss-minus-reference for every run (CSV header: step,epoch,loss)
for i in "${!files[@]}"; do
  paste -d, <(tail -n +2 "${files[$i]}") <(tail -n +2 "${files[0]}") |
    awk -F, '{ printf "%s %.17g %.17g\n", $1, $3, $3 - $6 }' >"$tmp/run$i.dat"
done

plot_top="" plot_bot=""
for i in "${!files[@]}"; do
  sep=$([ $i -eq 0 ] && echo "" || echo ", ")
  lw=$([ $i -eq 0 ] && echo 4 || echo 1.5)
  plot_top+="$sep'$tmp/run$i.dat' using 1:2 with lines lw $lw title '${labels[$i]}'"
  plot_bot+="$sep'$tmp/run$i.dat' using 1:3 with lines lw $lw title '${labels[$i]}'"
done
term="pngcairo size 1000,800 font ',11'"
gnuplot -e "set terminal pngcairo" >/dev/null 2>&1 || term="png size 1000,800"
gnuplot <<GP
set terminal $term
set output '$out'
set multiplot layout 2,1 title "syncbn-train on Fashion-MNIST: training loss per step${subtitle:+\\n$subtitle}"
set grid
set key top right
set ylabel 'loss (global batch mean)'
set logscale y
plot $plot_top
unset logscale y
set xlabel 'step'
set ylabel 'loss minus ${labels[0]}'
plot $plot_bot
unset multiplot
GP
echo "$out"
