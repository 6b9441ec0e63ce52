"""Held-out answer accuracy of a checkpoint on an embedded eval split: greedy chat generation with the
exported HF model (KV cache), the last ``\\boxed{...}`` compared with the reference answer after
whitespace normalisation. (Math-Verify grading arrives with the RL rewards; for the integer answers
of the embedded default an exact match is the same thing.)"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    m = BOXED.findall(text)
    return m[-1].strip().replace(" ", "") if m else None


def graded(pred: str | None, answer) -> bool:
    """The held-out grading: the last boxed answer equals the reference, spaces ignored."""
    return pred is not None and pred == str(answer).replace(" ", "")


def load_chat_model(hf_dir: str | Path):
    """(tokenizer padding on the left, fp32 model in eval mode) of an exported HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32).eval()
    return tok, model


def encode_chat(tok, prompts: list[str]) -> dict:
    """One user turn per prompt, the assistant turn opened, left-padded into a batch."""
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]
    return tok(chat, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def answer_accuracy(hf_dir: str | Path, eval_parquet: str | Path, limit: int = 200, max_new_tokens: int = 192,
                    batch_size: int = 50) -> dict:
    tok, model = load_chat_model(hf_dir)
    rows = pq.read_table(str(eval_parquet)).to_pylist()[:limit]
    correct, samples, texts = 0, [], []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        enc = encode_chat(tok, [r["prompt"] for r in chunk])
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for r, o in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(o, skip_special_tokens=True)
            pred = last_boxed(text)
            ok = graded(pred, r["answer"])
            correct += ok
            samples.append({"id": r["id"], "pred": pred, "answer": r["answer"], "ok": bool(ok)})
            texts.append(text)
    return {"accuracy": correct / max(1, len(rows)), "n": len(rows), "samples": samples[:5],
            "preds": [x["pred"] for x in samples], "texts": texts}


def served_accuracy(urls: list[str], tokenizer_dir: str | Path, eval_parquet: str | Path, limit: int = 200,
                    max_new_tokens: int = 192) -> dict:
    """``answer_accuracy`` through rollout servers that already hold the checkpoint's weights (SGLang on GPUs, the
    CPU server here): greedy, the same chat prompts, the same grading."""
    from ..rl.rollout import SamplingParams, chat_prompt_ids
    from ..rl.sglang_engine import SGLangEngine
    from ..tokenizer.tiny import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rows = pq.read_table(str(eval_parquet)).to_pylist()[:limit]
    rs = SGLangEngine(urls, {}, tok, "disk").generate(chat_prompt_ids(tok, rows), 1, SamplingParams(max_new_tokens, 0.0))
    preds = [last_boxed(r.text) for r in rs]
    ok = [graded(p, r["answer"]) for p, r in zip(preds, rows)]
    return {"accuracy": sum(ok) / max(1, len(rows)), "n": len(rows), "preds": preds,
            "texts": [tok.decode(r.response_ids, skip_special_tokens=True) for r in rs]}


def checkpoint_accuracy(ckpt: str | Path, tokenizer_dir: str | Path, eval_parquet: str | Path, **kw) -> dict:
    """Export a megatron-ring checkpoint to a temporary HF folder and measure ``answer_accuracy``."""
    from ..convert.run import mcore_to_hf_checkpoint

    with tempfile.TemporaryDirectory() as td:
        mcore_to_hf_checkpoint(ckpt, Path(td) / "hf", tokenizer_dir=tokenizer_dir)
        return answer_accuracy(Path(td) / "hf", eval_parquet, **kw)
