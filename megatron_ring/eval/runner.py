"""The paper's sampling protocol against any OpenAI-compatible endpoint (SGLang on GPUs, the CPU server here):
k samples per problem at temperature 1.0 / top-p 0.95, many requests in flight, retries, a progress bar, each
sample graded as it arrives (the RL rewards: Math-Verify, the code sandbox, the GPQA letter) and appended to
``<out>/<label>/<benchmark>/samples.jsonl`` — an interrupted run resumes without repeating a finished sample."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import benchmarks as B
from .metrics import summarize
from ..rewards.pool import CODE_TIMEOUT_S, MATH_TIMEOUT_S

SAMPLING_KEYS = ("model", "temperature", "top_p", "max_tokens", "seed")


@dataclass
class EvalConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "ring-lite"
    label: str | None = None  # the column in the table (default: the model id)
    benchmarks: list[str] = field(default_factory=lambda: ["aime24"])
    k: int = 4  # samples per problem (the paper's AIME@32: k=32)
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 32768
    seed: int = 0
    concurrency: int = 16
    retries: int = 3
    request_timeout: float = 3600.0
    api_key: str | None = None
    limit: int | None = None
    data_dir: str = "runs/tiny/data/eval"
    files: dict[str, str] = field(default_factory=dict)
    out: str = "runs/eval"
    grade_workers: int = 2
    reward_timeout_s: float = MATH_TIMEOUT_S  # wall-time bound of one grading (the pool kills the worker past it)
    code_reward_timeout_s: float = 2 * CODE_TIMEOUT_S  # (its sandbox allows 20 s per test case, RL's 5 s)
    sandbox_unsafe: bool = False
    progress: bool = True

    @property
    def name(self) -> str:
        return (self.label or self.model).replace("/", "_")


class EndpointRefused(RuntimeError):
    """The endpoint answered 4xx: a configuration error that no retry fixes (wrong model id, key, limits)."""


def sample_seed(seed: int, pid: str, s: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}:{s}".encode()).digest()[:4], "little") >> 1


def read_samples(path: Path) -> dict[tuple[str, int], dict]:
    """Finished samples; a last line cut by an interrupt is ignored (it is redone)."""
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(r["id"], r["sample"])] = r
    return done


def _check_settings(bdir: Path, cfg: EvalConfig) -> None:
    want = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
    f = bdir / "settings.json"
    if f.exists():
        have = json.loads(f.read_text())
        diff = {k: (have.get(k), want[k]) for k in SAMPLING_KEYS if have.get(k) != want[k]}
        if diff:
            raise ValueError(f"{bdir}: cached samples were made with other settings "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
                             + "; use another --label or --out, or delete the folder")
    bdir.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(want, indent=2) + "\n")


def _response_text(msg) -> str:
    content = msg.content or ""
    extra = getattr(msg, "model_extra", None) or {}
    reasoning = getattr(msg, "reasoning_content", None) or extra.get("reasoning_content")
    # (a server that split anyway: SGLang's deepseek-r1 parts keep their newlines, the leading <think> dropped)
    return f"<think>{reasoning}</think>{content}" if reasoning else content


async def _one(client, cfg: EvalConfig, row: dict, s: int) -> dict:
    import openai

    t0 = time.perf_counter()
    for attempt in range(cfg.retries + 1):
        try:
            r = await client.chat.completions.create(
                model=cfg.model, messages=[{"role": "user", "content": row["prompt"]}], temperature=cfg.temperature,
                top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=sample_seed(cfg.seed, row["id"], s),
                extra_body={"separate_reasoning": False})  # the raw reply, graded as RL grades it
            break
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            codes = (str(body.get("code")), str((body.get("error") or {}).get("code")))
            if "context_length_exceeded" in codes or "context length" in str(e.message).lower():  # ours / SGLang's
                # the problem does not fit this model's context: a wrong answer, not a broken run
                return {"id": row["id"], "sample": s, "response": "", "finish_reason": "length",
                        "completion_tokens": 0, "seconds": round(time.perf_counter() - t0, 3),
                        "error": f"context_length_exceeded: {e.message}"[:300]}
            if 400 <= e.status_code < 500 and e.status_code not in (408, 409, 429):
                raise EndpointRefused(f"{cfg.base_url} refused {row['id']} with {e.status_code}: {e.message}") from None
            err = e
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            err = e
        await asyncio.sleep(min(30.0, 2.0 ** attempt))
    else:
        raise RuntimeError(f"{row['id']} sample {s}: {type(err).__name__}: {err} (after {cfg.retries} retries)")
    ch = r.choices[0]
    return {"id": row["id"], "sample": s, "response": _response_text(ch.message), "finish_reason": ch.finish_reason,
            "completion_tokens": r.usage.completion_tokens if r.usage else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def grade_job(row: dict, sample: dict) -> dict:
    return {"domain": row["grader"], "response": sample["response"], "answer": row["answer"],
            "test_cases": row["test_cases"], "check": row["check"], "prefix": row["prefix"],
            "entry_point": row["entry_point"], "truncated": sample["finish_reason"] == "length"}


async def _run_benchmark(cfg: EvalConfig, bench: str, pool, client) -> dict:
    rows = B.load(bench, cfg.files, cfg.data_dir, cfg.limit)
    bdir = Path(cfg.out) / cfg.name / bench
    _check_settings(bdir, cfg)
    B.write(rows, bdir / "problems.parquet")
    path = bdir / "samples.jsonl"
    if path.exists():  # a run killed in the middle of a write leaves a partial last line: drop it
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[:data.rfind(b"\n") + 1])
    done = read_samples(path)
    todo = [(r, s) for r in rows for s in range(cfg.k) if (r["id"], s) not in done]
    sem, failures = asyncio.Semaphore(cfg.concurrency), []
    bar = tqdm(total=len(rows) * cfg.k, initial=len(rows) * cfg.k - len(todo), desc=f"{cfg.name}/{bench}",
               unit="sample", disable=not cfg.progress, dynamic_ncols=True)
    right = [sum(1 for (i, s), d in done.items() if s < cfg.k and d["reward"] >= 1)]

    async def work(row, s, f):
        async with sem:
            try:
                smp = await _one(client, cfg, row, s)
            except RuntimeError as e:
                failures.append(str(e))
                return
        if "error" in smp:
            smp.update(reward=0.0, reason="context_length_exceeded")
        else:
            rew = await asyncio.wrap_future(pool.submit(grade_job(row, smp)))
            smp.update(reward=rew.value, reason=rew.reason)
        f.write(json.dumps(smp) + "\n")
        f.flush()
        right[0] += smp["reward"] >= 1
        bar.update(1)
        bar.set_postfix(correct=f"{right[0] / max(bar.n, 1):.3f}")

    with open(path, "a", encoding="utf-8") as f:
        tasks = [asyncio.create_task(work(r, s, f)) for r, s in todo]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            bar.close()
    if failures:
        raise RuntimeError(f"{bench}: {len(failures)} samples failed (rerun to resume); first: {failures[0]}")
    return report_benchmark(cfg, bench, rows, read_samples(path))


def report_benchmark(cfg: EvalConfig, bench: str, rows: list[dict], samples: dict) -> dict:
    per = {r["id"]: [samples[(r["id"], s)]["reward"] for s in range(cfg.k)] for r in rows}
    out = {"benchmark": bench, "label": cfg.name, "endpoint": cfg.base_url,
           "settings": {k: getattr(cfg, k) for k in (*SAMPLING_KEYS, "k", "limit")},
           "metrics": summarize(per),
           "mean_completion_tokens": _mean([samples[(r["id"], s)]["completion_tokens"] for r in rows
                                             for s in range(cfg.k)]),
           "truncated": sum(samples[(r["id"], s)]["finish_reason"] == "length" for r in rows for s in range(cfg.k)),
           "context_exceeded": sum("error" in samples[(r["id"], s)] for r in rows for s in range(cfg.k)),
           "samples": [{**samples[(r["id"], s)], "prompt": r["prompt"]} for r in rows for s in range(cfg.k)]}
    (Path(cfg.out) / cfg.name / f"{bench}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 1) if xs else None


async def _run(cfg: EvalConfig) -> dict[str, dict]:
    import openai

    from megatron_ring.rewards import RewardPool
    from megatron_ring.rewards.sandbox import SandboxLimits

    client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "EMPTY", max_retries=0,
                                timeout=cfg.request_timeout)
    results = {}
    with RewardPool(cfg.grade_workers, SandboxLimits(cpu_seconds=10, wall_seconds=20.0),
                    allow_unsafe=cfg.sandbox_unsafe, timeout_s=cfg.reward_timeout_s,
                    code_timeout_s=cfg.code_reward_timeout_s) as pool:
        try:
            for bench in cfg.benchmarks:
                results[bench] = await _run_benchmark(cfg, bench, pool, client)
        finally:
            await client.close()
    return results


def run(cfg: EvalConfig) -> dict[str, dict]:
    """Sample, grade and report every benchmark of ``cfg``; then rebuild ``<out>/results.{md,csv,png}``."""
    from .report import write_table

    for b in cfg.benchmarks:  # fail on a bad benchmark name or file before any request
        B.load(b, cfg.files, cfg.data_dir, cfg.limit)
    if cfg.k < 1 or cfg.concurrency < 1:
        raise ValueError("k and concurrency must be >= 1")
    results = asyncio.run(_run(cfg))
    Path(cfg.out, cfg.name, "config.json").write_text(json.dumps(asdict(cfg) | {"api_key": None}, indent=2) + "\n")
    write_table(cfg.out)
    return results
