#!/usr/bin/env bash
# A second local Slurm cluster: two nodes, `gpu9` and `gpu10`, whose names sort the other way round from their
# numbers (c10d's rendezvous orders nodes by name, `scontrol show hostnames` by number). Each slurmd runs in its own
# network namespace (10.77.0.9 / .10 on a bridge, the controller at 10.77.0.1), UTS namespace (its hostname) and mount
# namespace (its own four fake GPUs at /dev/mr-gpus/nvidia0-3, character devices 195:N like /dev/nvidiaN, each node
# other numbers). Where the machine has cgroup v1 freezer+devices, processes are tracked by cgroup and each step's
# devices are constrained to its GPUs (ConstrainDevices=yes: opening another GPU fails with EPERM, an allowed one with
# ENXIO, for no driver answers). Runs beside slurm/local/start.sh's one-node cluster (its own ports, state, config).
#   bash slurm/local/two_nodes.sh start   # idempotent; exit 4 when this machine cannot make the namespaces
#   bash slurm/local/two_nodes.sh stop
#   export SLURM_CONF=/var/tmp/megatron-ring-slurm-2n/slurm.conf   # what clients (sbatch, submitit) then use
# Needs root.
set -euo pipefail
STATE=${SLURM_TWO_STATE:-/var/tmp/megatron-ring-slurm-2n}
CONF=$STATE/slurm.conf
NODES=(9 10)
log() { echo "[slurm/two-nodes] $*"; }
[ "$(id -u)" -eq 0 ] || { echo "slurm/local/two_nodes.sh: needs root (namespaces, daemons)" >&2; exit 1; }

stop() {
  if [ -f "$STATE/pids" ]; then
    SLURM_CONF=$CONF scancel --full -u "$(id -un)" 2>/dev/null || true
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$STATE/pids"
    for _ in $(seq 1 20); do
      alive=0; while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$STATE/pids"
      [ "$alive" = 0 ] && break; sleep 0.5
    done
    rm -f "$STATE/pids"
  fi
  log "stopped"
}
[ "${1:-start}" = stop ] && { stop; exit 0; }

t0=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mkdir -p "$STATE/ctld"

# the network: a bridge in this namespace, one namespace per node
if ! { ip link show mrbr0 >/dev/null 2>&1 || ip link add mrbr0 type bridge 2>/dev/null; }; then
  echo "slurm/local/two_nodes.sh: cannot create a bridge (ip link add: no CAP_NET_ADMIN?)" >&2; exit 4
fi
[[ "$(ip -o addr show mrbr0)" == *" 10.77.0.1/24 "* ]] || ip addr add 10.77.0.1/24 dev mrbr0
ip link set mrbr0 up
for n in "${NODES[@]}"; do
  ns=mr-gpu$n
  [ -e "/run/netns/$ns" ] || ip netns add "$ns" || { echo "slurm/local/two_nodes.sh: ip netns add refused" >&2; exit 4; }
  ip link show "mrv$n" >/dev/null 2>&1 || ip link add "mrv$n" type veth peer name eth0 netns "$ns"
  ip link set "mrv$n" master mrbr0 up
  [[ "$(ip -n "$ns" -o addr show eth0)" == *" 10.77.0.$n/24 "* ]] || ip -n "$ns" addr add "10.77.0.$n/24" dev eth0
  ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up
  # its GPUs: 195:(4i..4i+3) under /dev/mr-gpus/nvidia0-3 in its own mount namespace
  mkdir -p "$STATE/dev-gpu$n" /dev/mr-gpus
  for i in 0 1 2 3; do
    f=$STATE/dev-gpu$n/nvidia$i
    [ -e "$f" ] || mknod -m 666 "$f" c 195 $(( (n - 9) * 4 + i ))
  done
done
grep -q "^10.77.0.9 gpu9" /etc/hosts || printf '10.77.0.9 gpu9\n10.77.0.10 gpu10\n' >> /etc/hosts

# cgroup v1 with freezer and devices: track by cgroup, constrain devices (else process-tree tracking)
track="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
if [ -d /sys/fs/cgroup/freezer ] && [ -d /sys/fs/cgroup/devices ] && [ -w /sys/fs/cgroup/devices ]; then
  track="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup"
  printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainDevices=yes\nConstrainCores=no\nConstrainRAMSpace=no\n' \
    > "$STATE/cgroup.conf"
fi
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 - 1024 ))
cat > "$CONF" <<CONF
ClusterName=mrtwo
SlurmctldHost=$(hostname -s)(10.77.0.1)
SlurmctldPort=6827
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
$track
$(shared_conf $(( mem / cpus )))
NodeName=gpu9 NodeAddr=10.77.0.9 CPUs=$cpus RealMemory=$mem Gres=gpu:4 State=UNKNOWN
NodeName=gpu10 NodeAddr=10.77.0.10 CPUs=$cpus RealMemory=$mem Gres=gpu:4 State=UNKNOWN
PartitionName=two Nodes=gpu9,gpu10 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
printf 'AutoDetect=off\nNodeName=gpu9 Name=gpu File=/dev/mr-gpus/nvidia[0-3]\nNodeName=gpu10 Name=gpu File=/dev/mr-gpus/nvidia[0-3]\n' \
  > "$STATE/gres.conf"

running() { [ -f "$STATE/pids" ] && grep -q . "$STATE/pids" && while read -r pid; do kill -0 "$pid" 2>/dev/null || return 1; done < "$STATE/pids"; }
if ! running; then
  stop >/dev/null
  /usr/sbin/slurmctld -f "$CONF"
  for _ in $(seq 1 20); do [ -s "$STATE/slurmctld.pid" ] && break; sleep 0.2; done
  cat "$STATE/slurmctld.pid" > "$STATE/pids"
  for n in "${NODES[@]}"; do
    mkdir -p "$STATE/spool-gpu$n"; rm -f "$STATE/slurmd-gpu$n.pid"
    nsenter --net="/run/netns/mr-gpu$n" unshare --uts --mount --propagation private sh -c \
      "mount --bind '$STATE/dev-gpu$n' /dev/mr-gpus && hostname gpu$n && exec /usr/sbin/slurmd -f '$CONF' -N gpu$n"
    for _ in $(seq 1 20); do [ -s "$STATE/slurmd-gpu$n.pid" ] && break; sleep 0.2; done
    cat "$STATE/slurmd-gpu$n.pid" >> "$STATE/pids"
  done
fi
export SLURM_CONF=$CONF
for _ in $(seq 1 60); do
  st=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
  if [ "$(grep -cE ' (idle|mixed|allocated)' <<<"$st")" = 2 ]; then
    log "gpu9 and gpu10 up in $(( $(date +%s) - t0 )) s ($(grep -o 'proctrack/[a-z]*' "$CONF"); SLURM_CONF=$CONF)"
    exit 0
  fi
  for node in $(grep -E ' (drain|down)' <<<"$st" | cut -d' ' -f1); do
    scontrol update nodename="$node" state=resume 2>/dev/null || true
  done
  sleep 1
done
echo "slurm/local/two_nodes.sh: the nodes did not come up in 60 s (sinfo: ${st:-no answer}); see $STATE/*.log" >&2
exit 1
