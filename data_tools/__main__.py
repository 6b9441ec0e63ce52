"""``python -m data_tools <step> ...`` (also ``megatron-ring data <step> ...``)."""
from __future__ import annotations

import argparse
import json
import sys


def _ratios(s: str) -> dict[str, float]:
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = p.add_subparsers(dest="step", required=True)

    def step(name: str, help: str):
        s = sub.add_parser(name, help=help)
        s.add_argument("src")
        s.add_argument("dst")
        return s

    s = step("ingest", "JSONL/Parquet/HF datasets folder -> typed Parquet + quarantine")
    s.add_argument("--kind", choices=["sft", "rl"], required=True)

    s = step("dedup", "exact + MinHash-LSH near-duplicate removal")
    s.add_argument("--no-near", action="store_true")
    s.add_argument("--threshold", type=float, default=0.8)
    s.add_argument("--num-perm", type=int, default=128)
    s.add_argument("--shingle", type=int, default=3)

    s = step("decontaminate", "n-gram overlap against benchmark files")
    s.add_argument("--benchmark", action="append", required=True)
    s.add_argument("-n", type=int, default=13)

    s = step("filter", "quality filters (repetition, truncation, LaTeX, images, MC/TF, answerless)")
    s.add_argument("--kind", choices=["sft", "rl"], required=True)

    s = step("difficulty", "drop all-solved / never-solved prompts by rollout pass rate")
    s.add_argument("--rollouts", required=True, nargs="+", help="rollouts Parquet(s): one file or the shards")
    s.add_argument("--drop-unrated", action="store_true")

    s = step("mix", "sample to domain ratios")
    s.add_argument("--ratios", type=_ratios, help="e.g. math=64.5,code=25.5,science=9.2,other=0.8")
    s.add_argument("--total", type=int)
    s.add_argument("--seed", type=int, default=0)

    s = step("pack", "chat template tokenize (loss on assistant) + pack")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--seq-len", type=int, default=2048)

    s = sub.add_parser("stats", help="length histogram + domain mix (PNG, Markdown, JSON)")
    s.add_argument("src")
    s.add_argument("out_prefix")
    s.add_argument("--tokenizer")

    s = sub.add_parser("default", help="generate the embedded default sets through the whole pipeline")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seq-len", type=int, default=512)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.step == "ingest":
            from .ingest import ingest
            r = ingest(a.src, a.dst, a.kind)
        elif a.step == "dedup":
            from .dedup import dedup
            r = dedup(a.src, a.dst, not a.no_near, a.threshold, a.num_perm, a.shingle)
        elif a.step == "decontaminate":
            from .decontam import decontaminate
            r = decontaminate(a.src, a.dst, a.benchmark, a.n)
        elif a.step == "filter":
            from .filters import quality_filter
            r = quality_filter(a.src, a.dst, a.kind)
        elif a.step == "difficulty":
            from .difficulty import difficulty_filter
            r = difficulty_filter(a.src, a.dst, a.rollouts, keep_unrated=not a.drop_unrated)
        elif a.step == "mix":
            from .mix import mix
            r = mix(a.src, a.dst, a.ratios, a.total, a.seed)
        elif a.step == "pack":
            from .pack import pack
            r = pack(a.src, a.dst, a.tokenizer, a.seq_len)
        elif a.step == "stats":
            from .stats import stats
            r = stats(a.src, a.out_prefix, a.tokenizer)
            print(open(str(a.out_prefix) + ".md").read())
        else:
            from .default import build_default
            r = build_default(a.out, a.seed, a.seq_len, progress=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"data_tools {a.step}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in r.items() if k != "table"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
