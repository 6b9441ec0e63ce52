import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MP = ROOT / "tests" / "mp"


def cli(*args, check=True, timeout=300):
    """Run the ``megatron-ring`` CLI in a fresh process (megatron's global parallel state stays out
    of the pytest process)."""
    r = subprocess.run([PY, "-m", "megatron_ring.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"megatron-ring {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, *args, timeout=600) -> subprocess.CompletedProcess:
    """``script``: a file in tests/mp, or ``-m module`` style as 'module:megatron_ring.cli'."""
    target = ["-m", script.split(":", 1)[1]] if script.startswith("module:") else [str(MP / script)]
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           *target, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A random tiny HF checkpoint (with tokenizer), its megatron dist checkpoint, and the export back."""
    d = tmp_path_factory.mktemp("tiny")
    cli("init", "--recipe", "tiny", "--out", d / "hf", "--seed", "3")
    cli("convert", "hf-to-mcore", "--hf", d / "hf", "--out", d / "mcore")
    cli("convert", "mcore-to-hf", "--ckpt", d / "mcore", "--out", d / "hf_export", "--tokenizer", d / "hf")
    return {"root": d, "hf": d / "hf", "mcore": d / "mcore", "export": d / "hf_export"}


def read_json(p):
    return json.loads(Path(p).read_text())
