"""NormHead: the Bailing output layer, logits = h · (W / ‖W‖₂ along the vocab dim)ᵀ.

W is lm_head [vocab, hidden]; the norm is taken over the vocab dimension for each hidden column
(+1e-7) and detached, as in the HF reference. Under vocab-parallel TP each rank holds [vocab/tp,
hidden], so the per-column squared norms are all-reduced over the TP group before dividing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear

EPS = 1e-7


def normalized_head_weight(weight: torch.Tensor, tp_group=None) -> torch.Tensor:
    sq = weight.detach().float().pow(2).sum(dim=0, keepdim=True)
    if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sq, group=tp_group)
    return weight / (sq.sqrt() + EPS).to(weight.dtype)


class NormHeadColumnParallelLinear(ColumnParallelLinear):
    """GPTModel's ``output_layer`` with the NormHead weight normalisation in front of the matmul."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        w = self.weight if weight is None else weight
        group = getattr(self, "tp_group", None) or ps.get_tensor_model_parallel_group()
        return super().forward(input_, weight=normalized_head_weight(w, group),
                               runtime_gather_output=runtime_gather_output)


def apply_norm_head(output_layer: ColumnParallelLinear) -> None:
    """Turn a built output layer into a NormHead in place (parameter names and sharding unchanged)."""
    output_layer.__class__ = NormHeadColumnParallelLinear
    # The fused wgrad path writes into ``weight.main_grad`` of the tensor it is given; ours is a
    # derived tensor, so let autograd carry the gradient back to the parameter instead.
    output_layer.gradient_accumulation_fusion = False
