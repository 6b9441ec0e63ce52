"""CPU dev mode for megatron-core — the ONE fenced module holding every CPU monkeypatch.

megatron-core assumes CUDA in a handful of places. When (and only when) CUDA is absent, ``enable()``
patches exactly those places so that *unmodified* megatron-core runs on CPU with the gloo backend
(DP, TP+SP, EP with alltoall/allgather dispatchers, PP). With CUDA present ``enable()`` does nothing.

Every patch is listed in ``PATCHES`` with the reason; ``enable()`` is idempotent.
"""
from __future__ import annotations

import logging

import torch

_ENABLED = False
PATCHES: list[str] = []  # human-readable record of what was patched (for logs and tests)


def cuda_present() -> bool:
    return torch.cuda.is_available()


def _record(what: str) -> None:
    PATCHES.append(what)


def enable(force: bool = False) -> bool:
    """Patch megatron-core for CPU. Returns True if patches are active. No-op when CUDA is present."""
    global _ENABLED
    if _ENABLED:
        return True
    if cuda_present() and not force:
        return False
    _patch_rng()
    _patch_streams()
    _patch_current_device()
    _patch_device_literals()
    _patch_torch_norm_sequence_parallel()
    _patch_all_to_all_split_sizes()
    _patch_tensor_type_strings()
    _patch_distopt_torch_adam_step()
    _ENABLED = True
    return True


def _patch_rng() -> None:
    """The CUDA RNG tracker: emulate the per-device generator with the CPU default generator.

    Inside ``tracker.fork(name)`` the CPU generator holds that tracker's state, so dropout / init in
    TP regions draw from the tracker stream exactly as they would on GPU."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, which stays a lazy no-op)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # fork() warns whenever the CPU stream advances inside it — on CPU that is the intended behaviour.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda rec: "CPU RNG state changed within GPU RNG context" not in rec.getMessage()
    )
    _record("rng: CUDA RNG tracker state -> CPU default generator")


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so every wait is already done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``; one shared instance, so 'side stream' checks see the same."""

    _instance = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, other):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        return None


def _patch_streams() -> None:
    """CUDA streams/events used by the MoE alltoall dispatcher (DtoH copies of split sizes)."""
    import contextlib

    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.default_stream = lambda device=None: _CpuStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    _record("streams: torch.cuda.Stream/Event/stream/current_stream/synchronize -> synchronous CPU stand-ins")


def _patch_current_device() -> None:
    """``torch.cuda.current_device()`` is used as the *device argument* of tensor factories and ``.to()``
    (rotary embeddings, masks, dispatcher buffers); on CPU it names the CPU device."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    _record("device: torch.cuda.current_device() -> torch.device('cpu')")


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like",
              "ones_like", "full_like", "rand", "randn", "randint", "randperm", "linspace", "eye",
              "as_tensor", "empty_strided")


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):  # a CUDA ordinal
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


def _patch_device_literals() -> None:
    """``device="cuda"`` literals in tensor factories (masks, optimizer scalars, clip_grads, schedules,
    dist_checkpointing exchange) and ``Tensor.cuda()`` calls: both mean "the accelerator", i.e. the CPU."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        factory.__cpu_compat_wrapped__ = fn
        return factory

    # torch's device context manager (``with torch.device("meta")``) recognises factories by identity in a cached
    # set built on first use: build it from the real functions before they are wrapped, else meta-device model
    # construction (the streaming converter's) silently allocates on the CPU
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not hasattr(fn, "__cpu_compat_wrapped__"):
            setattr(torch, name, wrap(fn))
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kw: self
    _record("device literals: torch factories map device='cuda' -> cpu; Tensor.cuda() -> self")


def _patch_torch_norm_sequence_parallel() -> None:
    """The torch-norm fallback (no TE/apex) refuses ``sequence_parallel``. Under SP a norm is still a
    per-token op; only its weight gradient must be summed over TP ranks, which megatron's
    ``finalize_model_grads`` does for params tagged ``sequence_parallel`` — so build the norm and tag it."""
    import copy

    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return orig_new(cls, config, hidden_size, eps, **kwargs)
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        norm = orig_new(cls, cfg, hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)
    _record("norm: torch RMSNorm/LayerNorm under sequence_parallel (weights tagged for TP grad all-reduce)")


def _patch_all_to_all_split_sizes() -> None:
    """The alltoall dispatcher passes split sizes as numpy arrays (moved off the GPU early); the gloo
    binding of ``all_to_all_single`` accepts only lists of Python ints."""
    import torch.distributed as dist

    orig = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *a, **kw):
        as_list = lambda s: None if s is None else [int(x) for x in s]  # noqa: E731
        return orig(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *a, **kw)

    dist.all_to_all_single = all_to_all_single
    _record("alltoall: split sizes -> list[int] for gloo all_to_all_single")


def _patch_tensor_type_strings() -> None:
    """Optimizers and clip_grads assert ``param.type() == 'torch.cuda.FloatTensor'`` (and Half/BFloat16).
    ``Tensor.type()`` *without arguments* answers with the CUDA type name for CPU tensors; calls with
    a dtype argument (conversions) are untouched."""
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and ".cuda." not in name else name
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    _record("type strings: Tensor.type() reports torch.cuda.<T>Tensor for CPU tensors")


def _patch_distopt_torch_adam_step() -> None:
    """Without apex/TE the distributed optimizer runs torch's Adam, whose per-parameter state holds a ``step``
    tensor; loading a fully reshardable checkpoint copies every state tensor from the checkpoint's entries,
    which (rightly) carry no ``step``: KeyError 'step' (megatron-core 0.19.2, distrib_optimizer.py:1223). The
    step count is restored separately (from the parameter groups); the copy skips the keys it was not given."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        held = {k: state.pop(k) for k in [k for k in state if k not in tensors and k != "param"]}
        try:
            return orig(self, model_param, tensors)
        finally:
            state.update(held)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _record("distributed optimizer: loading state skips torch Adam's per-parameter step (restored separately)")


_SHM_STARTED = False


def share_cpu_tensors_by_file() -> None:
    """CPU tensors for a CPU server on this machine (the IPC weight transport without CUDA): torch's ``file_system``
    sharing strategy. Its ``torch_shm_manager`` daemon, started at the first share, lives as long as a server holds
    the memory and inherits our stderr: a caller reading our output through a pipe (``rl ... | tee log``,
    ``subprocess.run(capture_output=True)``) would never see it end. Started here with stderr on /dev/null."""
    import os
    import sys

    global _SHM_STARTED
    if _SHM_STARTED:
        return
    torch.multiprocessing.set_sharing_strategy("file_system")
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        torch.zeros(1).share_memory_()  # (starts the manager; its stdout is a pipe of its own)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    _SHM_STARTED = True
