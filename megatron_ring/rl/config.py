"""Typed RL stage configuration (``stages.rl`` of a recipe; CLI flags override)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config.recipe import Recipe, _from_dict
from ..rewards.pool import CODE_TIMEOUT_S, MATH_TIMEOUT_S


@dataclass
class RLConfig:
    prompts: str = "runs/tiny/data/rl_stage1/4_filtered.parquet"
    init: str = "runs/tiny/sft"  # a checkpoint, or a run dir: its checkpoints/selected, else checkpoints/latest
    tokenizer: str = "runs/tiny/data/tokenizer"
    out: str = "runs/tiny/rl_stage1"
    steps: int = 40
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps; a rerun continues
    prompts_per_step: int = 16
    samples_per_prompt: int = 8  # K
    max_new_tokens: int = 192  # ling_lite: 24576 (stage 1) / 32768 (stage 2)
    temperature: float = 1.0
    top_p: float = 1.0
    mode: str = "c3po"  # c3po: fixed token budget Φ per DP rank | grpo: every generated token
    loss_agg: Optional[str] = None  # c3po | token-mean | seq-mean-token-mean (default: c3po / seq-mean-token-mean)
    token_budget: int = 8192  # Φ, per data-parallel rank
    drop_uninformative: bool = True  # drop groups whose K rewards are all equal (advantage 0) before the budget
    mini_batches: int = 1  # optimizer steps per RL step (cut from the kept tokens by token count)
    max_tokens_per_microbatch: int = 4096
    clip_eps: float = 0.2
    kl_coef: float = 1e-3  # β
    kl_estimator: str = "k3"
    entropy_coef: float = 5e-4  # α_ent
    lr: float = 3e-6
    lr_warmup_steps: int = 0
    lr_overrides: dict = field(default_factory=dict)  # parameter-name glob -> its own lr (megatron-core param group)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8  # larger values damp the moves of parameters whose RL gradient is mostly noise
    clip_grad: float = 1.0
    tis_cap: Optional[float] = None  # truncated importance sampling cap C (None: off)
    engine: str = "inprocess"  # inprocess | sglang (SGLang servers on GPUs, or serving/native.py's CPU servers)
    sglang_urls: list = field(default_factory=list)
    sglang_router: Optional[str] = None  # URL of SGLang's router in front of sglang_urls (the job scripts start one
    # for more than one server): the samples' /generate requests go there, one per sample
    sglang_colocated: bool = False  # the servers share the trainer's GPUs (weights by CUDA IPC, memory released)
    weight_transport: str = "auto"  # auto (inprocess | ipc when colocated | broadcast) | broadcast | ipc | disk
    weight_bucket_mb: int = 1024  # the weight sync moves at most this much (or one tensor) at a time
    weight_senders: str = "owners"  # broadcast: every rank holding weights sends them (a group each) | stages:
    # one sender per pipeline stage, gathering its stage's pieces (slime's layout: few NCCL groups on the servers'
    # GPUs, each sized after SGLang sized its KV cache) | rank0: rank 0 sends everything
    deterministic_rollouts: bool = True  # the servers run with SGLang's --enable-deterministic-inference and each
    # sample has its own seed: a rerun or a resumed step samples the same; false: faster servers, seeds not sent
    # (SGLang ignores them without the flag), a resumed step samples anew (training stays valid)
    request_timeout_s: Optional[float] = None  # one /generate request may take this long (default: the longer of
    # the router's request timeout and rollout_timeout_minutes)
    server_inflight: int = 8  # concurrent /generate requests per server (one prompt's K samples each)
    rollout_timeout_minutes: int = 240  # how long the other ranks wait for rank 0's rollout (gloo, not NCCL)
    max_prompt_tokens: int = 1024  # longer prompts are refused at start (naming the row)
    context_beyond_positions: bool = False  # allow prompt + max_new_tokens > max_position_embeddings (RoPE has
    # no table limit; SGLang then needs SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1, which the job scripts set)
    rollout_batch_size: int = 64
    reward_workers: int = 2  # 0: one per CPU
    reward_timeout_s: float = MATH_TIMEOUT_S  # wall-time bound of one math/science grading (the pool kills the worker past it)
    code_reward_timeout_s: float = CODE_TIMEOUT_S  # the same for one program against all its test cases
    sandbox_unsafe: bool = False
    eval_sets: list = field(default_factory=lambda: ["runs/tiny/data/eval/math.parquet"])
    eval_limit: int = 200
    eval_k: int = 1  # 1: greedy accuracy; k > 1: avg@k at the rollout temperature (the paper's AIME@32 protocol)
    eval_interval: int = 10  # steps; 0: only at the start and the end
    save_interval: int = 10
    save_every_minutes: float = 0.0  # also save when this long has passed since the last save (0: off)
    keep_last: int = 0  # keep the newest N checkpoints (+ milestones, + what latest/selected name); 0: keep all
    keep_every: int = 0  # milestones: iterations that are multiples of this are always kept
    wandb_project: Optional[str] = None  # Weights & Biases beside TensorBoard (same scalars); None: off
    wandb_mode: Optional[str] = None  # online | offline (default: $WANDB_MODE, else online)

    def __post_init__(self):
        if self.mode not in ("c3po", "grpo"):
            raise ValueError(f"mode {self.mode!r}: expected 'c3po' or 'grpo'")
        if self.loss_agg is None:
            self.loss_agg = "c3po" if self.mode == "c3po" else "seq-mean-token-mean"
        if self.weight_transport not in ("auto", "inprocess", "broadcast", "ipc", "disk"):
            raise ValueError(f"weight_transport {self.weight_transport!r}: expected auto, inprocess, broadcast, ipc "
                             "or disk")
        if self.weight_senders not in ("owners", "stages", "rank0"):
            raise ValueError(f"weight_senders {self.weight_senders!r}: expected owners, stages or rank0")
        if self.loss_agg == "c3po" and self.mode != "c3po":
            raise ValueError("loss_agg 'c3po' (1/Φ) needs mode 'c3po' (the token budget)")


def rl_config(recipe: Recipe, **overrides) -> RLConfig:
    data = dict(recipe.stages.get("rl", {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _from_dict(RLConfig, data, f"recipe {recipe.name}: stages.rl")


class ContextTooLong(ValueError):
    """prompt + max_new_tokens does not fit the model's positions."""


