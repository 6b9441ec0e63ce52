"""The exported model's code under other transformers 5.x releases than the locked one (scripts/hf_compat.sh):
5.0.0, the oldest in the supported range, and 5.23.0, the last release that passes the KV cache as
``past_key_values`` (the lock's 5.24 passes ``cache``). Pinned versions, so the test means the same on any day;
the newest release is checked by ``bash scripts/hf_compat.sh`` without arguments."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["5.0.0", "5.23.0"])
def test_hf_model_tests_pass_under_other_transformers(version):
    r = subprocess.run(["bash", "scripts/hf_compat.sh", version], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    line = [ln for ln in r.stdout.splitlines() if ln.startswith(f"transformers {version}")]
    assert r.returncode == 0 and line and f"(imported {version})" in line[0] and " passed" in line[0], r.stdout + r.stderr
    assert "failed" not in line[0] and "error" not in line[0]
