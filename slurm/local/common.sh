# Shared by slurm/local/start.sh and slurm/local/two_nodes.sh (sourced): Debian's Slurm and munge installed when
# missing, munged running. Expects log() and STATE.
pkgs=()
for b in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${b%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${b%%:*}" ] || pkgs+=("${b#*:}")
done
if [ ${#pkgs[@]} -gt 0 ]; then
  log "apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi
mkdir -p "$STATE" /etc/slurm /run/munge /var/log/munge /var/lib/munge
touch "$STATE/started"

# munge: a key, its run dir, the daemon as user munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null 2>&1 || true; fi
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
if ! pgrep -x munged >/dev/null; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  echo munged >> "$STATE/started"
fi

# the scheduling settings of both local clusters (slurm.conf lines); shared_conf MEM_PER_CPU_MB
shared_conf() {
  cat <<CONF
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$1
EnforcePartLimits=ALL
JobRequeue=1
KillWait=15
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
GresTypes=gpu
CONF
}
