#!/usr/bin/env bash
# bench_compare.sh - syncbn vs oneDNN vs PyTorch batch normalization, side by side.
#
# Builds syncbn-bench (in build-bench/, if needed), compiles the oneDNN driver
# scripts/bench/bench_dnnl.cpp with g++ against Debian's libdnnl-dev, and runs syncbn
# (fast and reproducible, NCHW and NHWC), oneDNN (NCHW, NHWC) and PyTorch
# (contiguous = NCHW, channels_last = NHWC) on the same shapes, at the same
# OMP_NUM_THREADS (1 and 2 by default). Every program reports the median over
# --reps repetitions; the script repeats each program --runs times (default 5,
# interleaved: ours, oneDNN, PyTorch, ours, ...) and prints the median of those
# medians in ONE table, plus a check of the speed targets on PAIRED ratios: each
# ratio is taken within one run, and the median over runs is shown with its range,
# which is far less sensitive to this machine's slow swings in load than a ratio of
# two medians.
#
# Peers are optional: without libdnnl-dev or python3-torch their rows say SKIP.
# --install runs scripts/install_deps.sh peers first (needs apt and root/sudo).
#
# It also runs syncbn-bench under mpirun -np 2 (one thread per rank) on
# (32,64,56,56) for the SyncBN-vs-local-BN ratio (--no-np2 skips that), and checks
# fwd+bwd bandwidth against the copy loop for tensors larger than the LLC.
#
# Our buffers are allocated three ways in every run: plain malloc (what users pass;
# the "syncbn fast/repro" rows and every comparison with peers), 64-byte aligned,
# and 64-byte aligned + 1 float (a tensor slice); the alignment targets compare them.
#
# Fused activations and bfloat16: the malloc run of syncbn-bench also times
# every --act (none, relu, add-relu) x --dtype (f32, bf16) mode, oneDNN adds NHWC
# rows for fused BN+ReLU (fuse_norm_relu), BN + add+ReLU (binary add with a ReLU
# post-op; what our add-relu computes), fused BN+ReLU then an add (relu-add, another
# function), each in f32 and bf16, and PyTorch adds BN then
# ReLU and BN then add then ReLU, unfused, in both layouts and both dtypes. A second
# table lists them per mode, and the fused/bf16 targets are checked on paired ratios
# as above (4 standard shapes x 2 layouts x the thread counts).
#
# Usage: scripts/bench/bench_compare.sh [--install] [--threads "1 2"] [--runs K] [--reps R]
#                                 [--shape N,C,H,W]... [--build-dir DIR] [--no-np2]
#                                 [--quick] [--no-modes] [--interleave] [--from FILE]
#   --quick     3 runs x 9 reps, no aligned/offset runs, no P=2 run (about a third of
#               the time; for a first look, the full run for numbers to quote)
#   --no-modes  only plain float32 BN (the tables and targets of plain BN)
#   --interleave our modes take turns within every repetition (syncbn-bench
#               --interleave): steadier ratios on a busy machine for tensors above the
#               LLC; smaller ones then share the cache between modes
#   --from FILE print the tables of an earlier run's raw results (saved with
#               KEEP_RESULTS=FILE scripts/bench/bench_compare.sh ...) without running anything;
#               --threads and --shape select what is shown
# The full run took 16-22 minutes on this 2-CPU machine (shared, load 2-7), --quick
# about a third of that.
# The machine is shared and noisy: read the ratios, not the absolute numbers.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="$root/build-bench"
threads_list="1 2"
runs=5
reps=15
install=0
np2=1
modes=1
quick=0
interleave=0
from=""
shapes=()
while [ $# -gt 0 ]; do
  case "$1" in
    --install) install=1 ;;
    --threads) threads_list="$2"; shift ;;
    --runs) runs="$2"; runs_set=1; shift ;;
    --reps) reps="$2"; reps_set=1; shift ;;
    --shape) shapes+=("$2"); shift ;;
    --build-dir) build="$2"; shift ;;
    --no-np2) np2=0 ;;
    --quick) quick=1 ;;
    --no-modes) modes=0 ;;
    --interleave) interleave=1 ;;
    --from) from="$2"; shift ;;
    -h|--help) sed -n '2,51p' "$0"; exit 0 ;;
    *) echo "bench_compare.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
