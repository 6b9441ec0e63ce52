#!/usr/bin/env bash
# Build the project's virtual environment (.venv) from nothing: Python 3.12 + pinned megatron-core/torch.
# Idempotent: a second run only re-checks. Used by both README commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
find_python() {
  for c in "${PYTHON:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { echo "setup_env: Python 3.12 not found (megatron-core 0.19 needs >=3.12); set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "setup_env: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.megatron-ring-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup_env: installing megatron-ring[dev] (torch 2.14.1, megatron-core 0.19.2) ..."
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# AIME24/25 for `megatron-ring eval` ship inside sgl-eval; its pins (openai<3, pillow<12) clash with ours and only its
# data files are read, so it goes in without dependencies
"$VENV/bin/python" -c 'import sgl_eval' 2>/dev/null || "$VENV/bin/python" -m pip install -q --no-deps "sgl-eval==0.1.3"
"$VENV/bin/python" -c 'import megatron.core, torch, transformers; print(f"setup_env: ok (torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__})")'
