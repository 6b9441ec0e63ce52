#!/usr/bin/env bash
#SBATCH --job-name=serve
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
# Serve a checkpoint behind the OpenAI API (and optionally the Gradio chat demo).
#   CKPT      a training checkpoint or run dir (SFT / RL stage 1/2; default runs/tiny/rl_stage1) — exported
#             to HF first (EXPORT, default $CKPT/../export or <run>/export), or MODEL: an exported HF folder
#   PORT      API port (default 8000); API_KEY optional; NAME served model id (default ring-lite)
#   TP / EP / CONTEXT   SGLang tensor / expert parallel size (default: the largest up to the node's GPUs that divides
#             the model's attention and KV heads as SGLang requires; a TP that does not is refused / 1) and context (the
#             model's max_position_embeddings; longer only with ALLOW_LONG_CONTEXT=1, e.g. 32768 for Ring-lite)
#   SGLANG_PYTHON       the interpreter of SGLang's own environment (default: the project's)
#   HOST      the address the API and the demo listen on (default 0.0.0.0); SERVE_DTYPE SGLang's --dtype (default:
#             the export's own, e.g. float32 for the tiny recipes: SGLang's "auto" would serve those in float16)
#   An export newer than the checkpoint is served as it is (no second conversion); a new one is written beside it
#   and moved into place.
#   UI=1      also start the Gradio demo on UI_PORT (default 7860); UI_AUTH=user:password for a login
# On a GPU node with SGLang installed: SGLang (--reasoning-parser deepseek-r1, trust-remote-code). Otherwise the
# CPU server (serving.openai_server) — the same API, e.g. locally: CKPT=runs/tiny/rl_stage1 bash slurm/serve.sh
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/slurm/launch.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}  # under sbatch: Slurm's spool copy
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p logs
PORT=${PORT:-8000}
NAME=${NAME:-ring-lite}
if [ -z "${MODEL:-}" ]; then
  CKPT=${CKPT:-runs/tiny/rl_stage1}
  base=$CKPT; [ -d "$CKPT/checkpoints" ] || base=$(dirname "$(dirname "$CKPT")")
  MODEL=${EXPORT:-$base/export}
  if [ -f "$MODEL/config.json" ] && [ -z "$(find -L "$CKPT" -newer "$MODEL/config.json" -print -quit)" ]; then
    echo "[$(date +%T)] $MODEL is newer than $CKPT: serving it as it is (delete it to export again)"
  else  # into a folder of its own, then moved into place: a job still reading the old export is not cut short
    tmp="$MODEL.tmp.$$"; rm -rf "$tmp"
    "$PY" -m megatron_ring.cli export --ckpt "$CKPT" --out "$tmp" ${TOKENIZER:+--tokenizer "$TOKENIZER"} ${DTYPE:+--dtype "$DTYPE"}
    rm -rf "$MODEL.old.$$"; [ -e "$MODEL" ] && mv "$MODEL" "$MODEL.old.$$"; mv "$tmp" "$MODEL"; rm -rf "$MODEL.old.$$"
  fi
fi
if [ "${ALLOW_LONG_CONTEXT:-0}" = 1 ] && [ -z "${CONTEXT:-}" ]; then
  echo "serve.sh: ALLOW_LONG_CONTEXT=1 needs the context too (CONTEXT=32768 for Ring-lite's RL length)" >&2; exit 2
fi
key=(); [ -n "${API_KEY:-}" ] && key=(--api-key "$API_KEY")
gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpus=$(nvidia-smi -L | wc -l); fi
if [ "$gpus" -gt 0 ] && "${SGLANG_PYTHON:-$PY}" -c 'import sglang' 2>/dev/null; then
  echo "[$(date +%T)] SGLang on $gpus GPU(s): $MODEL as $NAME on :$PORT"
  ctx=(); [ -n "${CONTEXT:-}" ] && ctx=(--context-length "$CONTEXT")
  [ "${ALLOW_LONG_CONTEXT:-0}" = 1 ] && ctx+=(--allow-beyond-positions)
  "$PY" -m serving.sglang --model-path "$MODEL" --host "${HOST:-0.0.0.0}" --port "$PORT" --tp-size "${TP:-auto}" --gpus "$gpus" --ep-size "${EP:-1}" \
    ${SERVE_DTYPE:+--dtype "$SERVE_DTYPE"} "${ctx[@]}" --reasoning-parser deepseek-r1 --served-model-name "$NAME" "${key[@]}" &
else
  echo "[$(date +%T)] no GPU/SGLang: the CPU server: $MODEL as $NAME on :$PORT"
  "$PY" -m serving.openai_server --model "$MODEL" --host "${HOST:-0.0.0.0}" --port "$PORT" --served-model-name "$NAME" "${key[@]}" &
fi
SERVER=$!
UI_PID=
if [ "${UI:-0}" = 1 ]; then
  "$PY" -m serving.chat_ui --endpoint "http://127.0.0.1:$PORT/v1" --host "${HOST:-0.0.0.0}" --port "${UI_PORT:-7860}" \
    ${API_KEY:+--api-key "$API_KEY"} ${UI_AUTH:+--auth "$UI_AUTH"} &
  UI_PID=$!
fi
trap 'kill -TERM $SERVER $UI_PID 2>/dev/null || true' TERM INT EXIT
wait "$SERVER"