if [ "$quick" = 1 ]; then
  [ -n "${runs_set:-}" ] || runs=3
  [ -n "${reps_set:-}" ] || reps=9
  np2=0
fi
[ ${#shapes[@]} -gt 0 ] || shapes=(32,64,56,56 32,256,14,14 256,1024,1,1 8,32,224,224)
shape_args=()
for s in "${shapes[@]}"; do shape_args+=(--shape "$s"); done

if [ -n "$from" ]; then
  [ -r "$from" ] || { echo "bench_compare.sh: cannot read $from" >&2; exit 2; }
elif [ "$install" = 1 ]; then
  "$root/scripts/install_deps.sh" peers || echo "bench_compare.sh: install_deps.sh peers failed; peers may be skipped" >&2
fi

run_all() {
# --- build ---------------------------------------------------------------------
# BENCH=/path/to/syncbn-bench uses that binary as it is (e.g. another build) instead.
mkdir -p "$build"
if [ -n "${BENCH:-}" ]; then
  bench=$BENCH
else
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  cmake --build "$build" -j2 --target syncbn-bench >/dev/null
  bench="$build/examples/syncbn-bench"
  [ -x "$bench" ] || bench=$(find "$build" -name syncbn-bench -type f -perm -u+x | head -n1)
fi
[ -x "$bench" ] || { echo "bench_compare.sh: syncbn-bench was not built" >&2; exit 1; }

dnnl_bin=""
dnnl_why="libdnnl-dev not installed (scripts/bench/bench_compare.sh --install)"
if [ -f /usr/include/oneapi/dnnl/dnnl.hpp ] && command -v g++ >/dev/null; then
  dnnl_bin="$build/bench_dnnl"
  if [ ! -x "$dnnl_bin" ] || [ "$root/scripts/bench/bench_dnnl.cpp" -nt "$dnnl_bin" ]; then
    if ! g++ -O2 -std=c++17 -o "$dnnl_bin" "$root/scripts/bench/bench_dnnl.cpp" -ldnnl; then
      dnnl_bin=""; dnnl_why="bench_dnnl.cpp failed to compile"
    fi
  fi
fi
torch_py=/usr/bin/python3
torch_ok=0
torch_why="python3-torch not installed (scripts/bench/bench_compare.sh --install)"
if [ -x "$torch_py" ] && "$torch_py" -c 'import torch' 2>/dev/null; then torch_ok=1; fi

# Idle OpenMP workers sleep instead of spinning, for every implementation alike: on
# this shared (CPU-quota) VM spinning workers were descheduled/throttled and single
# calls then took whole 16 ms scheduler periods. Override by exporting it.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
mpirun_cmd=(mpirun -np 1 --bind-to none) # Open MPI would pin the one rank to one core
mpirun2_cmd=(mpirun -np 2 --oversubscribe)
[ "$(id -u)" -ne 0 ] || mpirun_cmd+=(--allow-run-as-root)
[ "$(id -u)" -ne 0 ] || mpirun2_cmd+=(--allow-run-as-root)
llc_kib=$(sed -n 's/K$//p' /sys/devices/system/cpu/cpu0/cache/index3/size 2>/dev/null || true)
[ -n "$llc_kib" ] || llc_kib=0

# --- runs ----------------------------------------------------------------------
results=$(mktemp)
trap '[ -z "${KEEP_RESULTS:-}" ] || cp "$results" "$KEEP_RESULTS"; rm -f "$results"' EXIT
start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for t in $threads_list; do
  for ((k = 1; k <= runs; k++)); do
    echo "bench_compare.sh: OMP_NUM_THREADS=$t run $k/$runs" >&2
    # Ours three ways: buffers from plain malloc (as users allocate; the rows named
    # syncbn-*), 64-byte aligned (syncbn-*-al) and aligned + 1 float (syncbn-*-off1).
    allocs="malloc al off1"
    [ "$quick" = 0 ] || allocs=malloc
    for alloc in $allocs; do
      case $alloc in malloc) aargs=() ;; al) aargs=(--aligned) ;; off1) aargs=(--aligned --offset 1) ;; esac
      # the fused/bf16 modes only in the malloc run: the alignment targets are about plain BN
      [ "$alloc" != malloc ] || [ "$modes" = 0 ] || aargs+=(--act all --dtype both)
      [ "$alloc" != malloc ] || [ "$interleave" = 0 ] || aargs+=(--interleave)
      suffix=""; [ "$alloc" = malloc ] || suffix="-$alloc"
      OMP_NUM_THREADS=$t "${mpirun_cmd[@]}" -x OMP_NUM_THREADS -x OMP_WAIT_POLICY "$bench" --machine \
        --reps "$reps" "${aargs[@]}" "${shape_args[@]}" |
        sed -n -e "s/^RESULT impl=\([a-z-]*\) /RESULT threads=$t run=$k impl=\1$suffix /p" \
          -e "/alloc=malloc/s/^REFERENCE /REFERENCE threads=$t /p" >>"$results"
    done
    if [ -n "$dnnl_bin" ]; then
      # plain f32 BN in both layouts; the fused/bf16 compositions in NHWC only (oneDNN's
      # NCHW BN is its slow generic kernel, ncsp_bnorm:any, and the targets use NHWC)
      dargs=(--layout both)
      [ "$modes" = 0 ] || dargs=(--layout nchw)
      OMP_NUM_THREADS=$t "$dnnl_bin" --reps "$reps" "${dargs[@]}" "${shape_args[@]}" |
        sed -n -e "s/^RESULT /RESULT threads=$t run=$k /p" -e "/^UNSUPPORTED/p" >>"$results"
      if [ "$modes" = 1 ]; then
        OMP_NUM_THREADS=$t "$dnnl_bin" --reps "$reps" --layout nhwc --act none,relu,add-relu,relu-add \
          --dtype f32,bf16 "${shape_args[@]}" |
          sed -n -e "s/^RESULT /RESULT threads=$t run=$k /p" -e "/^UNSUPPORTED/p" >>"$results"
      fi
    fi
    if [ "$torch_ok" = 1 ]; then
      targs=()
      [ "$modes" = 0 ] || targs=(--act none,relu,add-relu --dtype f32,bf16)
      OMP_NUM_THREADS=$t "$torch_py" "$root/scripts/bench/bench_torch.py" --reps "$reps" "${targs[@]}" "${shape_args[@]}" |
        sed -n -e "s/^RESULT /RESULT threads=$t run=$k /p" -e "/^UNSUPPORTED/p" >>"$results"
    fi
  done
