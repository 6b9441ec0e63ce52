#!/usr/bin/env bash
# README command #1: set up and run the main job on the embedded default (tiny model, CPU).
#
# Today the main job is what exists end to end: the embedded default data through the curation pipeline,
# then the Foundation pipeline: a fresh tiny Ring-lite-shaped MoE and its
# tokenizer -> megatron-core dist checkpoint -> loaded at TP2+SP and EP2 on 2 gloo ranks and checked
# against the HF model (logits, loss, greedy tokens) -> exported back to a servable HF folder ->
# chat generation from the export. When the RL stage lands this becomes `sbatch slurm/rl_stage1.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/tiny}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUN"
echo "== 0/5 data: the embedded default sets through the curation pipeline -> $RUN/data"
$PY -m data_tools default "$RUN/data" | $PY -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("seconds","eval_disjoint_from_training","rows","sft_packed_rows","eval_rows")}))'
echo "== 1/5 init: random tiny model + tokenizer -> $RUN/hf_init"
$PY -m megatron_ring.cli init --recipe tiny --out "$RUN/hf_init"
echo "== 2/5 convert hf-to-mcore -> $RUN/mcore"
$PY -m megatron_ring.cli convert hf-to-mcore --hf "$RUN/hf_init" --out "$RUN/mcore"
for layout in "--tp 2" "--ep 2"; do
  echo "== 3/5 verify at $layout (2 ranks, gloo)"
  $PY -m torch.distributed.run --nproc-per-node 2 --master-port "$((29500 + RANDOM % 1000))" \
    -m megatron_ring.cli verify --hf "$RUN/hf_init" --ckpt "$RUN/mcore" $layout --greedy 8 \
    --out "$RUN/verify_${layout// /}.json" 2>&1 | grep -E '^\{|error|Error' || true
  test -s "$RUN/verify_${layout// /}.json"
done
echo "== 4/5 convert mcore-to-hf -> $RUN/hf_export"
$PY -m megatron_ring.cli convert mcore-to-hf --ckpt "$RUN/mcore" --out "$RUN/hf_export" --tokenizer "$RUN/hf_init"
$PY -m megatron_ring.cli check-hf "$RUN/hf_export"
echo "== 5/5 chat with the export (random weights: the text is noise, the plumbing is not)"
$PY - "$RUN/hf_export" <<'PYEOF'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
print("prompt :", tok.decode(ids["input_ids"][0]))
print("reply  :", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
PYEOF
echo "main job done: $RUN"