def rollout_context(cfg: RLConfig, hf_config: dict) -> int:
    """The context the rollout servers need: the longest prompt allowed + ``max_new_tokens``, refused (before
    any server starts) where it exceeds the model's ``max_position_embeddings`` without the recipe saying so."""
    need = cfg.max_prompt_tokens + cfg.max_new_tokens
    pos = int(hf_config.get("max_position_embeddings") or 0)
    if pos and need > pos and not cfg.context_beyond_positions:
        raise ContextTooLong(
            f"max_prompt_tokens {cfg.max_prompt_tokens} + max_new_tokens {cfg.max_new_tokens} = {need} tokens "
            f"exceed the model's max_position_embeddings {pos}: lower them, or set stages.rl."
            "context_beyond_positions: true to generate past the configured positions (RoPE extrapolates; the "
            "Ring-lite paper's RL does so with its 16,384-position config at 24K/32K tokens)")
    return need


def client_timeout(cfg: RLConfig) -> float:
    """How long the rollout client waits for one server request: never less than the router gives a request
    (``serving/router.py``) nor than the other ranks wait for the whole rollout."""
    from serving.router import REQUEST_TIMEOUT_S

    return float(cfg.request_timeout_s or max(REQUEST_TIMEOUT_S, cfg.rollout_timeout_minutes * 60))


def transport_kind(cfg: RLConfig) -> str:
    if cfg.weight_transport != "auto":
        return cfg.weight_transport
    if cfg.engine != "sglang":
        return "inprocess"
    return "ipc" if cfg.sglang_colocated else "broadcast"


def resolve_start(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir whose ``checkpoints/selected`` (entropy selection) or
    ``checkpoints/latest`` pointer names one."""
    p = Path(path)
    for ptr in ("selected", "latest"):
        f = p / "checkpoints" / ptr
        if f.exists():
            return f.parent / f.read_text().strip()
    if (p / "megatron_ring.json").exists():
        return p
    raise FileNotFoundError(f"{p}: not a checkpoint and no checkpoints/selected or checkpoints/latest inside "
                            "(run the SFT stage and `megatron-ring select` first)")


def launch_facts(recipe, cfg: RLConfig) -> dict:
    """What the job script needs before it starts the rollout servers, as shell assignments (``rl --print-launch``):
    the resolved start checkpoint, the run dir, the tokenizer and the servers' context (``ContextTooLong`` refuses).
    A start that does not exist yet (a plan printed before the SFT ran) is named as given, with the recipe's model."""
    from ..checkpoint import adopt_architecture

    try:
        start = resolve_start(cfg.init)
        model = adopt_architecture(recipe, start).hf_config
    except FileNotFoundError:  # (its positions unknown until it exists: the recipe's word on going beyond them)
        start, model = Path(cfg.init), recipe.hf_config or {}
    n = rollout_context(cfg, model)
    pos = int(model.get("max_position_embeddings") or 0)
    beyond = n > pos if pos else cfg.context_beyond_positions
    return {"RL_START": str(start), "RL_OUT": str(cfg.out), "RL_TOKENIZER": str(cfg.tokenizer), "RL_CONTEXT": n,
            "RL_BEYOND_POSITIONS": int(beyond), "RL_DETERMINISTIC": int(cfg.deterministic_rollouts),
            "RL_COLOCATED": int(transport_kind(cfg) == "ipc")}
