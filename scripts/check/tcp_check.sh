#!/usr/bin/env bash
# The training example over Open MPI's TCP transport only (--mca btl self,tcp)
# must reach the same final parameter hash as over shared memory (the default).
#   scripts/check/tcp_check.sh [path/to/syncbn-train]      (NP=2 STEPS=40 by default)
# Exit 0 = equal hashes, 77 = skipped (no data set), else failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
train=${1:-build/examples/syncbn-train}
data=${SYNCBN_DATA:-/usr/share/datasets/fashion-mnist}
[ -x "$train" ] || { echo "tcp_check: no $train (build the examples first)" >&2; exit 1; }
[ -d "$data" ] || { echo "SKIP: tcp_check: no Fashion-MNIST data in $data"; exit 77; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1
np=${NP:-2}
args=(--data "$data" --steps "${STEPS:-40}" --train-limit 4096 --no-eval --print-every 1000 --seed 11)
work=$(mktemp -d /tmp/syncbn_tcp.XXXXXX)
trap 'rm -rf "$work"' EXIT

run() { # <name> <mpirun options...>
  local name=$1
  shift
  local cmd=(timeout -k 10 600 mpirun -np "$np" --oversubscribe "$@" "$train" "${args[@]}")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" >"$work/$name.log" 2>&1 || { cat "$work/$name.log"; echo "FAIL: $name run failed"; exit 1; }
  grep -o 'params sha256 [0-9a-f]*' "$work/$name.log" | awk '{print $3}'
}
shm=$(run shm --mca btl self,vader | tail -1)
tcp=$(run tcp --mca btl self,tcp --mca btl_tcp_if_include lo | tail -1)
echo "shared memory: $shm"
echo "tcp          : $tcp"
if [ -z "$shm" ] || [ "$shm" != "$tcp" ]; then
  echo "FAIL: hashes differ"
  exit 1
fi
echo "PASS: same params sha256 over TCP and shared memory"
