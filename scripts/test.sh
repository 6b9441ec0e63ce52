#!/usr/bin/env bash
# README command #2: set up the environment and run the test suite, on 2 pytest-xdist workers (TEST_WORKERS=N to
# change; 0 runs everything in one process). Each test module runs whole on one worker (tests/conftest.py groups
# them); the expensive artefacts (tiny checkpoint, data, uninterrupted reference runs) are built once per run.
# The test phase has a wall-time budget, set here and nowhere else: 45 minutes on the 2-core CI machine (CI's hard
# limit is 90 minutes for setup + tests). A run over it fails with the figure, so the suite cannot creep towards the
# limit unnoticed: make the slow tests share their artefacts (tests/conftest.py) instead of raising the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
TEST_BUDGET_S=${TEST_BUDGET_S:-2700}
export VENV=${VENV:-.venv}
bash scripts/setup_env.sh
bash scripts/setup_system.sh
start=$SECONDS
rc=0
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" "${@:-tests}" || rc=$?
took=$((SECONDS - start))
if [ "$took" -gt "$TEST_BUDGET_S" ]; then
  echo "scripts/test.sh: the test phase took ${took} s, over its budget of ${TEST_BUDGET_S} s (set in scripts/test.sh:" \
       "45 min on the 2-core CI machine): find the slow tests in pytest's --durations table and share their" \
       "expensive setup (tests/conftest.py) instead of raising the budget" >&2
  [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
