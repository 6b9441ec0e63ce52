#!/usr/bin/env bash
# Shared launcher for the stage scripts (sourced, not run). Under Slurm: one torchrun per node via srun,
# c10d rendezvous on the first node at a port derived from the job id, and preemption handling: the
# batch shell traps USR1 (sbatch --signal=B:USR1@N) and SIGTERM, forwards SIGTERM to torchrun (which
# forwards it to the ranks: the trainer checkpoints at the next step boundary, or at once when it is inside a
# generate phase), then requeues the job; the restarted job resumes from `latest`. Without Slurm the same command
# runs locally under torchrun. PRINT_PLAN=1: every stage prints what it would run (per node: ranks, GPUs, ports,
# commands, environment) and runs nothing.
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
# A preemption's budget: torchrun waits SHUTDOWN_TIMEOUT for the ranks to write their checkpoint before it kills
# them (torchrun's default, 30 s, is shorter than one save); the ranks plan with the shorter of it and the stage
# script's signal lead (--signal=B:USR1@N).
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-540}
# --- the allocation: everything below is derived from it (Slurm's variables and GRES binding; else this machine) ---
hosts() { if [ -n "${SLURM_JOB_NODELIST:-}" ]; then scontrol show hostnames "$SLURM_JOB_NODELIST"; else hostname; fi; }
num_nodes() { echo "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"; }

gpus_per_node() {  # this node's GPUs as Slurm bound them (GRES), else what the machine shows, else 0
  # (a submitit job's own step holds no GPU; it passes the job's count: MEGATRON_RING_GPUS_PER_NODE)
  if [ -n "${MEGATRON_RING_GPUS_PER_NODE:-}" ]; then echo "$MEGATRON_RING_GPUS_PER_NODE"; return; fi
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local d; IFS=, read -r -a d <<< "$CUDA_VISIBLE_DEVICES"; echo "${#d[@]}"; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia-smi -L | wc -l; else echo 0; fi
}

nproc_per_node() {  # NPROC (CPU runs), else one rank per GPU, else 1
  if [ -n "${NPROC:-}" ]; then echo "$NPROC"; return; fi
  local g; g=$(gpus_per_node); [ "$g" -gt 0 ] && echo "$g" || echo 1
}

cpus_per_task() { echo "${SLURM_CPUS_PER_TASK:-$(env -u OMP_NUM_THREADS nproc)}"; }

# The ranks' environment. On GPUs: one CUDA work queue (megatron's TP/SP communication overlap needs it, as
# Megatron-LM's and slime's launchers set), NCCL warnings only, the task's CPUs shared by the node's ranks. On CPU
# one intra-op thread per rank unless told: 2 x threads > CPUs makes libgomp throttle every barrier once gloo
# worker threads hold OpenMP teams (from the first checkpoint save on; see parallel/dist.py).
rank_env() {  # rank_env NPROC: exports, and lists them for the plan
  local n=$1
  if [ "$(gpus_per_node)" -gt 0 ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_AVOID_RECORD_STREAMS=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Triton's kernel cache on each node's local disk (Megatron-LM's example does the same): not the shared home,
    # which every rank of every node would write at once
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton_cache_${SLURM_JOB_ID:-local}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(cpus_per_task) / n > 0 ? $(cpus_per_task) / n : 1 ))}
    RANK_ENV=(CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_AVOID_RECORD_STREAMS NCCL_DEBUG OMP_NUM_THREADS TRITON_CACHE_DIR)
  else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    RANK_ENV=(OMP_NUM_THREADS)
  fi
  # the signal lead (s) the trainer holds its measured step-to-boundary and save times against: SIGNAL_LEAD, else
  # the stage script's own `#SBATCH --signal=…@N` (under sbatch $0 is Slurm's copy of it)
  local lead; lead=${SIGNAL_LEAD:-$(sed -n 's/^#SBATCH --signal=[^@]*@\([0-9][0-9]*\).*/\1/p' "$0" 2>/dev/null | head -1)}
  # a stop the ranks plan from the job's end (SLURM_JOB_END_TIME) leaves this file: the script requeues the job
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    export MEGATRON_RING_REQUEUE_FILE=$REPO/logs/.requeue-$SLURM_JOB_ID
    RANK_ENV+=(MEGATRON_RING_REQUEUE_FILE)
  fi
  # (torchrun kills the ranks SHUTDOWN_TIMEOUT after it passed the signal on: the budget is the shorter of the two)
  if [ -n "$lead" ]; then
    export MEGATRON_RING_SIGNAL_LEAD=$(( lead < SHUTDOWN_TIMEOUT ? lead : SHUTDOWN_TIMEOUT ))
    RANK_ENV+=(MEGATRON_RING_SIGNAL_LEAD)
  fi
}

