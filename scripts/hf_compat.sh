#!/usr/bin/env bash
# The exported model's code (megatron_ring/hf/) against other transformers releases than the locked one: for each
# version, transformers and the dependencies pip resolves for it (tokenizers, huggingface-hub, ...) go into a
# throw-away folder (.hf-compat/VERSION; the venv is not touched) placed before the venv on PYTHONPATH, and the HF
# model tests run there (generate() == a no-cache argmax loop, greedy and batched with left padding; the cache under
# both names; refusals).
#   bash scripts/hf_compat.sh                  # the oldest supported (5.0.0), 5.23.0 (last `past_key_values`
#                                              # release), and the newest 5.x on the index
#   bash scripts/hf_compat.sh 5.20.2 5.24.0    # chosen versions
# Prints one line per version; exit 1 if any fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null || exit 1
PY=.venv/bin/python
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
  newest=$($PY -m pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p' | tr ',' '\n' \
           | tr -d ' ' | grep -E '^5\.[0-9]+\.[0-9]+$' | head -1)
  versions=(5.0.0 5.23.0 ${newest:-})
fi
fail=0
for v in "${versions[@]}"; do
  dir=.hf-compat/$v
  if [ ! -f "$dir/.ok" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    # (pip's note that the venv's sgl-eval pins another pillow is about the venv, not this folder)
    if $PY -m pip install -q --target "$dir" "transformers==$v" >"$dir.log" 2>&1; then touch "$dir/.ok"
    else echo "transformers $v: install failed (see $dir.log)"; fail=1; continue; fi
  fi
  got=$(PYTHONPATH="$dir" $PY -c 'import transformers; print(transformers.__version__)' 2>/dev/null)
  out=$(PYTHONPATH="$dir" $PY -m pytest -q -p no:cacheprovider tests/test_hf_model.py 2>&1 | tail -1)
  echo "transformers $v (imported $got): $out"
  case "$out" in *failed*|*error*|"") fail=1 ;; esac
  [ "$got" = "$v" ] || fail=1
done
exit $fail
