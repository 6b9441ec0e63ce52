"""``megatron-ring select``: for each checkpoint, sample responses (temperature 1.0) to a prompt set and
measure the mean per-token entropy of the policy's full next-token distribution along its own samples —
the quantity RL starts from. Lower starting entropy means earlier RL collapse (paper: epoch 1 0.49,
epoch 5 0.35, epoch 9 0.27), so the pick is a checkpoint inside the window; among those, the best
validation accuracy when given, else the highest entropy. Writes a table, a plot and a ``selected``
pointer next to ``latest`` that the RL stage reads."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import torch


@torch.no_grad()
def sample_entropies(model, tok, prompts: list[str], max_new_tokens: int) -> tuple[dict, torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Sample one response per prompt (temperature 1.0, no truncation) with the KV cache. Returns the encoded
    prompts, the generated ids [b, T], the entropy (nats) of p(. | prefix) at each generated position [b, T] and
    the positions that count [b, T] (up to and including the first EOS)."""
    from ..sft.heldout import encode_chat

    enc = encode_chat(tok, prompts)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                         top_k=0, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [b, T, V]
    ent = -(logp.exp() * logp).sum(-1)
    gen = out.sequences[:, enc["input_ids"].shape[1]:]
    ended = (gen == tok.eos_token_id).int().cumsum(1)
    valid = (ended == 0) | ((ended == 1) & (gen == tok.eos_token_id))
    return enc, gen, ent, valid


