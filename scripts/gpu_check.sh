#!/usr/bin/env bash
# The device check: megatron-core's CUDA path on one GPU, one table (scripts/gpu_check.py says what it checks).
#   bash scripts/gpu_check.sh            on the device machine (its own torch; megatron-core + PyYAML from the
#                                        carried .device-wheels/, made here by `bash scripts/gpu_check.sh --wheels`)
#   bash scripts/gpu_check.sh --dry-run  the same code on this machine's CPU with tiny sizes (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--wheels" ]]; then  # (here, with network) the pure wheels the device machine lacks
  rm -rf .device-wheels && mkdir -p .device-wheels
  .venv/bin/pip download --no-deps -d .device-wheels --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 "megatron-core==$(grep -oP '^megatron-core==\K.*' locks/requirements.lock)" \
    "pyyaml==$(grep -oP '^pyyaml==\K.*' locks/requirements.lock)"
  ls -la .device-wheels; exit 0
fi
if [[ "${1:-}" == "--dry-run" ]]; then
  bash scripts/setup_env.sh >/dev/null
  exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" .venv/bin/python scripts/gpu_check.py "$@"
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import megatron.core, yaml" 2>/dev/null; then
  "$PY" -m pip install --no-index --no-deps --target .device-site .device-wheels/*.whl >/dev/null
  export PYTHONPATH="$PWD/.device-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
