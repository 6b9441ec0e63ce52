"""Forward passes over a megatron GPTModel for evaluation: full-vocab logits under any TP/SP/EP/PP,
and plain greedy decoding (the reference the exported HF model's ``generate()`` must equal)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from ..parallel.dist import device, module_device


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def thd_params(lengths: list[int]):
    """megatron's ``PackedSeqParams`` for one THD row of back-to-back segments of these lengths."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last pipeline stage (``None`` on the other stages).
    Every rank of the model-parallel group must call it with the same tokens."""
    was_training = model.training
    model.eval()
    seq = tokens.shape[1]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1 and seq % tp:  # sequence parallel splits the sequence: right-pad (causal, so harmless)
        tokens = torch.nn.functional.pad(tokens, (0, tp - seq % tp), value=0)
    captured: dict[str, torch.Tensor] = {}

    def step(data_iter, chunk):
        t = next(data_iter).to(module_device(chunk))
        out = chunk(t, position_ids_for(t), None)

        def keep(output):
            captured["logits"] = output
            return output.new_zeros(()), {}

        return out, keep

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
    model.train(was_training)
    if not ps.is_pipeline_last_stage():
        return None
    logits = captured["logits"]
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[:, :seq].float()


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding by full re-forward each step (no cache: a reference, not a fast path).
    For PP>1 the chosen tokens are broadcast from the last stage."""
    import torch.distributed as dist

    tokens = prompt.clone()
    for _ in range(max_new_tokens):
        logits = forward_logits(model, tokens)
        if logits is not None:
            nxt = logits[:, -1].argmax(-1)
        else:  # filled by the broadcast from the last stage (on the collective device: NCCL takes CUDA only)
            nxt = torch.zeros(tokens.shape[0], dtype=torch.long, device=device())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        tokens = torch.cat([tokens, nxt[:, None].to(tokens.device)], dim=1)
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
    return tokens
