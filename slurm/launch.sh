#!/usr/bin/env bash
# Shared launcher for the stage scripts (sourced, not run). Under Slurm: one torchrun per node via srun,
# c10d rendezvous on the first node at a port derived from the job id, and preemption handling: the
# batch shell traps USR1 (sbatch --signal=B:USR1@N) and SIGTERM, forwards SIGTERM to torchrun (which
# forwards it to the ranks: the trainer checkpoints at the next step boundary), then requeues the job;
# the restarted job resumes from `latest`. Without Slurm the same command runs locally under torchrun.
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
# One intra-op thread per rank unless told: on CPU, 2 x threads > CPUs makes libgomp throttle every barrier once
# gloo worker threads hold OpenMP teams (from the first checkpoint save on; see parallel/dist.py).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

nproc_per_node() {
  if [ -n "${NPROC:-}" ]; then echo "$NPROC"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia-smi -L | wc -l; else echo 1; fi
}

# single_process <command...>: a one-process step in the batch shell (a conversion): without the launcher's and
# Slurm's rank variables (else it takes itself for rank 0 of an N-task job and waits for peers), on the CPU, with
# every CPU of the node as intra-op threads.
single_process() {
  env -u SLURM_PROCID -u SLURM_NTASKS -u SLURM_LOCALID -u SLURM_NODEID -u RANK -u WORLD_SIZE -u LOCAL_RANK \
    -u MASTER_ADDR -u MASTER_PORT CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" "$@"
}

# run_stage <module args...>: run `python -m megatron_ring.cli <args>` on every rank of the allocation.
run_stage() {
  local nproc; nproc=$(nproc_per_node)
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    local head port
    head=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
    port=$((20000 + SLURM_JOB_ID % 10000))  # 20000-29999: disjoint from the rollout servers' 30000-49999
    echo "[$(date +%T)] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-1} node(s) x ${nproc}: $*"
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PY" -m torch.distributed.run \
      --nnodes="${SLURM_JOB_NUM_NODES:-1}" --nproc-per-node="$nproc" --rdzv-backend=c10d \
      --rdzv-endpoint="${head}:${port}" --rdzv-id="${SLURM_JOB_ID}" -m megatron_ring.cli "$@" &
  else
    echo "[$(date +%T)] no Slurm: running locally on ${nproc} process(es): $*"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m megatron_ring.cli "$@" &
  fi
  CHILD=$!
  trap 'on_preempt' USR1 TERM
  local rc=0
  wait "$CHILD" || rc=$?
  if [ "${PREEMPTED:-0}" = 1 ]; then
    wait "$CHILD" 2>/dev/null || true   # the ranks are writing their checkpoint
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      echo "[$(date +%T)] checkpoint written; requeueing job ${SLURM_JOB_ID}"
      scontrol requeue "${SLURM_JOB_ID}" || echo "[$(date +%T)] requeue refused (already requeued by Slurm?)"
    fi
    exit 0
  fi
  return $rc
}

on_preempt() {
  PREEMPTED=1
  echo "[$(date +%T)] preemption signal: asking the ranks to checkpoint"
  kill -TERM "$CHILD" 2>/dev/null || true
}

# run_rl_stage <rl flags...>: the RL trainer, plus SGLang rollout servers on this allocation when the
# recipe's engine is sglang (GPU nodes): ROLLOUT_GPUS per node serve, the rest train.
run_rl_stage() {
  local engine
  engine=$("$PY" -m megatron_ring.cli recipes --get "$RECIPE" stages.rl.engine 2>/dev/null || echo inprocess)
  if [ "$engine" != "sglang" ]; then
    run_stage rl --recipe "$RECIPE" "$@"
    return
  fi
  local gpus rollout urls=() start hf
  gpus=$(nproc_per_node); rollout=${ROLLOUT_GPUS:-4}
  start=$("$PY" -m megatron_ring.cli recipes --get "$RECIPE" stages.rl.init)
  hf="${SGLANG_MODEL:-$("$PY" -m megatron_ring.cli recipes --get "$RECIPE" stages.rl.out)/rollout_init_hf}"
  [ -f "$hf/config.json" ] || single_process "$PY" -m megatron_ring.cli convert mcore-to-hf --ckpt "$start" --out "$hf" \
    --tokenizer "$("$PY" -m megatron_ring.cli recipes --get "$RECIPE" stages.rl.tokenizer)" --dtype bf16
  # the servers' context: the recipe's longest prompt + max_new_tokens, refused here (exit 2) when it exceeds the
  # model's positions without the recipe allowing it — before any server starts
  local ctx allow=()
  ctx=$("$PY" -m megatron_ring.cli rl --recipe "$RECIPE" --print-context "$@")
  [ "${ctx#* }" = beyond-positions ] && allow=(--allow-beyond-positions)
  ctx=${ctx%% *}
  local port=$((30000 + ${SLURM_JOB_ID:-0} % 20000))
  for host in $(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null || echo localhost); do
    local devs; devs=$(seq -s, $((gpus - rollout)) $((gpus - 1)))
    srun --overlap --nodes=1 --ntasks=1 -w "$host" env CUDA_VISIBLE_DEVICES="$devs" \
      "$PY" -m serving.sglang --model-path "$hf" --port "$port" --tp-size "$rollout" --context-length "$ctx" \
      "${allow[@]}" --enable-memory-saver &
    urls+=("http://${host}:${port}")
  done
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - rollout - 1)))
  # the weight-update group: hosted by trainer rank 0 (first node) on a port of its own (50000-59999)
  export MEGATRON_RING_SYNC_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)
  export MEGATRON_RING_SYNC_PORT=$((50000 + ${SLURM_JOB_ID:-0} % 10000))
  NPROC=$((gpus - rollout)) run_stage rl --recipe "$RECIPE" --engine sglang --sglang-urls "${urls[@]}" "$@"
}
