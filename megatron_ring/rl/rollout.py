"""Rollout engines behind one small interface: ``generate`` K sampled responses per prompt with their
log-probs, ``transport()`` (how the trainer's weights reach it after every step), ``health``.

``InProcessEngine`` is the CPU / test engine: the exported HF model (``BailingMoeForCausalLM``, our modeling
code) in the trainer's process, KV-cached sampling with temperature / top-p (``sample_batch`` over the decoding core
``hf/decoding.py``, which the CPU servers ``serving/native.py`` and ``serving/openai_server.py`` share). It receives weights as HF-named buckets (``InProcessTransport``) from the
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
        return sample_batch(self.model, self.tok, jobs, sp, self.eos, self.pad, should_stop, self.batch_size)


def sample_batch(model, tok, jobs: list[tuple[int, list[int], int]], sp: SamplingParams, eos: int, pad: int,
                 should_stop: Callable[[], bool] | None = None, max_batch: int | None = None) -> list[Rollout]:
    """(prompt index, prompt ids, seed) jobs decoded by the shared core (``hf/decoding.py``: continuous batching,
    at most ``max_batch`` running, a newcomer joining as a row finishes), temperature/top-p sampling, each row from
    its own generator (greedy at temperature 0). ``should_stop`` is asked before the prefill and before every
    token."""
    from ..hf.decoding import Seq, run_to_end

    def stop(t: int) -> None:
        raise Interrupted(f"generation stopped at token {t} of {sp.max_new_tokens}")

    seqs = [Seq(list(p), sp.max_new_tokens, sp.temperature, sp.top_p, seed, frozenset([eos]), tag=i)
            for i, p, seed in jobs]
    run_to_end(model, pad, seqs, max_batch or len(seqs), should_stop, stop)
    return [as_rollout(s, tok, eos) for s in seqs]


def as_rollout(s, tok, eos: int) -> Rollout:
    """A finished ``hf.decoding.Seq`` (its ``tag``: the prompt index) as a rollout, its text without the eos."""
    return Rollout(s.tag, s.prompt, s.tokens, s.logprobs, "stop" if s.finish == "stop" else "length",
                   text=tok.decode([x for x in s.tokens if x != eos], skip_special_tokens=False) if tok else "")
