#!/usr/bin/env bash
# Stop what slurm/local/start.sh started (and nothing else): cancels the cluster's jobs first.
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/tmp/megatron-ring-slurm}
[ -f "$STATE/started" ] || { echo "[slurm/local] nothing recorded as started"; exit 0; }
if grep -qx slurmctld "$STATE/started"; then scancel --full -u "$(id -un)" 2>/dev/null || true; fi
for d in slurmd slurmctld munged; do
  if grep -qx "$d" "$STATE/started"; then
    echo "[slurm/local] stopping $d"
    if [ "$d" = munged ]; then pkill -x munged || true; else pkill -fx "/usr/sbin/$d" || true; fi
    for i in $(seq 1 20); do pgrep -fx "/usr/sbin/$d" >/dev/null || break; sleep 0.5; done
  fi
done
: > "$STATE/started"
