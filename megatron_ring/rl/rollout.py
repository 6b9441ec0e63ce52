"""Rollout engines behind one small interface: ``generate`` K sampled responses per prompt with their
log-probs, ``transport()`` (how the trainer's weights reach it after every step), ``health``.

``InProcessEngine`` is the CPU / test engine: the exported HF model (``BailingMoeForCausalLM``, our modeling
code) in the trainer's process, KV-cached sampling with temperature / top-p (``sample_batch``, which the CPU
server ``serving/native.py`` shares). It receives weights as HF-named buckets (``InProcessTransport``) from the
same in-memory gather that feeds SGLang, so the weight sync and the train/rollout log-prob mismatch are exercised
on CPU as on a GPU cluster. ``SGLangEngine`` (``sglang_engine.py``) drives SGLang servers, or the CPU ones."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Rollout:
    prompt_index: int  # which prompt of the step (responses of one prompt are adjacent)
    prompt_ids: list[int]
    response_ids: list[int]  # including the stop token when it stopped
    logprobs: list[float]  # the engine's log-prob of each response token (temperature-scaled)
    finish_reason: str  # "stop" | "length"
    text: str = ""
    reward: float = 0.0
    reward_reason: str = ""
    extra: dict = field(default_factory=dict)


def chat_prompt_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """One user turn per prompt row, the assistant turn opened (the chat template), as token ids."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False) for r in rows]


class Interrupted(Exception):
    """A generation given up because ``should_stop()`` said so (preemption): the step is redone after a restart."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sp: SamplingParams,
                 should_stop: Callable[[], bool] | None = None) -> list[Rollout]:
        """``should_stop``: polled while generating; when it turns true the engine gives up (``Interrupted``)."""

    def transport(self):  # the weight transport (rl/transport.py) that updates this engine
        ...

    def before_training(self) -> None: ...  # after a rollout: colocated servers give their memory back

    def health(self) -> bool: ...


class InProcessEngine:
    def __init__(self, hf_config: dict, tokenizer, batch_size: int = 64):
        from ..hf.configuration_bailing_moe import BailingMoeConfig
        from ..hf.modeling_bailing_moe import BailingMoeForCausalLM

        cfg = BailingMoeConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "auto_map")})
        self.model = BailingMoeForCausalLM(cfg).float().eval()
        self.tok, self.batch_size, self.version = tokenizer, batch_size, -1
        torch.set_flush_denormal(True)  # CPU: denormal activations after RL updates slow decoding several-fold
        self.eos = hf_config.get("eos_token_id")
        self.pad = hf_config.get("pad_token_id", self.eos)

    def transport(self):
        from .transport import InProcessTransport

        return InProcessTransport(self)

    def before_training(self) -> None:
        pass  # (shares nothing with the trainer)

    def update_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> None:
        """A whole HF state at once (every parameter, no other name)."""
        t = self.transport()
        t.begin(version)
        t.bucket(list(hf_state.items()))
        t.end()

    def health(self) -> bool:
        return self.version >= 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sp: SamplingParams,
                 should_stop: Callable[[], bool] | None = None, indices: list[int] | None = None) -> list[Rollout]:
        """Sample k of prompt i is drawn from its own generator seeded ``sp.seed + i * n + k`` (``indices``: the
        prompts' places in the step's batch), as the SGLang path seeds it: a sample does not depend on which batch
        or server it ran in, the K samples of a prompt differ, and a rerun reproduces them."""
        idx = list(range(len(prompts))) if indices is None else indices
        jobs = [(j, p, sp.seed + i * n + k) for j, (i, p) in enumerate(zip(idx, prompts)) for k in range(n)]
        out: list[Rollout] = []
        for s in range(0, len(jobs), self.batch_size):
            out += sample_batch(self.model, self.tok, jobs[s:s + self.batch_size], sp, self.eos, self.pad,
                                should_stop)
        return out


@torch.no_grad()
def sample_batch(model, tok, jobs: list[tuple[int, list[int], int]], sp: SamplingParams, eos: int, pad: int,
                 should_stop: Callable[[], bool] | None = None) -> list[Rollout]:
    """Left-padded batch of (prompt index, prompt ids, seed), KV-cached decode, temperature/top-p sampling, each
    row from its own generator (greedy at temperature 0). ``should_stop`` is asked before the prefill and before
    every token."""
    from ..hf.modeling_bailing_moe import output_cache

    def check(t: int) -> None:  # (before the prefill too: an aborted request does not start another batch)
        if should_stop is not None and should_stop():
            raise Interrupted(f"generation stopped at token {t} of {sp.max_new_tokens}")

    check(0)
    B, L = len(jobs), max(len(p) for _, p, _ in jobs)
    gens = [torch.Generator().manual_seed(seed) for _, _, seed in jobs]
    ids = torch.full((B, L), pad, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for b, (_, p, _) in enumerate(jobs):
        ids[b, L - len(p):], att[b, L - len(p):] = torch.tensor(p), 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
    past, logits = output_cache(out), out.logits[:, -1]
    toks, lps = [], []
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(sp.max_new_tokens):
        check(t)
        if sp.temperature > 0:
            logp = torch.log_softmax(logits.float() / sp.temperature, -1)
            nxt = torch.stack([_sample(logp[b:b + 1], sp.top_p, gens[b])[0] for b in range(B)])
        else:  # greedy (evaluation)
            logp = torch.log_softmax(logits.float(), -1)
            nxt = logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        toks.append(nxt)
        lps.append(logp.gather(-1, nxt[:, None])[:, 0])
        done |= nxt == eos
        if bool(done.all()) or t == sp.max_new_tokens - 1:
            break
        att = torch.cat([att, torch.ones((B, 1), dtype=torch.long)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, cache=past, use_cache=True)
        past, logits = output_cache(out), out.logits[:, -1]
    T, L_ = torch.stack(toks, 1), torch.stack(lps, 1)
    res = []
    for b, (i, p, _) in enumerate(jobs):
        row = T[b].tolist()
        end = row.index(eos) + 1 if eos in row else len(row)
        resp = row[:end]
        res.append(Rollout(i, list(p), resp, L_[b, :end].tolist(), "stop" if eos in resp else "length",
                           text=tok.decode([x for x in resp if x != eos], skip_special_tokens=False) if tok else ""))
    return res


def _sample(logp: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    probs = logp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # the smallest prefix whose mass reaches top_p
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen)
        return si.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
