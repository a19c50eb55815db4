#!/usr/bin/env bash
# Installs the Debian packages syncbn needs, only those that are missing.
# Usage: scripts/install_deps.sh [build] [data] [fuzz] [tsan] [plot] [sim] [peers] [net] [python]
#   build  compiler, CMake, Open MPI, OpenBLAS, Check, zlib (always included)
#   data   Fashion-MNIST (dataset-fashion-mnist) for the training example
#   fuzz   clang + libFuzzer runtime for scripts/check/fuzz.sh
#   tsan   clang + LLVM's OpenMP (libomp, with the Archer tool) for the ThreadSanitizer build
#   plot   gnuplot for the loss-curve and scaling PNGs
#   sim    SimGrid (smpicc, smpirun) for the simulated scaling study, scripts/scale_sim.sh
#   peers  PyTorch, NumPy and oneDNN: optional comparison peers for benchmarks
#   net    iproute2 for the two-host (network namespace) run
#   python PyTorch, torchvision, NumPy, mpi4py and pytest for the Python package (src/python/syncbn)
set -euo pipefail

pkgs=(gcc g++ make cmake pkg-config libopenmpi-dev openmpi-bin libopenblas-dev check zlib1g-dev)
for group in "$@"; do
  case "$group" in
    build) ;;
    data) pkgs+=(dataset-fashion-mnist) ;;
    fuzz) pkgs+=(clang libclang-rt-14-dev) ;;
    tsan) pkgs+=(clang libclang-rt-14-dev libomp-14-dev) ;;
    plot) pkgs+=(gnuplot-nox) ;;
    sim) pkgs+=(libsimgrid-dev) ;;
    peers) pkgs+=(python3-torch python3-numpy libdnnl-dev) ;;
    net) pkgs+=(iproute2) ;;
    python) pkgs+=(python3-torch python3-torchvision python3-numpy python3-mpi4py python3-pytest) ;;
    *) echo "install_deps.sh: unknown group '$group'" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install_deps.sh: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