# The oldest Slurm these scripts run on: 22.05, where `srun --overlap` shares GPUs and memory as well as CPUs (the
# rollout servers' and the trainer's steps overlap on every node; on 21.08 the trainer step would wait forever).
MIN_SLURM=22.05
slurm_supported() {
  local v; v=$(srun --version 2>/dev/null | awk '{print $2}')
  [ -z "$v" ] && return 0
  if [ "$(printf '%s\n%s\n' "$MIN_SLURM" "$v" | sort -V | head -n 1)" != "$MIN_SLURM" ]; then
    echo "[$(date +%T)] Slurm $v is older than $MIN_SLURM, the oldest these scripts support (srun --overlap must" \
      "share GPUs between the servers' and the trainer's steps): not starting" >&2
    exit 2
  fi
}

# Ports, all from the job id, in disjoint ranges below Linux's ephemeral range (32768-60999: an outgoing connection
# can hold any port there that a later bind needs): rendezvous 10000-14999, rollout servers 15000-19999, the
# weight-update group 20000-29999 (a base per job, + the trainer rank: up to 1000), SGLang's router 30000-31999 (+1:
# its metrics). Two jobs on one node collide only when their ids agree modulo 5000 (the sync base: modulo 10).
rdzv_port() { echo $((10000 + ${SLURM_JOB_ID:-0} % 5000)); }
server_port() { echo $((15000 + ${SLURM_JOB_ID:-0} % 5000)); }
sync_port() { echo $((20000 + ${SLURM_JOB_ID:-0} % 10 * 1000)); }
router_port() { echo $((30000 + ${SLURM_JOB_ID:-0} % 1000 * 2)); }

job_server() {  # job_server HF_DIR CONTEXT: one SGLang server of the job on this node's GPUs (TP = all of them),
  # started on HF_DIR and waited for; sets SERVER_URL; stopped when the script exits
  local port; port=$(server_port)
  "${SGLANG_PYTHON:-$PY}" -m serving.sglang --model-path "$1" --host 127.0.0.1 --port "$port" \
    --tp-size auto --gpus "$(gpus_per_node)" --context-length "$2" --allow-beyond-positions &
  SERVER_PID=$!
  trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
  "$PY" -c "from serving.health import wait_healthy; wait_healthy('http://127.0.0.1:$port')"
  SERVER_URL=http://127.0.0.1:$port
}


gpu_mem_gib() {  # one GPU's memory (the first of this node), else GPU_MEM_GIB (default 80)
  local m; m=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 || true)
  if [ -n "$m" ]; then echo $((m / 1024)); else echo "${GPU_MEM_GIB:-80}"; fi
}

# fits <recipe> <world>: on GPUs, `megatron-ring plan` for this many ranks: refused (exit 2, its reason) when the
# recipe's TP/PP/EP layout does not divide the world or a rank's memory does not fit one GPU; prints its total
fits() {
  local out
  out=$("$PY" -m megatron_ring.cli plan --recipe "$1" --gpus "$2" --gpu-mem "$(gpu_mem_gib)" 2>&1) || {
    echo "$out" | grep -v "CPU mode" >&2
    echo "[$(date +%T)] refused before starting: recipe $1 on $2 GPU rank(s) (nodes x ranks per node)" >&2
    exit 2; }
  echo "$out" | grep -E "^plan:|^  total" | sed 's/^ *//' | paste -sd';' -
}

plan() { echo "[plan] $*"; }
plan_cmd() { local what=$1; shift; printf '[plan] %s :: ' "$what"; printf '%q ' "$@"; echo; }

# A stage that needs CUDA stops here with the reason when the allocation has GPUs torch cannot use (no driver, a
# container without them, fake GRES): not N CPU ranks of a GPU recipe that would wait on each other for 30 minutes.
require_cuda() {
  local g; g=$(gpus_per_node)
  [ "$g" -gt 0 ] || return 0
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' && return 0
  echo "[$(date +%T)] this allocation has $g GPU(s) per node (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})" \
    "but torch sees no CUDA device (driver? container? fake GRES?): not starting" >&2
  exit 3
}