@torch.no_grad()
def token_entropy(hf_dir: str | Path, prompts: list[str], max_new_tokens: int = 128, seed: int = 0,
                  batch_size: int = 32) -> float:
    """Mean entropy (nats) of p(. | prefix) over every sampled token up to and including EOS."""
    from ..sft.heldout import load_chat_model

    tok, model = load_chat_model(hf_dir)
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for s in range(0, len(prompts), batch_size):
        _, _, ent, valid = sample_entropies(model, tok, prompts[s:s + batch_size], max_new_tokens)
        total += float(ent[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)


def served_entropy(urls: list[str], hf_dir: str | Path, prompts: list[str], max_new_tokens: int = 128,
                   seed: int = 0) -> float:
    """The same quantity through rollout servers (SGLang on GPUs, ``serving/native.py`` on CPU): their weights are
    swapped to ``hf_dir`` (``/update_weights_from_disk``; the servers must see the path), one response per prompt is
    sampled at temperature 1 with its log-probs, and the entropy is estimated as −mean log p of the sampled tokens
    (up to and including EOS): E_{x~p}[−log p(x)] is the entropy of p at every position, so this is unbiased for
    the in-process figure, without the full distribution (SGLang returns the sampled tokens' log-probs)."""
    from ..rl.rollout import SamplingParams, chat_prompt_ids
    from ..rl.sglang_engine import SGLangEngine
    from ..tokenizer.tiny import load_tokenizer

    tok = load_tokenizer(hf_dir)
    eng = SGLangEngine(urls, {}, None, "disk")
    eng.wait_ready()
    eng.load_from_disk(hf_dir)
    ids = chat_prompt_ids(tok, [{"prompt": p} for p in prompts])
    rs = eng.generate(ids, 1, SamplingParams(max_new_tokens, 1.0, 1.0, seed))
    lps = [lp for r in rs for lp in r.logprobs]
    return -sum(lps) / max(len(lps), 1)


def choose(entries: list[dict], window: tuple[float, float]) -> tuple[Optional[dict], str]:
    lo, hi = window
    inside = [e for e in entries if lo <= e["entropy"] <= hi]
    if inside:
        if all(e.get("accuracy") is not None for e in inside):
            best = max(inside, key=lambda e: (e["accuracy"], e["entropy"]))
            return best, f"inside [{lo}, {hi}]: best validation accuracy among {len(inside)}"
        return max(inside, key=lambda e: e["entropy"]), f"inside [{lo}, {hi}]: highest entropy among {len(inside)}"
    best = min(entries, key=lambda e: min(abs(e["entropy"] - lo), abs(e["entropy"] - hi)))
    return None, f"no checkpoint inside [{lo}, {hi}]; nearest is {best['checkpoint']} ({best['entropy']:.3f})"


def _checkpoints(run: Path) -> list[Path]:
    d = run / "checkpoints"
    found = sorted(p for p in d.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not found:
        raise FileNotFoundError(f"{d}: no iter_* checkpoints")
    return found


def select_checkpoints(run: str | Path, prompts_parquet: str | Path, tokenizer_dir: str | Path,
                       window: tuple[float, float] = (0.3, 0.5), eval_parquet: str | Path | None = None,
                       limit: int = 64, max_new_tokens: int = 128, seed: int = 0, out: str | Path | None = None,
                       sglang_urls: list[str] | None = None) -> dict:
    """``sglang_urls``: measure through these rollout servers (``served_entropy``) instead of in this process."""
    from ..convert.run import mcore_to_hf_checkpoint
    from ..sft.heldout import answer_accuracy, served_accuracy

    run = Path(run)
    out = Path(out) if out else run / "selection"
    out.mkdir(parents=True, exist_ok=True)
    prompts = [r["prompt"] for r in pq.read_table(str(prompts_parquet), columns=["prompt"]).to_pylist()[:limit]]
    from ..scalars import Progress

    entries, cks = [], _checkpoints(run)
    progress = Progress("select", len(cks), every_s=0)
    for k, ck in enumerate(cks):
        progress.phase(f"measuring {ck.name}")
        meta = json.loads((ck / "megatron_ring.json").read_text())
        with tempfile.TemporaryDirectory(dir=out) as td:  # (under the run: servers on other nodes see it)
            hf = Path(td) / "hf"
            mcore_to_hf_checkpoint(ck, hf, tokenizer_dir=tokenizer_dir)
            ent = (served_entropy(sglang_urls, hf, prompts, max_new_tokens, seed) if sglang_urls
                   else token_entropy(hf, prompts, max_new_tokens, seed))
            e = {"checkpoint": ck.name, "iteration": meta.get("iteration"), "epoch": meta.get("epoch"), "entropy": ent}
            if not eval_parquet:
                e["accuracy"] = None
            elif sglang_urls:  # (the servers hold this checkpoint since its entropy)
                e["accuracy"] = served_accuracy(sglang_urls, hf, eval_parquet, limit, max_new_tokens)["accuracy"]
            else:
                e["accuracy"] = answer_accuracy(hf, eval_parquet, limit=limit, max_new_tokens=max_new_tokens)["accuracy"]
        entries.append(e)
        print(json.dumps(e), flush=True)
        progress.step(k + 1, {"checkpoint": ck.name, "entropy": e["entropy"]})
    progress.close()
    pick, why = choose(entries, window)
    if pick is not None:
        (run / "checkpoints" / "selected").write_text(pick["checkpoint"] + "\n")
    report = {"window": list(window), "entries": entries, "selected": pick and pick["checkpoint"], "why": why}
    (out / "selection.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = ["| checkpoint | iteration | epoch | entropy | accuracy | in window | selected |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        acc = "" if e["accuracy"] is None else f"{e['accuracy']:.3f}"
        rows.append(f"| {e['checkpoint']} | {e['iteration']} | {e['epoch']} | {e['entropy']:.3f} | {acc} | "
                    f"{'yes' if window[0] <= e['entropy'] <= window[1] else 'no'} | "
                    f"{'**yes**' if pick and e is pick else ''} |")
    (out / "selection.md").write_text("\n".join(rows) + f"\n\n{why}\n")
    _plot(entries, window, pick, out / "selection.png")
    return report


def _plot(entries, window, pick, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["iteration"] for e in entries]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhspan(window[0], window[1], color="tab:green", alpha=0.15, label=f"window {window[0]}–{window[1]}")
    ax.plot(x, [e["entropy"] for e in entries], "o-", color="tab:blue", label="token entropy")
    if pick is not None:
        ax.plot([pick["iteration"]], [pick["entropy"]], "*", ms=16, color="tab:red", label=f"selected {pick['checkpoint']}")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("mean token entropy (nats)")
    if any(e["accuracy"] is not None for e in entries):
        ax2 = ax.twinx()
        ax2.plot(x, [e["accuracy"] or 0 for e in entries], "s--", color="tab:orange", label="val accuracy")
        ax2.set_ylabel("validation accuracy")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("entropy-based checkpoint selection")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="megatron-ring select")
    ap.add_argument("--run", required=True, help="SFT run folder (with checkpoints/iter_*)")
    ap.add_argument("--prompts", required=True, help="Parquet with a 'prompt' column (e.g. RL stage-1 prompts)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--eval", help="held-out Parquet with prompt/answer for the accuracy column")
    ap.add_argument("--window", type=float, nargs=2, default=(0.3, 0.5))
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sglang-urls", nargs="*", help="measure through these rollout servers (SGLang on GPUs; "
                                                       "python -m serving.native on CPU) instead of in this process")
    a = ap.parse_args(argv)
    r = select_checkpoints(a.run, a.prompts, a.tokenizer, tuple(a.window), a.eval, a.limit, a.max_new_tokens,
                           sglang_urls=a.sglang_urls)
    print(r["why"])
    return 0
