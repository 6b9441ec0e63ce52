"""The GPU rollout engine: SGLang servers (launched on this allocation or attached by URL), sampling with
log-probs through ``/generate``, and weight sync after every step — ``/update_weights_from_tensor`` when the
servers share the trainer's GPUs (CUDA IPC handles, SGLang's ``MultiprocessingSerializer``), else
``/update_weights_from_disk`` from an HF folder the trainer writes (the always-works path)."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .rollout import Rollout, SamplingParams


def _post(url: str, payload: dict, timeout: float = 3600.0) -> dict | list:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def generate_payload(prompts: list[list[int]], n: int, sp: SamplingParams, indices: list[int] | None = None) -> dict:
    """One request for all prompts × n (SGLang batches and schedules them itself), sampling parameters per sample:
    sample k of prompt i (``indices``: the prompts' places in the step's batch) is seeded ``seed + i * n + k``, so
    the K samples of a prompt differ also under SGLang's deterministic inference, and a rerun reproduces them."""
    indices = list(range(len(prompts))) if indices is None else indices
    ids = [p for p in prompts for _ in range(n)]
    params = [{"temperature": sp.temperature, "top_p": sp.top_p, "max_new_tokens": sp.max_new_tokens,
               "sampling_seed": sp.seed + i * n + k, "skip_special_tokens": False} for i in indices for k in range(n)]
    return {"input_ids": ids, "return_logprob": True, "sampling_params": params}


def parse_generate(out: list[dict], prompts: list[list[int]], n: int, tokenizer=None) -> list[Rollout]:
    res = []
    for j, o in enumerate(out):
        i = j // n
        meta = o["meta_info"]
        lps = meta["output_token_logprobs"]  # [(logprob, token_id, text|None), ...]
        ids = o.get("output_ids") or [t[1] for t in lps]
        fr = meta.get("finish_reason") or {}
        res.append(Rollout(i, list(prompts[i]), list(ids), [float(t[0]) for t in lps],
                           "length" if fr.get("type") == "length" else "stop",
                           text=o.get("text") if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=False)))
    return res


class SGLangEngine:
    def __init__(self, urls: list[str], hf_config: dict, tokenizer=None, colocated: bool = False,
                 sync_dir: str | None = None):
        self.urls, self.cfg, self.tok = [u.rstrip("/") for u in urls], hf_config, tokenizer
        self.colocated, self.sync_dir, self.version = colocated, sync_dir, -1

    def health(self) -> bool:
        from serving.health import healthy

        return all(healthy(u) for u in self.urls)

    def generate(self, prompts: list[list[int]], n: int, sp: SamplingParams) -> list[Rollout]:
        shards = [list(range(k, len(prompts), len(self.urls))) for k in range(len(self.urls))]
        with ThreadPoolExecutor(len(self.urls)) as ex:
            outs = list(ex.map(lambda kv: _post(kv[0] + "/generate",
                                                generate_payload([prompts[i] for i in kv[1]], n, sp, kv[1])),
                               zip(self.urls, shards)))
        res: list[Rollout] = []
        for idx, out in zip(shards, outs):
            for r in parse_generate(out, [prompts[i] for i in idx], n, self.tok):
                r.prompt_index = idx[r.prompt_index]
                res.append(r)
        return sorted(res, key=lambda r: r.prompt_index)

    def update_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> None:
        if self.colocated:
            from sglang.srt.utils import MultiprocessingSerializer

            named = [(k, v.cuda()) for k, v in hf_state.items()]
            blob = MultiprocessingSerializer.serialize(named, output_str=True)
            for u in self.urls:
                r = _post(u + "/update_weights_from_tensor",
                          {"serialized_named_tensors": [blob], "load_format": None, "flush_cache": True})
                if not r.get("success", False):
                    raise RuntimeError(f"{u}: update_weights_from_tensor failed: {r.get('message')}")
        else:
            from ..convert.hf_io import write_hf_checkpoint

            path = Path(self.sync_dir or "weight_sync_hf") / f"v{version:06d}"
            write_hf_checkpoint(hf_state, self.cfg, path, None)
            for u in self.urls:
                r = _post(u + "/update_weights_from_disk", {"model_path": str(path)})
                if not r.get("success", False):
                    raise RuntimeError(f"{u}: update_weights_from_disk failed: {r.get('message')}")
        self.version = version