# single_process <command...>: a one-process step in the batch shell (a conversion): without the launcher's and
# Slurm's rank variables (else it takes itself for rank 0 of an N-task job and waits for peers), on the CPU, with
# every CPU of the node as intra-op threads.
single_process() {
  env -u SLURM_PROCID -u SLURM_NTASKS -u SLURM_LOCALID -u SLURM_NODEID -u RANK -u WORLD_SIZE -u LOCAL_RANK \
    -u MASTER_ADDR -u MASTER_PORT CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" "$@"
}

# run_stage <module args...>: `python -m megatron_ring.cli <args>` on every rank of the allocation: one torchrun per
# node (srun), NPROC ranks each (default: one per GPU), c10d rendezvous on the first node. TRAINER_GPUS=FIRST:COUNT
# gives the ranks that slice of each node's GPUs (slurm/with_gpus.sh). PRINT_PLAN=1 prints it all and runs nothing.
run_stage() {
  local nproc nodes head; nproc=$(nproc_per_node); nodes=$(num_nodes); head=$(hosts | head -n 1)
  rank_env "$nproc"
  local wrap=(); [ -n "${TRAINER_GPUS:-}" ] && wrap=("$REPO/slurm/with_gpus.sh" "${TRAINER_GPUS%%:*}" "${TRAINER_GPUS##*:}")
  # (USR1/USR2: what Slurm and submitit send ahead of the end; torchrun passes them to the ranks, which checkpoint)
  local tr=("$PY" -m torch.distributed.run --nproc-per-node="$nproc" --shutdown-timeout="$SHUTDOWN_TIMEOUT"
            --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2)
  local step=(); [ -n "${SLURM_STEP_ID:-}" ] && step=(--overlap)  # (inside a job step: submitit's)
  local cmd recipe="" memory="" a prev=""
  for a in "$@"; do [ "$prev" = --recipe ] && recipe=$a; prev=$a; done
  if [ -n "${STAGE_MEMORY:-}" ]; then memory=$STAGE_MEMORY  # (checked by the caller already)
  elif [ "$(gpus_per_node)" -gt 0 ] && [ -n "$recipe" ]; then memory=$(fits "$recipe" $((nodes * nproc))); fi
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    cmd=(srun "${step[@]}" --kill-on-bad-exit=1 --ntasks-per-node=1 "${wrap[@]}" "${tr[@]}" --nnodes="$nodes" --rdzv-backend=c10d
         --rdzv-endpoint="${head}:$(rdzv_port)" --rdzv-id="${SLURM_JOB_ID}" -m megatron_ring.cli "$@")
  else
    cmd=("${wrap[@]}" "${tr[@]}" --standalone -m megatron_ring.cli "$@")
  fi
  if [ "${PRINT_PLAN:-0}" = 1 ]; then
    plan "stage=$1 job=${SLURM_JOB_ID:-none} nodes=$nodes hosts=$(hosts | paste -sd, -) gpus_per_node=$(gpus_per_node)" \
      "gpu_binding=${CUDA_VISIBLE_DEVICES:-none}" \
      "ranks_per_node=$nproc world=$((nodes * nproc)) trainer_gpus=${TRAINER_GPUS:-all} rendezvous=${head}:$(rdzv_port)" \
      "cpus_per_task=$(cpus_per_task) shutdown_timeout=$SHUTDOWN_TIMEOUT"
    [ -n "$memory" ] && plan "memory $memory"
    local e; for e in "${RANK_ENV[@]}"; do plan "env $e=${!e}"; done
    plan_cmd "every node: trainer" "${cmd[@]}"
    return 0
  fi
  [ "${NO_CUDA_CHECK:-0}" = 1 ] || require_cuda  # (the preflight reports what the GPUs look like instead)
  [ -n "${SLURM_JOB_ID:-}" ] && slurm_supported
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[$(date +%T)] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x ${nproc}: $*"
  else
    echo "[$(date +%T)] no Slurm: running locally on ${nproc} process(es): $*"
  fi
  rm -f "${MEGATRON_RING_REQUEUE_FILE:-/nonexistent}"
  "${cmd[@]}" &
  CHILD=$!
  trap 'on_preempt' USR1 USR2
  trap 'on_cancel' TERM
  local rc=0
  wait "$CHILD" || rc=$?
  if [ "${PREEMPTED:-0}" = 1 ]; then
    wait "$CHILD" 2>/dev/null || true   # the ranks are writing their checkpoint
    if [ -n "${MEGATRON_RING_SUBMITIT:-}" ]; then
      echo "[$(date +%T)] checkpoint written; submitit requeues the job"
    elif [ -n "${SLURM_JOB_ID:-}" ]; then
      echo "[$(date +%T)] checkpoint written; requeueing job ${SLURM_JOB_ID}"
      scontrol requeue "${SLURM_JOB_ID}" || echo "[$(date +%T)] requeue refused (already requeued by Slurm?)"
    fi
    exit 0
  fi
  if [ "$rc" = 0 ] && [ -n "${MEGATRON_RING_REQUEUE_FILE:-}" ] && [ -f "$MEGATRON_RING_REQUEUE_FILE" ]; then
    rm -f "$MEGATRON_RING_REQUEUE_FILE"
    echo "[$(date +%T)] the ranks stopped before the job's end (checkpoint written); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}" || echo "[$(date +%T)] requeue refused"
    exit 0
  fi
  if [ "${CANCELLED:-0}" = 1 ]; then
    wait "$CHILD" 2>/dev/null || true
    echo "[$(date +%T)] cancelled: the job ends (not requeued)"
    exit 143
  fi
  return $rc
}

