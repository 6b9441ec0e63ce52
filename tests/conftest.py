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
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
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


def teach_tiny(tiny: dict, chats: list[tuple[str, str]], d: Path, steps: int = 120, lr: float = 3e-3) -> Path:
    """The random tiny model taught ``chats`` [(question, reply)] (plain PyTorch on the HF model), written as a HF
    checkpoint, converted to a megatron checkpoint and exported back by ``megatron-ring convert mcore-to-hf``:
    a servable folder whose greedy replies are the taught ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ring.convert.hf_io import write_hf_checkpoint

    tok = AutoTokenizer.from_pretrained(tiny["export"])
    model = AutoModelForCausalLM.from_pretrained(tiny["export"], trust_remote_code=True, dtype=torch.float32)
    torch.manual_seed(0)
    batch = []
    for q, a in chats:
        p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                    return_dict=False)
        r = tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]
        batch.append((torch.tensor([p + r]), len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, n in batch:
            labels = ids.clone()
            labels[:, :n] = -100
            loss = loss + model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) / len(batch) < 0.05, f"the tiny model did not learn its replies: loss {float(loss):.3f}"
    cfg = json.loads((tiny["export"] / "config.json").read_text())
    write_hf_checkpoint({k: v.detach() for k, v in model.state_dict().items()}, cfg, d / "taught")
    cli("convert", "hf-to-mcore", "--hf", d / "taught", "--out", d / "mcore")
    cli("convert", "mcore-to-hf", "--ckpt", d / "mcore", "--out", d / "export", "--tokenizer", tiny["hf"])
    return d / "export"


def read_json(p):
    return json.loads(Path(p).read_text())
