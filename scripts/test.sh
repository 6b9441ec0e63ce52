#!/usr/bin/env bash
# README command #2: set up the environment and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_system.sh
exec .venv/bin/python -m pytest "${@:-tests}"
