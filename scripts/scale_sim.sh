#!/usr/bin/env bash
# The simulated scaling study (docs/scale.md): the communication of a ResNet-50 training
# step for syncbn FAST and REPRODUCIBLE, PyTorch SyncBatchNorm's pattern and a bare
# allreduce floor, at P = 2, 4, ..., 1024 ranks on two simulated clusters (SimGrid SMPI,
# platforms in scripts/sim/*.xml), and a check that the simulation computes the real
# thing: REPRODUCIBLE's parameter hash at every simulated P equals that of the same
# driver built with mpicc under the real mpirun at P = 1-4.
#
#   scripts/scale_sim.sh                  the study: table and plot in build-sim/
#   scripts/scale_sim.sh --quick          the CTest version: P <= 64, hashes only
#   scripts/scale_sim.sh --modes fast,repro --p "64 1024" --platforms fattree
#                                         before/after comparisons of the wire format
# Options:
#   --p "P1 P2 ..."     rank counts (default 2 4 ... 1024)
#   --modes LIST        of fast,repro,torch,floor (default all four)
#   --platforms LIST    of fattree,ethernet (default both)
#   --layers-all-max N  also run all 53 layers (not only the 6 distinct C) at P <= N,
#                       checking their hash and the distinct-layer shortcut (default 64)
#   --res R --batch G   input resolution and global batch (default 8 and 1024)
#   --out DIR           build and result directory (default build-sim)
#   --real-driver EXE   the mpicc-built driver (default: built here)
#   --no-plot           skip the PNG
# Output: DIR/scale.tsv (one row per platform, P, mode), DIR/scale.md (the table),
# DIR/scale.png. Exit status 1 if a hash differs from the real run's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

plist="2 4 8 16 32 64 128 256 512 1024"
modes=fast,repro,torch,floor
platforms=fattree,ethernet
layers_all_max=64
res=8
batch=1024
out=build-sim
real=""
plot=1
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; plist="4 16 64"; modes=repro; platforms=ethernet; batch=64; plot=0; shift ;;
    --p) plist=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --platforms) platforms=$2; shift 2 ;;
    --layers-all-max) layers_all_max=$2; shift 2 ;;
    --res) res=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --real-driver) real=$2; shift 2 ;;
    --no-plot) plot=0; shift ;;
    *) sed -n '2,25p' "$0" >&2; exit 2 ;;
  esac
done

groups=(sim)
[ "$plot" = 1 ] && groups+=(plot)
"$root/scripts/install_deps.sh" "${groups[@]}"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMP_NUM_THREADS=1 # SMPI runs every rank in one process: no OpenMP threads under it
mkdir -p "$out/obj"
out=$(cd "$out" && pwd)

# ---- build: the library's sources and the driver, with smpicc (and mpicc) ----
# The library's own flags (CMakeLists.txt): IEEE semantics, no FMA contraction.
cflags=(-std=c11 -O2 -Wall -Wextra -Wno-psabi -ffp-contract=off -fno-fast-math -fno-unsafe-math-optimizations
        -fopenmp -I"$root/include" -I"$root/src")
