#!/usr/bin/env bash
# test_install.sh <build dir> [python3] - installs the build into a temporary prefix
# and uses it as an outside project would, each run at 2 ranks:
#   1. tests/install/ built with CMake: find_package(syncbn) -> syncbn::syncbn;
#   2. tests/install/consumer.c built with cc and `pkg-config --cflags --libs syncbn`;
#   3. the installed Python package, with SYNCBN_LIBRARY unset, finding the installed
#      library on the system's library path (LD_LIBRARY_PATH), against PyTorch.
# Env: SYNCBN_MPIEXEC (mpirun). Exit 77 (skip) when python3-torch is missing.
set -euo pipefail
build=$(cd "$1" && pwd)
python=${2:-}
src=$(cd "$(dirname "$0")/.." && pwd)
mpirun=(${SYNCBN_MPIEXEC:-mpirun} -np 2 --oversubscribe --allow-run-as-root)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

cmake --install "$build" --prefix "$prefix" >/dev/null
pc=$(find "$prefix" -name syncbn.pc)
libdir=$(dirname "$(dirname "$pc")")
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== find_package(syncbn)"
cmake -S "$src/tests/install" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$tmp/cmake" >/dev/null
"${mpirun[@]}" "$tmp/cmake/consumer"

echo "== pkg-config syncbn"
flags=$(PKG_CONFIG_PATH="$(dirname "$pc")" pkg-config --cflags --libs syncbn)
echo "pkg-config --cflags --libs syncbn: $flags"
# shellcheck disable=SC2086
cc -std=c11 -Wall -Werror "$src/tests/install/consumer.c" -o "$tmp/consumer_pc" $flags -lm
"${mpirun[@]}" "$tmp/consumer_pc"

echo "== installed Python package"
init=$(find "$prefix" -path '*/syncbn/__init__.py')
if [ -z "$python" ] || ! "$python" -c 'import torch, numpy, mpi4py' 2>/dev/null; then
  echo "SKIP: python3-torch, python3-numpy or python3-mpi4py missing"
  exit 77
fi
cd "$tmp"
env -u SYNCBN_LIBRARY PYTHONPATH="$(dirname "$(dirname "$init")")" PYTHONDONTWRITEBYTECODE=1 \
  "${mpirun[@]}" "$python" -c '
import sys, torch
import syncbn, syncbn.torch as st
from syncbn import _lib
from mpi4py import MPI
prefix, comm = sys.argv[1], MPI.COMM_WORLD
assert syncbn.__file__.startswith(prefix), syncbn.__file__
L = _lib.lib()
maps = [l.split()[-1] for l in open("/proc/self/maps") if "libsyncbn" in l]
X = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0))
r = comm.Get_rank()
y = st.SyncBatchNorm(3)(X[3 * r:3 * r + 3])
ref = torch.nn.BatchNorm1d(3).double()(X.double())[3 * r:3 * r + 3]
ok = L._name in _lib.SYSTEM_NAMES and all(m.startswith(prefix) for m in maps) and maps and \
     (y.double() - ref).abs().max().item() < 1e-5
print(f"rank {r}: loaded {L._name} from {maps[:1]}, ok={ok}")
sys.exit(0 if comm.allreduce(int(not ok)) == 0 else 1)
' "$prefix"
echo "OK"
