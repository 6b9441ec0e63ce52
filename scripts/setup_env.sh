#!/usr/bin/env bash
# Build the project's virtual environment (.venv) from nothing: Python 3.12 + every package at the exact version in
# locks/requirements.lock (what was tested; pyproject.toml keeps the supported ranges). Upgrading is a deliberate step:
# `bash scripts/lock.sh --upgrade` re-resolves the lock against the newest versions in range and runs the tests.
# Idempotent: a second run only re-checks; a changed lock re-installs (pip moves each package to the locked version).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=${LOCK:-locks/requirements.lock}
source scripts/find_python.sh
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { echo "setup_env: Python 3.12 not found (megatron-core 0.19 needs >=3.12); set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "setup_env: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip==26.3" 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
# pip, without this machine's notes about absent local index folders (pipefail keeps pip's exit status)
pip_q() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
stamp="$VENV/.megatron-ring-installed"
want="$(sha256sum "$LOCK" pyproject.toml locks/sglang-side.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_env: installing $LOCK (exact versions: torch 2.14.1, megatron-core 0.19.2, ...) + megatron-ring"
  pip_q install -q -r "$LOCK"
  pip_q install -q --no-deps -e .
  # AIME24/25 for `megatron-ring eval` ship inside sgl-eval; its pins (openai<3, pillow<12) clash with ours and only
  # its data files are read, so it goes in without dependencies (exact version, like the lock)
  pip_q install -q --no-deps "sgl-eval==0.1.3"
  # SGLang's own code, for the tests that run its CPU-importable parts (reasoning parser, request defaults): a side
  # folder, without dependencies (locks/sglang-side.txt), never on the project's import path
  rm -rf "$VENV/sglang-side"
  pip_q install -q --no-deps --target "$VENV/sglang-side" -r locks/sglang-side.txt
  "$VENV/bin/python" scripts/check_lock.py "$LOCK"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import logging, warnings; warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
import megatron.core, torch, transformers; print(f"setup_env: ok (torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__})")'
