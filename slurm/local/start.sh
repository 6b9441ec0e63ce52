#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian slurmctld + slurmd + munge), for CI and for trying the
# stage scripts on a workstation. Idempotent: installs only missing packages, writes the config once (from
# `slurmd -C`), starts only daemons that are not running, records what it started (stop.sh stops only those),
# and waits until the node is idle. Loopback only. Needs root (as CI and this dev machine run).
#   SLURM_LOCAL_STATE  state/log folder (default /var/tmp/megatron-ring-slurm)
#   SLURM_LOCAL_MEM_MB memory given to jobs (default: slurmd -C's RealMemory minus 2 GiB)
#   SLURM_LOCAL_GPUS   fake GPUs of the node (default 8): GRES gpu:N backed by device nodes made for the purpose
#             (/dev/megatron-ring-gpuI, copies of /dev/null), so GPU job scripts are accepted, scheduled and get
#             Slurm's GPU binding (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE); CUDA itself sees none.
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/tmp/megatron-ring-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# megatron-ring local cluster (slurm/local/start.sh)"
log() { echo "[slurm/local] $*"; }
[ "$(id -u)" -eq 0 ] || { echo "slurm/local/start.sh: needs root (daemons, /etc/slurm)" >&2; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mkdir -p "$STATE"/{ctld,spool}

# fake GPUs: character devices with /dev/null's numbers (Slurm's gres/gpu needs device files to bind)
GPUS=${SLURM_LOCAL_GPUS:-8}
for ((i = 0; i < GPUS; i++)); do
  [ -e "/dev/megatron-ring-gpu$i" ] || mknod -m 666 "/dev/megatron-ring-gpu$i" c 1 3 2>/dev/null || {
    log "cannot create device nodes here (mknod refused): no fake GPUs"; GPUS=0; break; }
done
gres=""; [ "$GPUS" -gt 0 ] && gres=" Gres=gpu:$GPUS"

# the config: one node as `slurmd -C` sees it, on loopback
changed=0
if [ ! -f "$CONF" ] || head -1 "$CONF" | grep -qF "$MARK"; then
  node=$(/usr/sbin/slurmd -C | head -1)
  name=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node")
  cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$node")
  real=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$node")
  mem=${SLURM_LOCAL_MEM_MB:-$(( real > 4096 ? real - 2048 : real ))}
  node=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$mem/" <<<"$node")
  new=$(cat <<CONF
$MARK
ClusterName=megatronring
SlurmctldHost=$name(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$(shared_conf $(( mem / cpus )))
$node$gres NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$name Default=YES MaxTime=INFINITE State=UP
CONF
)
  gconf="$MARK
AutoDetect=off"
  [ "$GPUS" -gt 0 ] && gconf="$gconf
NodeName=$name Name=gpu File=/dev/megatron-ring-gpu[0-$((GPUS - 1))]"
  if [ ! -f "$CONF" ] || [ "$new" != "$(cat "$CONF")" ] || [ "$gconf" != "$(cat /etc/slurm/gres.conf 2>/dev/null)" ]; then
    log "writing $CONF ($name: $cpus CPUs, $mem MB, $GPUS fake GPU(s))"
    printf '%s\n' "$new" > "$CONF"
    printf '%s\n' "$gconf" > /etc/slurm/gres.conf
    changed=1
  fi
else
  log "$CONF exists and is not ours: using it as is"
fi

if [ "$changed" = 1 ] && pgrep -fx /usr/sbin/slurmctld >/dev/null; then  # (a node's GRES changes only with a restart)
  log "config changed: restarting the daemons"
  pkill -fx /usr/sbin/slurmd || true; pkill -fx /usr/sbin/slurmctld || true
  for i in $(seq 1 20); do pgrep -fx /usr/sbin/slurmctld >/dev/null || pgrep -fx /usr/sbin/slurmd >/dev/null || break
    sleep 0.5; done
fi
if ! pgrep -fx /usr/sbin/slurmctld >/dev/null; then  # (exact command line: not the two-node profile's daemons)
  log "starting slurmctld"
  /usr/sbin/slurmctld
  echo slurmctld >> "$STATE/started"
fi
if ! pgrep -fx /usr/sbin/slurmd >/dev/null; then
  log "starting slurmd"
  /usr/sbin/slurmd
  echo slurmd >> "$STATE/started"
fi
for i in $(seq 1 60); do
  st=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  case "$st" in
    idle|mixed|allocated) log "node $st: cluster up ($(sinfo -h -o '%P %D %c %m' | head -1))"; exit 0 ;;
    drain*|down*) scontrol update nodename="$(sinfo -h -o %N | head -1)" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm/local/start.sh: the node did not become idle in 60 s (sinfo: ${st:-no answer}); see $STATE/*.log" >&2
exit 1
