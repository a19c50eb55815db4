# Sourced by tests/test_train_*.sh and scripts/check/check_invariance.sh: runs syncbn-train
# under mpirun and extracts its hashes. Needs TRAIN (the program's path).
MPIEXEC=${SYNCBN_MPIEXEC:-mpirun}
DATA=${SYNCBN_DATA:-/usr/share/datasets/fashion-mnist}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# 3-4 ranks on 2 cores: waiting ranks must yield the CPU instead of spinning
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}

need_data() {
  if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
    echo "SKIP: Fashion-MNIST not found in $DATA (Debian package dataset-fashion-mnist)"
    exit 77
  fi
}

# run_train NP OUTFILE ARGS...: runs the program on NP ranks, output to OUTFILE; fails loudly.
run_train() {
  local np=$1 out=$2
  shift 2
  if ! "$MPIEXEC" -np "$np" --oversubscribe --allow-run-as-root "$TRAIN" --data "$DATA" "$@" >"$out" 2>&1; then
    echo "FAIL: syncbn-train -np $np $* exited with an error:"
    tail -20 "$out"
    exit 1
  fi
}

# hash_of FILE KIND: KIND is params or losses
hash_of() { sed -n "s/^$2 sha256 \([0-9a-f]*\).*$/\1/p" "$1"; }
