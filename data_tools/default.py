"""``python -m data_tools default``: generate the embedded default sets and run them through the real
pipeline (ingest -> dedup -> decontaminate against the held-out splits -> quality filter -> mix ->
tokenize+pack -> stats). The held-out splits are checked disjoint from training by the dedup and
decontamination steps themselves (both must remove nothing)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .decontam import decontaminate
from .dedup import dedup
from .filters import quality_filter
from .ingest import ingest
from .mix import RING_LITE_SFT_MIX, mix
from .pack import pack
from .stats import stats
from .synth import rl_row, sft_row, take, unique_items

SIZES = {"eval": {"math": 200, "code": 100, "science": 100},
         "rl_stage1": {"math": 4000}, "rl_stage2": {"code": 1000, "science": 1000},
         "sft": 20000}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def generate_raw(out: Path, seed: int = 0, sizes: dict = SIZES) -> dict[str, Path]:
    streams = {d: unique_items(d, seed) for d in ("math", "code", "science", "other")}
    paths = {}
    for split in ("eval", "rl_stage1", "rl_stage2"):
        for dom, n in sizes[split].items():
            rows = [rl_row(it, i, split) for i, it in enumerate(take(streams[dom], n))]
            if split == "eval":
                paths[f"eval_{dom}"] = _jsonl(out / "raw" / f"eval_{dom}.jsonl", rows)
            else:
                paths.setdefault(split, []).extend(rows)
    for split in ("rl_stage1", "rl_stage2"):
        paths[split] = _jsonl(out / "raw" / f"{split}.jsonl", paths[split])
    sft = []
    for dom, pct in RING_LITE_SFT_MIX.items():
        n = round(sizes["sft"] * pct / 100)
        sft += [sft_row(it, i) for i, it in enumerate(take(streams[dom], n))]
    paths["sft"] = _jsonl(out / "raw" / "sft.jsonl", sft)
    return paths


def build_default(out: str | Path, seed: int = 0, seq_len: int = 512, sizes: dict = SIZES,
                  progress: bool = False) -> dict:
    from megatron_ring.tokenizer import build_tiny_tokenizer

    t0 = time.perf_counter()
    out = Path(out)
    raw = generate_raw(out, seed, sizes)
    tok_dir = out / "tokenizer"
    build_tiny_tokenizer(512, tok_dir)
    evals = []
    reports: dict[str, dict] = {}
    for dom in sizes["eval"]:
        reports[f"eval_{dom}"] = ingest(raw[f"eval_{dom}"], out / "eval" / f"{dom}.parquet", "rl", progress)
        evals.append(out / "eval" / f"{dom}.parquet")
    plan = {"sft": ("sft", out / "sft"), "rl_stage1": ("rl", out / "rl_stage1"), "rl_stage2": ("rl", out / "rl_stage2")}
    for name, (kind, d) in plan.items():
        r = reports.setdefault(name, {})
        r["ingest"] = ingest(raw[name], d / "1_ingested.parquet", kind, progress)
        # templated questions that differ in one number sit at Jaccard ~0.75 on word shingles: distinct
        # problems, so the synthetic sets dedup at 0.9 (0.8 is the default for natural text)
        r["dedup"] = dedup(d / "1_ingested.parquet", d / "2_dedup.parquet", threshold=0.9, progress=progress)
        r["decontaminate"] = decontaminate(d / "2_dedup.parquet", d / "3_decontam.parquet", evals, n=13,
                                           progress=progress)
        r["filter"] = quality_filter(d / "3_decontam.parquet", d / "4_filtered.parquet", kind, progress=progress)
    s = reports["sft"]
    s["mix"] = mix(out / "sft" / "4_filtered.parquet", out / "sft" / "5_mixed.parquet", progress=progress)
    s["pack"] = pack(out / "sft" / "5_mixed.parquet", out / "sft" / "packed.parquet", tok_dir, seq_len=seq_len,
                     progress=progress)
    for name in ("sft", "rl_stage1", "rl_stage2"):
        final = out / name / ("5_mixed.parquet" if name == "sft" else "4_filtered.parquet")
        reports[name]["stats"] = stats(final, out / "stats" / name, tokenizer=tok_dir, title=f"embedded default: {name}")
    # the held-out check: decontamination (13-grams, exact match for shorter questions) removes nothing
    disjoint = all(reports[n]["decontaminate"]["rows_removed"] == 0 for n in plan)
    summary = {"out": str(out), "seed": seed, "seconds": round(time.perf_counter() - t0, 2),
               "eval_disjoint_from_training": disjoint,
               "rows": {n: reports[n]["filter"]["rows_kept"] for n in plan},
               "near_duplicates_removed": {n: reports[n]["dedup"]["rows_removed"] for n in plan},
               "sft_packed_rows": s["pack"]["packed_rows"], "sft_fill": s["pack"]["fill"],
               "eval_rows": {d: reports[f"eval_{d}"]["rows_kept"] for d in sizes["eval"]},
               "files": {"sft_packed": str(out / "sft" / "packed.parquet"),
                         "rl_stage1": str(out / "rl_stage1" / "4_filtered.parquet"),
                         "rl_stage2": str(out / "rl_stage2" / "4_filtered.parquet"),
                         "eval": [str(e) for e in evals], "tokenizer": str(tok_dir),
                         "plots": [str(out / "stats" / f"{n}.png") for n in plan]}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not disjoint:
        raise RuntimeError(f"held-out splits overlap training: see the dedup/decontam reports under {out}")
    return summary
