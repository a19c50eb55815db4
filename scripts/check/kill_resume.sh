#!/usr/bin/env bash
# Kill and resume: a rank killed with SIGKILL mid-training ends the WHOLE job in
# bounded time (no hang), and the run resumed from its last checkpoint reaches the
# same final parameter hash as an uninterrupted run.
#   scripts/check/kill_resume.sh [--quick] [path/to/syncbn-train]
# --quick: fewer steps and images, kill right after the first checkpoint (the CTest
# version); otherwise after the third. NP=3 for three ranks. Exit 0 = pass, 77 = skipped
# (no data set), anything else = failure.
#
# Elastic resume: NP_RESUME=Q resumes on Q ranks instead of NP, as a job does that
# lost a node and goes on with what is left (or gets more). In reproducible mode (the
# training example's default) the result does not depend on the number of ranks, so
# the resumed run must still end with the uninterrupted NP-rank run's hash:
#   NP=4 NP_RESUME=3 scripts/check/kill_resume.sh --quick
#
# How the job ends: mpirun (Open MPI's ORTE) notices that a local rank died from a
# signal and kills the remaining ranks; the survivors would otherwise sit in their
# next MPI_Allreduce forever. `timeout` guards this script against the opposite.
set -uo pipefail
cd "$(dirname "$0")/../.."
quick=0
[ "${1:-}" = "--quick" ] && { quick=1; shift; }
train=${1:-build/examples/syncbn-train}
data=${SYNCBN_DATA:-/usr/share/datasets/fashion-mnist}
[ -x "$train" ] || { echo "kill_resume: no $train (build the examples first)" >&2; exit 1; }
[ -d "$data" ] || { echo "SKIP: kill_resume: no Fashion-MNIST data in $data"; exit 77; }

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1
np=${NP:-2}
np_resume=${NP_RESUME:-$np}
if [ $quick = 1 ]; then steps=36 every=6 limit=1536; else steps=120 every=10 limit=8192; fi
bound=${KILL_BOUND:-30} # seconds the job may take to end after the kill
work=$(mktemp -d /tmp/syncbn_kill.XXXXXX)
trap 'rm -rf "$work"' EXIT
common=(--data "$data" --steps "$steps" --train-limit "$limit" --no-eval --print-every 1 --seed 7)
run() { # <ranks> <log> <args...>: one mpirun, under a timeout guard
  local ranks=$1 log=$2
  shift 2
  echo "+ mpirun -np $ranks --oversubscribe $train ${common[*]} $*"
  timeout -k 10 600 mpirun -np "$ranks" --oversubscribe "$train" "${common[@]}" "$@" >"$log" 2>&1
}
hash_of() { grep -o 'params sha256 [0-9a-f]*' "$1" | awk '{print $3}'; }

echo "== 1. uninterrupted run ($np ranks, $steps steps)"
run "$np" "$work/ref.log" || { cat "$work/ref.log"; echo "FAIL: reference run failed"; exit 1; }
ref=$(hash_of "$work/ref.log")
echo "reference hash $ref"

echo "== 2. the same run with checkpoints every $every steps; SIGKILL one rank mid-run"
echo "+ mpirun -np $np --oversubscribe $train ${common[*]} --save $work/ck --save-every $every"
timeout -k 10 600 mpirun -np "$np" --oversubscribe "$train" "${common[@]}" --save "$work/ck" --save-every "$every" \
  >"$work/killed.log" 2>&1 &
launcher=$! # the timeout process; mpirun is its child, the ranks are mpirun's children
for _ in $(seq 600); do
  [ -s "$work/ck" ] && break
  kill -0 "$launcher" 2>/dev/null || break
  sleep 0.1
done
# Full version: let a few more checkpoints pass, so the kill lands well inside the run.
if [ $quick = 0 ] && [ -s "$work/ck" ]; then
  for _ in 1 2; do
    m0=$(stat -c %Y.%s "$work/ck" 2>/dev/null)
    for _ in $(seq 600); do
      [ "$(stat -c %Y.%s "$work/ck" 2>/dev/null)" != "$m0" ] && break
      kill -0 "$launcher" 2>/dev/null || break
      sleep 0.1
    done
  done
  sleep 0.5
fi
mpirun_pid=$(pgrep -P "$launcher" -x mpirun || true)
victim=
if [ -n "$mpirun_pid" ]; then
  # only a process we started: a child of our mpirun running the training binary
  for p in $(pgrep -P "$mpirun_pid"); do
    [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$(basename "$train" | cut -c1-15)" ] && victim=$p
  done
fi
if [ ! -s "$work/ck" ] || [ -z "$victim" ]; then
  wait "$launcher"
  cat "$work/killed.log"
  echo "FAIL: no checkpoint appeared, or the run ended before the kill"
  exit 1
fi
killed_at=$(grep -c 'step' "$work/killed.log")
t0=$(date +%s.%N)
echo "SIGKILL rank process $victim (mpirun $mpirun_pid), about $killed_at progress lines in"
kill -KILL "$victim"
# Bounded end: poll for the launcher rather than wait forever.
ended=0
for _ in $(seq $((bound * 10))); do
  if ! kill -0 "$launcher" 2>/dev/null; then ended=1; break; fi
  sleep 0.1
done
if [ $ended = 0 ]; then
  echo "FAIL: job still running ${bound}s after the kill (hang); killing mpirun $mpirun_pid"
  kill -TERM "$mpirun_pid" 2>/dev/null
  wait "$launcher"
  exit 1
fi
wait "$launcher"
status=$?
t1=$(date +%s.%N)
echo "job ended $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s after the kill, mpirun exit status $status"
grep -m1 -i 'signal\|killed\|exited on' "$work/killed.log" || true
if [ "$status" = 0 ]; then
  echo "FAIL: the job reported success although a rank was killed"
  exit 1
fi
if pgrep -P "$mpirun_pid" >/dev/null 2>&1; then
  echo "FAIL: rank processes left behind"
  exit 1
fi

echo "== 3. resume from the last checkpoint to step $steps on $np_resume rank(s)"
run "$np_resume" "$work/resumed.log" --resume "$work/ck" --save "$work/ck" --save-every "$every" ||
  { cat "$work/resumed.log"; echo "FAIL: resumed run failed"; exit 1; }
grep -m1 -i 'resum' "$work/resumed.log" || true
got=$(hash_of "$work/resumed.log")
echo "resumed hash   $got"
if [ -z "$ref" ] || [ "$got" != "$ref" ]; then
  echo "FAIL: resumed run ($np_resume ranks) does not reach the uninterrupted $np-rank run's parameters"
  exit 1
fi
echo "PASS: killed $np-rank job ended in bounded time; resume on $np_resume rank(s) reached the same params sha256"