done
# SyncBN at P = 2 (one thread per rank) against the same layer on MPI_COMM_SELF.
if [ "$np2" = 1 ]; then
  for ((k = 1; k <= runs; k++)); do
    echo "bench_compare.sh: mpirun -np 2, OMP_NUM_THREADS=1, run $k/$runs" >&2
    OMP_NUM_THREADS=1 "${mpirun2_cmd[@]}" -x OMP_NUM_THREADS -x OMP_WAIT_POLICY "$bench" --machine --reps "$reps" \
      --shape 32,64,56,56 | sed -n "s/^RESULT /RESULT threads=np2 /p" >>"$results"
  done
fi
elapsed=$(($(date +%s) - start))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
}

if [ -n "$from" ]; then
  # tables of saved results: what ran is read from the file
  results=$from
  runs=$(sed -n 's/^RESULT .*run=\([0-9]*\) .*/\1/p' "$from" | sort -n | tail -n1)
  reps="?"; elapsed="?"; load_start="?"; load_end="?"
  dnnl_bin=""; grep -q 'impl=onednn' "$from" && dnnl_bin=saved
  dnnl_why="no oneDNN rows in $from"
  torch_ok=0; grep -q 'impl=torch' "$from" && torch_ok=1
  torch_why="no PyTorch rows in $from"
  grep -q 'act=relu' "$from" || modes=0
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
  llc_kib=$(sed -n 's/K$//p' /sys/devices/system/cpu/cpu0/cache/index3/size 2>/dev/null || true)
  [ -n "$llc_kib" ] || llc_kib=0
