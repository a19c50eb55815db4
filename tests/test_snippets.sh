#!/usr/bin/env bash
# test_snippets.sh <libsyncbn.so> [python3] - the documentation's complete programs,
# built and run as a reader would, so that a README that drifts from the code fails.
#
# A program is a fenced code block right after a marker line in README.md or
# docs/*.md:
#   <!-- snippet: NAME.c -->    built with mpicc against include/ and the library
#                               given (the build tree's), run under mpirun -np 2
#   <!-- snippet: NAME.py -->   run under mpirun -np 2 with the given python3 and
#                               PYTHONPATH=src/python, SYNCBN_LIBRARY = the library
# Each program checks its own result against an independent reference and exits
# non-zero when it is wrong; this script fails when one does not build, does not run,
# exits non-zero, or prints nothing. Python programs are skipped (with a SKIP line)
# when python3 lacks torch or mpi4py.
# Env: SYNCBN_MPIEXEC (default mpirun), MPICC (default mpicc).
set -euo pipefail
lib=$(realpath "$1")
python=${2:-}
src=$(cd "$(dirname "$0")/.." && pwd)
libdir=$(dirname "$lib")
mpirun=(${SYNCBN_MPIEXEC:-mpirun} -np 2 --oversubscribe --allow-run-as-root)
export OMP_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1
tmp=$(mktemp -d /tmp/syncbn_snippets.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# Extract every marked block into $tmp/<NAME>; print "<file> <NAME>" per block.
extract() { # <markdown file>
  awk -v dir="$tmp" -v md="$1" '
    match($0, /^<!-- snippet: [A-Za-z0-9_.-]+ -->$/) { name = $3; want = 1; next }
    want && /^```/ { if (inblock) { want = 0; inblock = 0; print md, name; next } inblock = 1; next }
    want && inblock { print > (dir "/" name) }
    want && !inblock && NF { printf "%s: snippet %s: no code block after its marker\n", md, name > "/dev/stderr"; exit 1 }
  ' "$1"
}

list=$tmp/list
: >"$list"
for md in "$src/README.md" "$src"/docs/*.md; do
  extract "$md" >>"$list"
done
# The README's two quick starts must stay marked: a lost marker would untest them.
for name in quickstart.c quickstart.py; do
  grep -q "README.md $name\$" "$list" || { echo "FAIL: README.md has no snippet $name (marker line missing?)"; exit 1; }
done
dups=$(awk '{print $2}' "$list" | sort | uniq -d)
[ -z "$dups" ] || { echo "FAIL: snippet names used twice: $dups"; exit 1; }

have_py=0
[ -n "$python" ] && "$python" -c 'import torch, mpi4py' 2>/dev/null && have_py=1

failed=() ran=0
while read -r md name; do
  where="${md#"$src"/}: $name"
  out=$tmp/$name.out
  case $name in
    *.c)
      echo "== $where: build and run at 2 ranks"
      if ! ${MPICC:-mpicc} -std=c11 -Wall -Wextra -Werror -I"$src/include" "$tmp/$name" -o "$tmp/${name%.c}" \
           -L"$libdir" -lsyncbn -lm -Wl,-rpath,"$libdir" 2>"$out"; then
        cat "$out"; failed+=("$where (does not build)"); continue
      fi
      cmd=("${mpirun[@]}" "$tmp/${name%.c}") ;;
    *.py)
      if [ $have_py = 0 ]; then echo "SKIP: $where: python3 with torch and mpi4py not available"; continue; fi
      echo "== $where: run at 2 ranks"
      cmd=(env PYTHONPATH="$src/src/python" SYNCBN_LIBRARY="$lib" PYTHONDONTWRITEBYTECODE=1
           "${mpirun[@]}" "$python" "$tmp/$name") ;;
    *) echo "FAIL: $where: unknown kind of snippet"; failed+=("$where (unknown kind)"); continue ;;
  esac
  ran=$((ran + 1))
  # </dev/null: mpirun forwards stdin to rank 0 and would eat the list being read
  if (cd "$tmp" && timeout -k 10 300 "${cmd[@]}") </dev/null >"$out" 2>&1 && [ -s "$out" ]; then
    cat "$out"
  else
    cat "$out"; failed+=("$where (wrong result, error or no output)")
  fi
done <"$list"

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAIL: %s\n' "${failed[@]}"
  exit 1
fi
echo "snippets: $ran programs built and ran at 2 ranks with the expected result"