on_cancel() {  # TERM without a warning signal first: scancel. The ranks save if they can; the job is not requeued
  # (`scontrol requeue` takes cancelled jobs back too). At a time limit USR1 came first: that requeue stands.
  CANCELLED=1
  echo "[$(date +%T)] TERM (scancel): asking the ranks to checkpoint; the job will not be requeued"
  kill -USR1 "$CHILD" 2>/dev/null || true
}

on_preempt() {
  PREEMPTED=1
  echo "[$(date +%T)] preemption signal: asking the ranks to checkpoint"
  # USR1, not TERM: srun passes USR1 on to the step's tasks (torchrun, which hands it to the ranks), while a TERM
  # makes srun abort the step (its tasks killed before they save: found under the local slurmctld)
  kill -USR1 "$CHILD" 2>/dev/null || true
}

# run_rl_stage <rl flags...>: the RL trainer, plus SGLang rollout servers on this allocation when the recipe's
# engine is sglang (GPU nodes): on every node the last ROLLOUT_GPUS GPUs serve (one server, TP = ROLLOUT_GPUS) and
# the first ones train. The servers start from the run's start checkpoint (a run dir resolves to its selected /
# latest checkpoint) exported to HF in bf16, and get the policy's weights after every step.
run_rl_stage() {
  local engine
  engine=$("$PY" -m megatron_ring.cli recipes --get "$RECIPE" stages.rl.engine 2>/dev/null || echo inprocess)
  if [ "$engine" != "sglang" ]; then
    run_stage rl --recipe "$RECIPE" "$@"
    return
  fi
  # what the trainer will use: its start checkpoint, run dir, tokenizer and the servers' context (refused here,
  # exit 2, when prompt + max_new_tokens exceed the model's positions without the recipe allowing it)
  local launch; launch=$("$PY" -m megatron_ring.cli rl --recipe "$RECIPE" --print-launch "$@") || exit $?
  eval "$launch"
  if [ -n "${SLURM_JOB_ID:-}" ] && [ "${PRINT_PLAN:-0}" != 1 ]; then slurm_supported; fi  # (before any server)
  local gpus rollout; gpus=$(gpus_per_node); rollout=${ROLLOUT_GPUS:-4}
  if [ "$gpus" -le "$rollout" ]; then
    echo "run_rl_stage: $gpus GPU(s) per node, ROLLOUT_GPUS=$rollout leaves none to train" >&2; exit 2
  fi
  local memory; memory=$(fits "$RECIPE" $(($(num_nodes) * (gpus - rollout))))  # before any conversion or server
  local hf="${SGLANG_MODEL:-$RL_OUT/rollout_init_hf}" flags=()
  [ "$RL_BEYOND_POSITIONS" = 1 ] && flags=(--allow-beyond-positions)
  # seeds count on SGLang only under deterministic inference; the memory saver only where the trainer shares the
  # servers' GPUs (on dedicated rollout GPUs it only shrinks the KV pool)
  [ "$RL_DETERMINISTIC" = 1 ] && flags+=(--enable-deterministic-inference)
  [ "$RL_COLOCATED" = 1 ] && flags+=(--enable-memory-saver)
  # (written beside it and renamed when whole: a job killed mid-export leaves no folder a requeue would take as done)
  local convert=(single_process "$PY" -m megatron_ring.cli export --ckpt "$RL_START" --out "$hf.partial"
                 --tokenizer "$RL_TOKENIZER" --dtype bf16)
  # each server's output (SGLang's log) in RL_OUT/logs, and its exit status beside it as soon as it ends: the trainer
  # fails at once with the log's tail (MEGATRON_RING_SERVER_STATUS), not after a 30-minute health wait
  local logs="$RL_OUT/logs"
  export MEGATRON_RING_SERVER_STATUS=$logs
  server_step() { STEP=(srun --overlap --nodes=1 --ntasks=1 -w "$1" --output="$logs/sglang-$1.log" "${serve[@]}"); }
  local urls=() host port; port=$(server_port)
  for host in $(hosts); do urls+=("http://${host}:${port}"); done
  local serve=("$REPO/slurm/with_gpus.sh" $((gpus - rollout)) "$rollout" "${SGLANG_PYTHON:-$PY}" -m serving.sglang
               --model-path "$hf" --port "$port" --tp-size "$rollout" --context-length "$RL_CONTEXT" "${flags[@]}")
  # the weight-update rendezvous: every trainer rank on its own host, port + its rank (rank 0 is wherever torchrun's
  # c10d rendezvous puts it: the node whose name sorts first, not necessarily the first host of the allocation)
  local batch_host; batch_host=$(hosts | head -n 1)
  export MEGATRON_RING_SYNC_PORT; MEGATRON_RING_SYNC_PORT=$(sync_port)
  # more than one server: SGLang's router on this (the batch) node takes the samples' requests (ROUTER=0: the
  # client spreads them itself)
  local router=() via=()
  if [ "${#urls[@]}" -gt 1 ] && [ "${ROUTER:-1}" != 0 ]; then
    router=("$PY" -m serving.router --worker-urls "${urls[@]}" --host 0.0.0.0 --port "$(router_port)")
    via=(--sglang-router "http://$batch_host:$(router_port)")
  fi
  # every node can run the reward sandbox (rank 0, which grades, lands on any of them), asked before anything
  # is converted or started (--sandbox-unsafe in RL_ARGS: the recipe runs without it)
  local sandbox=(srun --overlap --nodes="$(num_nodes)" --ntasks-per-node=1
                 "$PY" -m megatron_ring.rewards.sandbox --check)
  [[ " $* " == *" --sandbox-unsafe "* ]] && sandbox=()
  if [ "${PRINT_PLAN:-0}" = 1 ]; then
    [ "${#sandbox[@]}" -eq 0 ] || plan_cmd "every node: reward sandbox check" "${sandbox[@]}"
    plan "start=$RL_START out=$RL_OUT context=$RL_CONTEXT rollout_gpus_per_node=$rollout server_port=$port" \
      "servers=$(IFS=,; echo "${urls[*]}") weight_sync=*:$MEGATRON_RING_SYNC_PORT" \
      "router=${via[1]:-none}"
    [ -f "$hf/config.json" ] || plan_cmd "batch node: start checkpoint -> HF" "${convert[@]}"
    for host in $(hosts); do
      server_step "$host"
      plan_cmd "node $host: rollout server" "${STEP[@]}"
    done
    [ "${#router[@]}" -eq 0 ] || plan_cmd "batch node: router" "${router[@]}"
  else
    if [ "${#sandbox[@]}" -gt 0 ] && ! "${sandbox[@]}"; then
      echo "[$(date +%T)] the reward sandbox cannot run on every node (above): not starting" >&2; exit 3
    fi
    if [ ! -f "$hf/config.json" ]; then
      rm -rf "$hf.partial"
      "${convert[@]}"
      rm -rf "$hf" && mv "$hf.partial" "$hf"
    fi
    mkdir -p "$logs" && rm -f "$logs"/sglang-*.exit
    for host in $(hosts); do
      server_step "$host"
      ( "${STEP[@]}" && rc=0 || rc=$?; echo "$rc" > "$logs/sglang-$host.exit" ) &
    done
    [ "${#router[@]}" -eq 0 ] || "${router[@]}" &
  fi
  NPROC=$((gpus - rollout)) TRAINER_GPUS="0:$((gpus - rollout))" STAGE_MEMORY=$memory \
    run_stage rl --recipe "$RECIPE" --engine sglang --sglang-urls "${urls[@]}" "${via[@]}" "$@"
}