else
  run_all
fi

# --- table ---------------------------------------------------------------------
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
echo
echo "Batch normalization, median over $runs runs of the median of $reps reps (${elapsed}s)."
echo "Machine: $cpu, $(getconf _NPROCESSORS_ONLN) CPUs; load average $load_start at start, $load_end at end"
echo "(a load above the CPU count means other work shared the cores: trust ratios, not times)."
echo "OMP_WAIT_POLICY=$OMP_WAIT_POLICY for all implementations."
echo "First table: plain BN, float32; ratio = peer / syncbn-fast in the same layout (>1: syncbn faster)."
[ -n "$dnnl_bin" ] || echo "oneDNN: SKIP ($dnnl_why)"
[ "$torch_ok" = 1 ] || echo "PyTorch: SKIP ($torch_why)"
if grep -q '^UNSUPPORTED' "$results"; then
  echo "Combinations a peer could not run (no rows for them):"
  grep '^UNSUPPORTED' "$results" | sort -u | sed 's/^/  /'
fi
awk -v threads="$threads_list" -v shapes="${shapes[*]}" -v have_dnnl="${dnnl_bin:+1}" \
    -v have_torch="$torch_ok" -v llc_kib="$llc_kib" -v modes="$modes" '
function median(key,   n, i, j, v, tmp) {
  n = cnt[key]; if (n == 0) return -1
  for (i = 1; i <= n; i++) v[i] = val[key, i]
  for (i = 2; i <= n; i++) { tmp = v[i]; for (j = i - 1; j >= 1 && v[j] > tmp; j--) v[j + 1] = v[j]; v[j + 1] = tmp }
  return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function put(key, x) { cnt[key]++; val[key, cnt[key]] = x }
/^REFERENCE/ {
  delete f
  for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  put(f["threads"] SUBSEP "copy", f["copy_gbs"] + 0); put(f["threads"] SUBSEP "read", f["read_gbs"] + 0)
}
/^RESULT/ {
  delete f
  for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  # the mode joins the implementation name: syncbn-fast, syncbn-fast+relu, onednn+add-relu+bf16, ...
  impl = f["impl"] (f["act"] != "" && f["act"] != "none" ? "+" f["act"] : "") (f["dtype"] == "bf16" ? "+bf16" : "")
  k = f["threads"] SUBSEP f["shape"] SUBSEP impl SUBSEP f["layout"]
  put(k SUBSEP "fwd", f["fwd_ms"] + 0); put(k SUBSEP "fb", f["fwdbwd_ms"] + 0)
  if (f["run"] != "") { byrun[k, f["run"]] = f["fwdbwd_ms"] + 0; if (f["run"] + 0 > maxrun) maxrun = f["run"] + 0 }
  if (f["local_fwdbwd_ms"] != "") put(k SUBSEP "ratio", (f["fwdbwd_ms"] + 0) / (f["local_fwdbwd_ms"] + 0))
}
function cell(t, s, impl, lay, what) { return median(t SUBSEP s SUBSEP impl SUBSEP lay SUBSEP what) }
# Paired ratio a/b of fwd+bwd: one ratio per run (both measured in that run, minutes
# apart at most), then their median; rlo/rhi get the smallest and largest.
function pratio(t, s, ia, la, ib, lb,   ka, kb, r, key) {
  ka = t SUBSEP s SUBSEP ia SUBSEP la; kb = t SUBSEP s SUBSEP ib SUBSEP lb
  key = "pr" SUBSEP ka SUBSEP kb; cnt[key] = 0; rlo = 1e300; rhi = -1
  for (r = 1; r <= maxrun; r++)
    if (((ka, r) in byrun) && ((kb, r) in byrun) && byrun[kb, r] > 0) {
      x = byrun[ka, r] / byrun[kb, r]; put(key, x)
      if (x < rlo) rlo = x; if (x > rhi) rhi = x
    }
  return median(key)
}
function span() { return rhi > rlo ? sprintf(" [%.2f-%.2f]", rlo, rhi) : "" }
function row(t, s, impl, lay, label, avail,   fw, fb, ours) {
  if (!avail) { printf "%3s  %-16s %-14s %-5s %10s %10s %8s\n", t, s, label, lay, "SKIP", "SKIP", "-"; return }
  fw = cell(t, s, impl, lay, "fwd"); fb = cell(t, s, impl, lay, "fb")
  ours = cell(t, s, "syncbn-fast", lay, "fb")
  if (fb < 0) { printf "%3s  %-16s %-14s %-5s %10s %10s %8s\n", t, s, label, lay, "n/a", "n/a", "-"; return }
  printf "%3s  %-16s %-14s %-5s %10.3f %10.3f %8s\n", t, s, label, lay, fw, fb,
         (ours > 0 ? sprintf("%.2f", fb / ours) : "-") # parenthesized: a bare ">" would redirect
}
END {
  nt = split(threads, T, " "); ns = split(shapes, S, " ")
  printf "\n%3s  %-16s %-14s %-5s %10s %10s %8s\n", "thr", "shape", "impl", "lay", "fwd ms", "fwd+bwd ms", "ratio"
  for (a = 1; a <= nt; a++) for (b = 1; b <= ns; b++) {
    for (l = 1; l <= 2; l++) { lay = l == 1 ? "nchw" : "nhwc"
      row(T[a], S[b], "syncbn-fast", lay, "syncbn fast", 1)
      row(T[a], S[b], "syncbn-repro", lay, "syncbn repro", 1)
      row(T[a], S[b], "syncbn-fast-al", lay, "fast 64B-al", 1)
      row(T[a], S[b], "syncbn-fast-off1", lay, "fast al+1flt", 1)
      row(T[a], S[b], "syncbn-repro-al", lay, "repro 64B-al", 1)
      row(T[a], S[b], "syncbn-repro-off1", lay, "repro al+1flt", 1)
      row(T[a], S[b], "onednn", lay, "oneDNN 2.6", have_dnnl)
      row(T[a], S[b], "torch", lay, "PyTorch", have_torch)
    }
    print ""
  }
  for (a = 1; a <= nt; a++)
    printf "Reference loops at %s thread(s), 128 MiB buffers: copy %.1f GB/s (8 B/elem), read %.1f GB/s\n",
           T[a], median(T[a] SUBSEP "copy"), median(T[a] SUBSEP "read")
  print ""
  print "Speed targets: median over runs of the ratio measured within each run [min-max]:"
  for (a = 1; a <= nt; a++) for (b = 1; b <= ns; b++) {
    t = T[a]; s = S[b]
    for (l = 1; l <= 2; l++) { lay = l == 1 ? "nchw" : "nhwc"
      line = sprintf("  %s thr %-15s %s:", t, s, lay)
      x = pratio(t, s, "syncbn-fast", lay, "onednn", "nhwc")
      if (x > 0) line = line sprintf(" ours/oneDNN-nhwc %.2f%s%s;", x, span(), x <= 1 ? " ok" : " MISS")
      x = pratio(t, s, "torch", lay, "syncbn-fast", lay)
      if (x > 0) line = line sprintf(" torch/ours %.1fx%s%s;", x, span(), x >= 3 ? " ok" : " MISS")
      x = pratio(t, s, "syncbn-repro", lay, "syncbn-fast", lay)
      if (x > 0) line = line sprintf(" repro/fast %.2f%s%s", x, span(), x <= 1.2 ? " ok" : " MISS")
      print line
    }
  }
  print ""
  print "Alignment targets (any alignment): al+1flt / 64B-aligned <= 1.10; malloc (ours) / oneDNN NHWC <= 1.00:"
  for (a = 1; a <= nt; a++) for (b = 1; b <= ns; b++) {
    t = T[a]; s = S[b]
    for (l = 1; l <= 2; l++) { lay = l == 1 ? "nchw" : "nhwc"
      line = sprintf("  %s thr %-15s %s:", t, s, lay)
      for (m = 1; m <= 2; m++) { impl = m == 1 ? "syncbn-fast" : "syncbn-repro"
        x = pratio(t, s, impl "-off1", lay, impl "-al", lay)
        if (x > 0) line = line sprintf(" %s off1/al %.2f%s%s;", m == 1 ? "fast" : "repro", x, span(), x <= 1.1 ? " ok" : " MISS")
        x = pratio(t, s, impl, lay, "onednn", "nhwc")
        if (x > 0) line = line sprintf(" %s malloc/oneDNN-nhwc %.2f%s%s;", m == 1 ? "fast" : "repro", x, span(), x <= 1 ? " ok" : " MISS")
      }
      print line
    }
  }
  for (a = 1; a <= nt; a++) for (b = 1; b <= ns; b++) {
    split(S[b], d, ","); el = d[1] * d[2] * d[3] * d[4]
    if (llc_kib <= 0 || el * 4 <= llc_kib * 1024) continue
    cp = median(T[a] SUBSEP "copy"); if (cp <= 0) continue
    line = sprintf("  %s thr %-16s larger than LLC (%d MiB): fwd+bwd GB/s / copy GB/s:", T[a], S[b], llc_kib / 1024)
    for (l = 1; l <= 2; l++) { lay = l == 1 ? "nchw" : "nhwc"
      o = cell(T[a], S[b], "syncbn-fast", lay, "fb")
      if (o > 0) { bw = 32 * el / (o * 1e-3) * 1e-9; line = line sprintf(" %s %.0f%%%s", lay, 100 * bw / cp, bw >= 0.8 * cp ? " ok" : " MISS") }
    }
    print line
  }
  for (l = 1; l <= 2; l++) for (m = 1; m <= 2; m++) {
    lay = l == 1 ? "nchw" : "nhwc"; impl = m == 1 ? "syncbn-fast" : "syncbn-repro"  # np2: plain f32
    r = cell("np2", "32,64,56,56", impl, lay, "ratio")
    if (r > 0) printf "  P=2 (1 thr/rank) 32,64,56,56 %s %-12s SyncBN/local fwd+bwd %.3f%s\n", lay, impl, r, r <= 1.05 ? " ok" : " MISS"
  }
  if (modes == 1) fused_targets()
}
function sfx(m) { return m == "none" ? "" : "+" m }
# One fused/bf16 check: appends to `line` and counts ok/MISS under target name tg.
function check(tg, label, x, limit, info) {
  if (x <= 0) return
  if (info) { line = line sprintf(" %s %.2f%s (info);", label, x, span()); return }
  line = line sprintf(" %s %.2f%s%s;", label, x, span(), x <= limit ? " ok" : " MISS")
  tot[tg]++; if (x <= limit) okc[tg]++; else { missl[tg] = missl[tg] sprintf("\n      %s %s %s %s %.2f%s", t, s, lay, label, x, span()) }
}
function fmt(x) { return x > 0 ? sprintf("%.3f", x) : "-" }
function fmtr(x) { return x > 0 ? sprintf("%.2f", x) : "-" }
function fused_targets(   nm, M, a, b, l, q, m, fb, fr, fd, fda, ft, xp, rf, od, tr, sp, S2, big) {
  nm = split("none relu add-relu bf16 relu+bf16 add-relu+bf16", M, " ")
  print ""
  print "Fused activations and bfloat16, fwd+bwd ms (median over runs). Ratios are PAIRED (within"
  print "each run, then the median over runs): x-plain = this mode / our plain f32 fast BN, same layout;"
  print "repro/fast in this mode; ours/oneDNN against oneDNN NHWC in this mode (relu: fuse_norm_relu; add-relu:"
  print "BN, binary add + ReLU post-op, ReLU backward; bf16: its bf16 BN); relu-add = oneDNN fused BN+ReLU, then"
  print "a binary add (relu(BN(x)) + z: not our function, shown for its cost); torch/ours = PyTorch unfused, same layout."
  printf "\n%3s  %-15s %-4s %-13s %8s %7s %8s %6s %8s %8s %8s %8s %8s\n", "thr", "shape", "lay", "mode", "fast", "x-plain", \
         "repro", "r/f", "oneDNN", "ours/dnn", "dnn r-a", "PyTorch", "torch/us"
  for (a = 1; a <= nt; a++) for (b = 1; b <= ns; b++) {
    for (l = 1; l <= 2; l++) { lay = l == 1 ? "nchw" : "nhwc"
      for (q = 1; q <= nm; q++) { m = M[q]
        fb = cell(T[a], S[b], "syncbn-fast" sfx(m), lay, "fb"); fr = cell(T[a], S[b], "syncbn-repro" sfx(m), lay, "fb")
        fd = cell(T[a], S[b], "onednn" sfx(m), "nhwc", "fb"); ft = cell(T[a], S[b], "torch" sfx(m), lay, "fb")
        fda = -1; if (m == "add-relu" || m == "add-relu+bf16") fda = cell(T[a], S[b], "onednn" sfx(m == "add-relu" ? "relu-add" : "relu-add+bf16"), "nhwc", "fb")
        xp = q == 1 ? 1 : pratio(T[a], S[b], "syncbn-fast" sfx(m), lay, "syncbn-fast", lay)
        rf = pratio(T[a], S[b], "syncbn-repro" sfx(m), lay, "syncbn-fast" sfx(m), lay)
        od = pratio(T[a], S[b], "syncbn-fast" sfx(m), lay, "onednn" sfx(m), "nhwc")
        tr = pratio(T[a], S[b], "torch" sfx(m), lay, "syncbn-fast" sfx(m), lay)
        printf "%3s  %-15s %-4s %-13s %8s %7s %8s %6s %8s %8s %8s %8s %8s\n", T[a], S[b], lay, m, fmt(fb), fmtr(xp), fmt(fr), \
               fmtr(rf), fmt(fd), fmtr(od), fmt(fda), fmt(ft), fmtr(tr)
      }
    }
    print ""
  }
  print "Fused/bf16 targets: median over runs of the ratio measured within each run [min-max]:"
  for (a = 1; a <= nt; a++) for (b = 1; b <= ns; b++) {
    t = T[a]; s = S[b]; split(s, S2, ","); sp = S2[3] * S2[4]
    big = s == "32,64,56,56" || s == "8,32,224,224"
    for (l = 1; l <= 2; l++) { lay = l == 1 ? "nchw" : "nhwc"
      line = sprintf("  %s thr %-15s %s:", t, s, lay)
      check("relu/plain <= 1.05", "relu/plain", pratio(t, s, "syncbn-fast+relu", lay, "syncbn-fast", lay), 1.05, 0)
      check("relu/oneDNN-fused-nhwc <= 1.0", "relu/oneDNN-relu", pratio(t, s, "syncbn-fast+relu", lay, "onednn+relu", "nhwc"), 1.0, 0)
      check("add-relu/plain <= 1.30", "add-relu/plain", pratio(t, s, "syncbn-fast+add-relu", lay, "syncbn-fast", lay), 1.30, 0)
      check("bf16/f32 <= 0.6 (56x56, 224x224)", "bf16/f32", pratio(t, s, "syncbn-fast+bf16", lay, "syncbn-fast", lay), 0.6, !big)
      check("bf16/oneDNN-bf16-nhwc <= 1.0", "bf16/oneDNN-bf16", pratio(t, s, "syncbn-fast+bf16", lay, "onednn+bf16", "nhwc"), 1.0, 0)
      print line
      line = sprintf("  %s thr %-15s %s: repro/fast", t, s, lay)
      for (q = 1; q <= nm; q++) { m = M[q]
        check("repro/fast <= 1.2 where S >= 49", m, pratio(t, s, "syncbn-repro" sfx(m), lay, "syncbn-fast" sfx(m), lay), 1.2, sp < 49)
      }
      print line
    }
  }
  print ""
  print "Fused/bf16 targets, cells met (the misses listed):"
  ntg = split("relu/plain <= 1.05|relu/oneDNN-fused-nhwc <= 1.0|add-relu/plain <= 1.30|bf16/f32 <= 0.6 (56x56, 224x224)|bf16/oneDNN-bf16-nhwc <= 1.0|repro/fast <= 1.2 where S >= 49", TG, "|")
  for (q = 1; q <= ntg; q++)
    printf "  %-36s %d/%d%s\n", TG[q], okc[TG[q]] + 0, tot[TG[q]] + 0, missl[TG[q]]
}' "$results"