libsrc=(errors comm sums apply layer checkpoint exactsum)
build() { # <compiler> <exe> <extra flags...>
  local cc=$1 exe=$2 obj="$out/obj/$1"
  shift 2
  mkdir -p "$obj"
  printf '%s\n' "${libsrc[@]}" | xargs -P2 -I{} "$cc" "${cflags[@]}" -c "$root/src/{}.c" -o "$obj/{}.o"
  "$cc" "${cflags[@]}" "$@" -c "$here/sim/scale_driver.c" -o "$obj/scale_driver.o"
  "$cc" -fopenmp "$obj"/*.o -o "$exe" -lz -lm
}
stale() { # <exe>: missing, or older than a source (a rerun after a library change rebuilds)
  [ ! -x "$1" ] || [ -n "$(find "$root/src" "$root/include" "$here/sim/scale_driver.c" -name '*.[ch]' -newer "$1" | head -1)" ]
}
if stale "$out/scale_driver_smpi"; then
  echo "== building the driver with smpicc =="
  rm -f "$out/scale_driver_smpi"
  build smpicc "$out/scale_driver_smpi" -DSCALE_SIM_NBC_BLOCKING 2>&1 | grep -v '^$' || true
  [ -x "$out/scale_driver_smpi" ] || { echo "scale_sim.sh: smpicc build failed" >&2; exit 1; }
fi
if [ -z "$real" ]; then
  real="$out/scale_driver_mpi"
  if stale "$real"; then
    echo "== building the driver with mpicc =="
    build mpicc "$real"
  fi
fi

# ---- the real reference: mpirun at P = 1..4 ----
common=(--res "$res" --batch "$batch")
declare -A ref
fail=0
layer_sets="distinct all"
[ "$quick" = 1 ] && layer_sets=all # the real workload only
for layers in $layer_sets; do
  for P in 1 2 3 4; do
    h=$(mpirun -np "$P" --oversubscribe "$real" --modes repro --layers "$layers" "${common[@]}" |
        sed -n 's/.*hash=\([0-9a-f]*\).*/\1/p')
    echo "real mpirun P=$P layers=$layers: REPRODUCIBLE hash $h"
    if [ -z "${ref[$layers]:-}" ]; then
      ref[$layers]=$h
    elif [ "$h" != "${ref[$layers]}" ]; then
      echo "FAIL: the real runs disagree (P=$P layers=$layers)" >&2
      fail=1
    fi
  done
done

# ---- the simulations ----
seq -f "node-%g" 0 4095 >"$out/hostfile"
# Every SimGrid parameter the numbers depend on (docs/scale.md says why):
simcfg=(
  --cfg=smpi/coll-selector:ompi          # collectives choose their algorithm as Open MPI's tuned module
  --cfg=smpi/simulate-computation:no     # compute takes no simulated time: a step's time is its communication
  --cfg=smpi/bw-factor:0:1               # the platform's bandwidth and latency as written, for every message
  --cfg=smpi/lat-factor:0:1              #   size (SMPI's defaults are corrections fitted to another cluster)
  --cfg=contexts/factory:raw             # simulation speed only
  --log=root.thres:warning
)
tsv="$out/scale.tsv"
[ -f "$tsv" ] || printf 'platform\tP\tlayers\tmode\tstep_s\thash\tsim_wall_s\n' >"$tsv"
simrun() { # <platform> <P> <layers> <modes>
  local plat=$1 P=$2 layers=$3 ms=$4 t0 t1 line
  local xml="$here/sim/${plat}.xml"
  t0=$(date +%s.%N)
  local log="$out/run-$plat-$P-$layers.log"
  smpirun -np "$P" -platform "$xml" -hostfile "$out/hostfile" "${simcfg[@]}" \
    "$out/scale_driver_smpi" --modes "$ms" --layers "$layers" "${common[@]}" >"$log" 2>&1 ||
    { echo "FAIL: smpirun $plat P=$P"; tail -5 "$log"; fail=1; return 0; }
  t1=$(date +%s.%N)
  while read -r line; do
    local m t h
    m=$(sed -n 's/.*mode=\([a-z]*\).*/\1/p' <<<"$line")
    t=$(sed -n 's/.*step_s=\([^ ]*\).*/\1/p' <<<"$line")
    h=$(sed -n 's/.*hash=\([0-9a-f]*\).*/\1/p' <<<"$line")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%.1f\n' "$plat" "$P" "$layers" "$m" "$t" "${h:--}" "$(echo "$t1 - $t0" | bc)" >>"$tsv"
    printf '  %-9s P=%-5s %-8s %-6s %.3e s/step %s\n' "$plat" "$P" "$layers" "$m" "$t" "${h:+hash $h}"
    if [ "$m" = repro ] && [ "$h" != "${ref[$layers]}" ]; then
      echo "FAIL: simulated REPRODUCIBLE hash $h at P=$P ($plat, $layers layers) != real ${ref[$layers]}"
      fail=1
    fi
  done < <(grep '^RESULT' "$log")
  printf '  (%s P=%s %s: %.0f s of real time)\n' "$plat" "$P" "$layers" "$(echo "$t1 - $t0" | bc)"
}
declare -A xmlname=([fattree]=fattree_100g [ethernet]=ethernet_25g)
start=$(date +%s)
for P in $plist; do # P outermost: an interrupted study still has every platform up to some P
  for plat in ${platforms//,/ }; do
    [ "$quick" = 1 ] || simrun "${xmlname[$plat]}" "$P" distinct "$modes"
    [ "$P" -gt "$layers_all_max" ] || simrun "${xmlname[$plat]}" "$P" all "$modes"
  done
done
echo "simulations: $(( $(date +%s) - start )) s of real time"

[ "$quick" = 1 ] || python3 "$here/sim/scale_report.py" "$tsv" "$out/scale.md" "$([ "$plot" = 1 ] && echo "$out/scale.png")"
if [ "$fail" != 0 ]; then
  echo "scale_sim.sh: FAILED (see above)" >&2
  exit 1
fi
echo "scale_sim.sh: every simulated REPRODUCIBLE hash equals the real mpirun's"
