#!/usr/bin/env bash
# bench_torch_e2e.sh [rounds] - end-to-end PyTorch DDP training steps (bench_torch_e2e.py):
# the DDP example's residual net and torchvision's ResNet-18 on small random images,
# at P = 1 and 2 ranks (gloo DDP), with torch.nn.BatchNorm2d (each rank its own
# statistics), syncbn's SyncBatchNorm on MPI.COMM_SELF (our kernels, no
# synchronization), syncbn's SyncBatchNorm, and SyncBatchNorm fused by fuse_activations,
# in float32 and under bfloat16 autocast. Prints one table of paired ratios: per job
# the medians over interleaved rounds, then the median over `rounds` jobs per P
# (default 2; the P = 1 and P = 2 jobs alternate).
# Env: SYNCBN_LIBRARY (else installs, builds build/src/libsyncbn.so), RANKS ("1 2"),
# ARGS (extra arguments for bench_torch_e2e.py, e.g. "--reps 11 --image 96"),
# OUT (out/bench_torch_e2e: raw job outputs).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-2}
if [ -z "${SYNCBN_LIBRARY:-}" ]; then
  scripts/install_deps.sh build python
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j2 --target syncbn >/dev/null
  export SYNCBN_LIBRARY=$PWD/build/src/libsyncbn.so
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src/python
out=${OUT:-out/bench_torch_e2e}
mkdir -p "$out"
: >"$out/results.txt"
for r in $(seq "$rounds"); do
  for P in ${RANKS:-1 2}; do
    ${SYNCBN_MPIEXEC:-mpirun} -np "$P" --oversubscribe /usr/bin/python3 scripts/bench/bench_torch_e2e.py ${ARGS:-} \
      | tee "$out/round${r}_P$P.txt" | grep '^RESULT\|^CPU' >>"$out/results.txt"
  done
done
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(getconf _NPROCESSORS_ONLN) cores," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg); $(head -1 "$out/round1_P1.txt" | sed 's/P=[0-9]*, //')"
# RESULT model type P plain_ms self/plain sync/plain fused/plain fused/sync sync/self
# -> medians over the rounds; then the same for CPU time
for what in RESULT CPU; do
[ $what = RESULT ] && echo "wall-clock step time (slowest rank):" || echo "CPU time per step (all ranks):"
grep "^$what " "$out/results.txt" | sort -k2,2 -k3,3r -k4,4n | awk '
  function med(s,   a, n, i, j, t) { n = split(s, a, " ");
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  { k = $2 " " $3 " " $4; if (!(k in ms)) keys[++nk] = k
    for (c = 5; c <= 10; c++) v[k, c] = v[k, c] " " $c; ms[k] = 1 }
  END { printf "| %-8s | %-4s | %s | %-13s | %-10s | %-10s | %-11s | %-10s | %-9s |\n", "model", "type", "P",
               "plain ms/step", "self/plain", "sync/plain", "fused/plain", "fused/sync", "sync/self"
        print "|---|---|---|---:|---:|---:|---:|---:|---:|"
        for (i = 1; i <= nk; i++) { split(keys[i], f, " ")
          printf "| %-8s | %-4s | %s | %13.1f | %10.3f | %10.3f | %11.3f | %10.3f | %9.3f |\n", f[1], f[2], f[3],
                 med(v[keys[i], 5]), med(v[keys[i], 6]), med(v[keys[i], 7]), med(v[keys[i], 8]),
                 med(v[keys[i], 9]), med(v[keys[i], 10]) } }'
done
