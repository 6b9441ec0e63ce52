#!/usr/bin/env bash
# Re-resolve locks/requirements.lock (every dependency, direct and transitive, at an exact version) from the ranges
# in pyproject.toml with uv (`uv pip compile`, uv pinned below), for the platform CI and the clusters run on.
#   bash scripts/lock.sh             # after editing pyproject.toml: keep every pin that still fits, add what is new
#   bash scripts/lock.sh --upgrade   # the deliberate upgrade: the newest versions in range, then build a throw-away
#                                    # venv (.venv-upgrade) from the new lock and run the whole test suite in it; the
#                                    # lock is replaced only when the tests pass (else it stays as it was)
# Extra arguments go to pytest (e.g. `bash scripts/lock.sh --upgrade tests/test_hf_model.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
upgrade=0
if [ "${1:-}" = "--upgrade" ]; then upgrade=1; shift; fi
tools=.venv-tools
if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  source scripts/find_python.sh
  py=$(find_python) || { echo "lock: Python 3.12 not found; set PYTHON=" >&2; exit 1; }
  rm -rf "$tools" && "$py" -m venv "$tools" && "$tools/bin/python" -m pip install -q "uv==$UV_VERSION" 2>&1 | { grep -v "is ignored" || true; }
fi
new=locks/requirements.lock.new
cp locks/requirements.lock "$new"   # uv keeps the pins of its output file unless told to upgrade
args=(pip compile pyproject.toml --extra dev --python-version 3.12 --python-platform x86_64-manylinux_2_28
      --no-header --quiet -o "$new")
[ $upgrade -eq 1 ] && args+=(--upgrade)
"$tools/bin/uv" "${args[@]}"
{ echo "# Exact versions of every dependency (what was tested). Made by: bash scripts/lock.sh [--upgrade]"
  echo "# (uv $UV_VERSION: uv pip compile pyproject.toml --extra dev --python-version 3.12 --python-platform x86_64-manylinux_2_28)"
  cat "$new"; } > "$new.tmp" && mv "$new.tmp" "$new"
changes=$(diff <(grep -E '^[A-Za-z0-9]' locks/requirements.lock) <(grep -E '^[A-Za-z0-9]' "$new") | grep -E '^[<>]' || true)
if [ -z "$changes" ]; then echo "lock: no version changes"; rm -f "$new"; exit 0; fi
echo "lock: changes (< old, > new):"; echo "$changes"
if [ $upgrade -eq 0 ]; then mv "$new" locks/requirements.lock; echo "lock: written (run bash scripts/test.sh)"; exit 0; fi
echo "lock: building .venv-upgrade from the new lock and running the tests there ..."
if VENV=.venv-upgrade LOCK="$new" bash scripts/setup_env.sh && bash scripts/setup_system.sh \
   && .venv-upgrade/bin/python -m pytest -q "${@:-tests}"; then
  mv "$new" locks/requirements.lock
  echo "lock: upgraded and tested; commit locks/requirements.lock (then: rm -rf .venv && bash scripts/setup_env.sh)"
else
  echo "lock: the tests failed with the new versions; locks/requirements.lock is unchanged ($new kept to inspect)" >&2
  exit 1
fi
