#!/usr/bin/env bash
# Plant each bug of tests/mutants.yaml in a scratch copy and run the tests that claim to catch it; prints the table
# planted -> caught by (exit 1 if one survives). `bash scripts/mutants.sh ID ...` runs chosen ones. Outside CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null
exec .venv/bin/python scripts/mutants.py "$@"
