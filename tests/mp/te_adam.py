"""A stand-in for Transformer Engine's FusedAdam with the semantics megatron-core meets on a GPU
(transformer_engine/pytorch/optimizers/fused_adam.py), for CPU worlds: Adam's step count lives in each parameter
group (``group["step"]``, +1 per ``step()``; a group without parameters keeps none), the per-parameter state holds
only ``exp_avg`` / ``exp_avg_sq``, and ``state_dict()`` / ``load_state_dict()`` map every state name through
``name_to_dtype_map`` (an unknown name, e.g. a ``step`` tensor, is a KeyError, as TE's ``get_unscaled_state`` /
``set_scaled_state`` raise). The update is AdamW's (``adam_w_mode``), as TE computes it.

``install()`` makes megatron-core build it where it would build TE's (``megatron.core.optimizer.Adam`` and the
module flags ``USING_PYTORCH_OPTIMIZER`` / ``HAVE_APEX_OR_TE`` / ``USING_TE_OPTIMIZER`` as a TE import sets them)."""
import math

import torch


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                 capturable=False, **kw):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            if not g["params"]:
                continue
            g["step"] = g.get("step", 0) + 1
            (b1, b2), t, lr, wd = g["betas"], g["step"], g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st, grad = self.state[p], p.grad
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                if self.adam_w_mode:
                    p.mul_(1 - lr * wd)
                else:
                    grad = grad.add(p, alpha=wd)
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(g["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    def _names(self, sd: dict) -> None:
        for v in sd["state"].values():
            for name in v:
                self.name_to_dtype_map[name]  # noqa: B018 (TE: dtype = self.name_to_dtype_map[state_name])

    def state_dict(self):
        sd = super().state_dict()
        self._names(sd)
        return sd

    def load_state_dict(self, state_dict):
        self._names(state_dict)
        super().load_state_dict(state_dict)


def install() -> None:
    import megatron.core.optimizer as mo
    import megatron.core.optimizer.distrib_optimizer as do

    mo.Adam, mo.USING_PYTORCH_OPTIMIZER = FusedAdam, False
    do.HAVE_APEX_OR_TE, do.USING_TE_OPTIMIZER = True, True
