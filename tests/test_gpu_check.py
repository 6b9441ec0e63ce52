"""The device check's CPU dry run: scripts/gpu_check.sh --dry-run runs the same code as on a GPU (conversion,
SFT and RL steps of the tiny model and of a narrow Ling-shaped one, logits parity with the HF model, the memory
plan) and prints its table with every check ok."""
import subprocess

from .conftest import ROOT


def test_gpu_check_dry_run(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    for check in ("convert Ling-shaped HF->mcore", "tiny sft step", "tiny rl step", "tiny SFT resume",
                  "Ling-shaped logits", "Ling-shaped sft step", "Ling-shaped rl step"):
        line = next(x for x in table.splitlines() if check in x)
        assert line.rstrip().endswith("| ok |"), line
    assert "FAIL" not in table
