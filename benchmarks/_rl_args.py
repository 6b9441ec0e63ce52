"""What the RL benchmarks share: the start checkpoint and data of a tiny run (defaults: the README's main job)."""
from __future__ import annotations

import argparse


def rl_run_parser(**defaults: int) -> argparse.ArgumentParser:
    """--recipe --init --prompts-file --tokenizer, plus an int flag per keyword (name=default)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="rl_stage1_tiny")
    ap.add_argument("--init", default="runs/tiny/sft")
    ap.add_argument("--prompts-file", default="runs/tiny/data/rl_stage1/4_filtered.parquet")
    ap.add_argument("--tokenizer", default="runs/tiny/data/tokenizer")
    for name, value in defaults.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    return ap
