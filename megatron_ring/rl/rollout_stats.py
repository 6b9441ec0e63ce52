"""``megatron-ring rollouts``: K sampled responses per prompt from a checkpoint, scored by the RL rewards,
written as a rollouts Parquet (id, sample, reward, reason, length, finish_reason, response) — the input of
``data_tools difficulty``, which drops the prompts the policy always or never solves (Ring-lite's
difficulty filter of the RL data) — with a per-prompt pass-rate summary."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

SCHEMA = pa.schema([("id", pa.string()), ("sample", pa.int64()), ("reward", pa.float64()), ("reason", pa.string()),
                    ("length", pa.int64()), ("finish_reason", pa.string()), ("response", pa.string())])


def load_engine(ckpt: str | Path, tokenizer_dir: str | Path, batch_size: int = 64):
    from ..convert.hf_io import read_hf_state
    from ..convert.run import mcore_to_hf_checkpoint
    from ..tokenizer.tiny import load_tokenizer
    from .rollout import InProcessEngine

    tok = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as td:
        mcore_to_hf_checkpoint(ckpt, Path(td) / "hf")
        cfg = json.loads((Path(td) / "hf" / "config.json").read_text())
        eng = InProcessEngine(cfg, tok, batch_size)
        eng.update_weights(read_hf_state(Path(td) / "hf"), 0)
    return eng, tok


def served_engine(ckpt: str | Path, tokenizer_dir: str | Path, urls: list[str], hf_dir: str | Path):
    """Rollout servers (SGLang on GPUs; the CPU server) switched to ``ckpt``: exported to ``hf_dir`` (a path
    the servers can read, in its own dtype) and loaded by ``/update_weights_from_disk``."""
    from ..convert.run import mcore_to_hf_checkpoint
    from ..tokenizer.tiny import load_tokenizer
    from .sglang_engine import SGLangEngine

    tok = load_tokenizer(tokenizer_dir)
    hf = Path(hf_dir).resolve()
    if not (hf / "config.json").exists():
        mcore_to_hf_checkpoint(ckpt, hf, tokenizer_dir=tokenizer_dir)  # (its own dtype: bf16 in training)
    eng = SGLangEngine(urls, {}, tok, "disk")
    eng.wait_ready()
    eng.load_from_disk(hf)
    return eng, tok


def rollout_stats(ckpt, prompts, tokenizer_dir, out, k: int = 8, limit: int | None = None, max_new_tokens: int = 192,
                  temperature: float = 1.0, seed: int = 0, chunk: int = 16, workers: int = 2,
                  shard: tuple[int, int] = (0, 1), sglang_urls: list[str] | None = None) -> dict:
    """``shard=(i, n)``: only chunks i, i+n, i+2n, … of ``chunk`` prompts (n processes side by side;
    ``data_tools difficulty`` takes all their outputs). Each chunk's sampling seed is ``seed`` + its first row,
    so the union of the shards' samples is exactly one unsharded run's. ``sglang_urls``: sample on these servers
    (the checkpoint exported next to ``out``) instead of in this process — the same seeds, the same samples."""
    from ..rewards import RewardPool, reward_job
    from .config import resolve_start
    from .rollout import SamplingParams, chat_prompt_ids

    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    if sglang_urls:
        eng, tok = served_engine(resolve_start(ckpt), tokenizer_dir, sglang_urls, f"{out}.hf")
    else:
        eng, tok = load_engine(resolve_start(ckpt), tokenizer_dir)
    rows = pq.read_table(str(prompts)).to_pylist()[:limit]
    starts = [s for s in range(0, len(rows), chunk) if (s // chunk) % n == i]
    recs = []
    with RewardPool(workers) as pool:
        for s in tqdm(starts, desc=f"rollouts {i}/{n}" if n > 1 else "rollouts", unit="chunk"):
            part = rows[s:s + chunk]
            rs = eng.generate(chat_prompt_ids(tok, part), k, SamplingParams(max_new_tokens, temperature, seed=seed + s))
            jobs = [reward_job(part[r.prompt_index], r.text, r.finish_reason == "length") for r in rs]
            for j, (r, rw) in enumerate(zip(rs, pool.map(jobs))):
                recs.append({"id": part[r.prompt_index]["id"], "sample": j % k, "reward": rw.value, "reason": rw.reason,
                             "length": len(r.response_ids), "finish_reason": r.finish_reason, "response": r.text})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{out}.tmp")
    pq.write_table(pa.Table.from_pylist(recs, schema=SCHEMA), str(tmp))
    tmp.replace(out)  # a killed run leaves no half-written file behind
    by: dict[str, list[float]] = {}
    for r in recs:
        by.setdefault(r["id"], []).append(r["reward"])
    rates = [sum(v) / len(v) for v in by.values()]
    summary = {"prompts": len(by), "samples": len(recs), "mean_reward": sum(r["reward"] for r in recs) / max(len(recs), 1),
               "never_solved": sum(p == 0 for p in rates), "all_solved": sum(p == 1 for p in rates),
               "in_between": sum(0 < p < 1 for p in rates), "out": str(out)}
    return summary


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N")
    return i, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ring rollouts")
    ap.add_argument("--ckpt", required=True, help="a checkpoint or a run dir (its selected/latest pointer)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16, help="prompts generated together")
    ap.add_argument("--shard", type=_shard, default=(0, 1),
                    help="I/N: this process takes every N-th chunk of prompts from chunk I")
    ap.add_argument("--sglang-urls", nargs="*", help="sample on these rollout servers (SGLang on GPUs) instead of "
                                                      "in this process; they load the checkpoint from OUT.hf")
    a = ap.parse_args(argv)
    print(json.dumps(rollout_stats(a.ckpt, a.prompts, a.tokenizer, a.out, a.k, a.limit, a.max_new_tokens,
                                   a.temperature, a.seed, a.chunk, shard=a.shard, sglang_urls=a.sglang_urls)))
    return 0
