#!/usr/bin/env bash
# Two emulated hosts: network namespaces joined by a veth pair, Open MPI launching
# the remote daemon through a small agent that enters the other namespace.
#   scripts/check/multihost.sh [path/to/syncbn-train]     (STEPS=40 by default)
#
#   namespace sbn_h1_<pid>  veth sbnv1_<pid> 10.77.0.1/24  mpirun + rank 0 (hostname sbn-h1)
#   namespace sbn_h2_<pid>  veth sbnv2_<pid> 10.77.0.2/24  orted  + rank 1 (hostname sbn-h2)
#
# Only these addresses (inside the namespaces) and loopback are used. All MPI traffic
# goes over the veth: --mca btl self,tcp and btl/oob_tcp_if_include 10.77.0.0/24
# (shared memory is excluded, since both "hosts" share one file system and /dev/shm).
# Each side runs in its own UTS namespace with its own hostname, so Open MPI sees two
# nodes. The final params sha256 must equal a single-host run with the same ranks.
# If namespaces cannot be created (no root, container without CAP_SYS_ADMIN), prints
# a SKIP: line and exits 0. Namespaces are removed on exit (trap).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
train=$(realpath "${1:-build/examples/syncbn-train}" 2>/dev/null || true)
data=${SYNCBN_DATA:-/usr/share/datasets/fashion-mnist}
[ -n "$train" ] && [ -x "$train" ] || { echo "multihost: no syncbn-train binary (build the examples first)" >&2; exit 1; }
[ -d "$data" ] || { echo "SKIP: multihost: no Fashion-MNIST data in $data"; exit 0; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1
args=(--data "$data" --steps "${STEPS:-40}" --train-limit 4096 --no-eval --print-every 1000 --seed 5)

ns1=sbn_h1_$$ ns2=sbn_h2_$$ v1=sbnv1_$$ v2=sbnv2_$$
work=$(mktemp -d /tmp/syncbn_multihost.XXXXXX)
cleanup() {
  for ns in "$ns1" "$ns2"; do
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
      # only processes started inside our own namespaces
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
      ip netns del "$ns" 2>/dev/null
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v ip >/dev/null || { echo "SKIP: multihost: iproute2 (ip) is not installed"; exit 0; }
command -v unshare >/dev/null || { echo "SKIP: multihost: unshare (util-linux) is not installed"; exit 0; }
if ! ip netns add "$ns1" 2>"$work/err" || ! ip netns add "$ns2" 2>>"$work/err"; then
  echo "SKIP: multihost: network namespaces refused here ($(head -1 "$work/err")); needs root / CAP_SYS_ADMIN"
  exit 0
fi
set -e
ip link add "$v1" type veth peer name "$v2"
ip link set "$v1" netns "$ns1"
ip link set "$v2" netns "$ns2"
ip -n "$ns1" addr add 10.77.0.1/24 dev "$v1"
ip -n "$ns2" addr add 10.77.0.2/24 dev "$v2"
for ns in "$ns1" "$ns2"; do ip -n "$ns" link set lo up; done
ip -n "$ns1" link set "$v1" up
ip -n "$ns2" link set "$v2" up
set +e
echo "namespaces $ns1 (10.77.0.1) and $ns2 (10.77.0.2) joined by veth"

# The launch agent, in place of ssh: `agent <host> <command...>` runs the command
# (Open MPI's orted) inside that host's namespace, under its own hostname.
cat >"$work/agent.sh" <<AGENT
#!/bin/sh
host=\$1
shift
case "\$host" in
  10.77.0.1) ns=$ns1 name=sbn-h1 ;;
  10.77.0.2) ns=$ns2 name=sbn-h2 ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
echo "\$(date +%T) agent: \$host -> netns \$ns: \$*" >>"$work/agent.log"
exec ip netns exec "\$ns" unshare --uts /bin/sh -c "hostname \$name && \$*"
AGENT
chmod +x "$work/agent.sh"
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' >"$work/hostfile"

mh_cmd=(mpirun -np 2 --hostfile "$work/hostfile" --map-by node
  --mca plm_rsh_agent "$work/agent.sh" --mca btl self,tcp
  --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24
  --tag-output "$train" "${args[@]}")
echo "+ ip netns exec $ns1 unshare --uts sh -c 'hostname sbn-h1; ${mh_cmd[*]}'"
# mpirun itself runs on "host 1"; its local rank stays there, the other is launched
# through the agent into "host 2".
timeout -k 10 600 ip netns exec "$ns1" unshare --uts /bin/sh -c 'hostname sbn-h1 && exec "$@"' sh \
  "${mh_cmd[@]}" >"$work/multi.log" 2>&1
status=$?
hostname_lines=$(grep -c 'agent:' "$work/agent.log" 2>/dev/null || echo 0)
if [ $status -ne 0 ]; then
  cat "$work/multi.log"
  cat "$work/agent.log" 2>/dev/null
  echo "FAIL: two-host run failed (exit $status)"
  exit 1
fi
multi=$(grep -o 'params sha256 [0-9a-f]*' "$work/multi.log" | head -1 | awk '{print $3}')
echo "agent launches: $hostname_lines ($(head -1 "$work/agent.log" 2>/dev/null | cut -c1-100)...)"

single_cmd=(mpirun -np 2 --oversubscribe "$train" "${args[@]}")
echo "+ ${single_cmd[*]}"
timeout -k 10 600 "${single_cmd[@]}" >"$work/single.log" 2>&1 || { cat "$work/single.log"; echo "FAIL: single-host run failed"; exit 1; }
single=$(grep -o 'params sha256 [0-9a-f]*' "$work/single.log" | awk '{print $3}')
echo "two hosts  : $multi"
echo "single host: $single"
if [ "$hostname_lines" -lt 1 ]; then
  echo "FAIL: the agent was never used, so no rank ran in the second namespace"
  exit 1
fi
if [ -z "$single" ] || [ "$multi" != "$single" ]; then
  echo "FAIL: hashes differ"
  exit 1
fi
echo "PASS: same params sha256 across two network namespaces as on one host"
