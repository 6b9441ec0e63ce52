"""Known-harmless library notices, summarised in one line per process instead of ~27 lines around each result.

What is hidden is listed here, each by its exact text: Transformer Engine / apex absent (the CPU path uses torch
fallbacks), megatron-core's and torch's deprecation notices for APIs this project calls on purpose, torch's notices
about loading a distributed checkpoint in one process, megatron's notices of its rerun state machine and experimental
MiMo config, transformers' notice on ``rope_scaling`` (the published Ling configs carry it and must load as they
are), and "No CUDA runtime is found" on CPU machines. Every other
warning and log line is shown as before; the project's own warnings in one line each. ``--verbose`` on any
``megatron-ring`` command, or ``MEGATRON_RING_VERBOSE=1`` (inherited by torchrun's ranks and Slurm steps), shows
everything. The line printed at exit says what was hidden, by kind and count."""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import warnings
from collections import Counter

ENV = "MEGATRON_RING_VERBOSE"
KNOWN: list[tuple[str, str]] = [  # (kind, regex on the message): nothing else is hidden
    ("TE/apex absent", r"^Transformer Engine and Apex are not installed\. Falling back"),
    ("TE/apex absent", r"^Apex is not installed\. Falling back to Torch Norm"),
    ("TE/apex absent", r"^Transformer Engine is not installed\. Falling back"),
    ("TE/apex absent", r"^No CUDA runtime is found, using CUDA_HOME="),
    ("deprecation", r"^GPTModel IS DEPRECATED\."),
    ("deprecation", r"^MCore's async save is deprecated"),
    ("deprecation", r"^full scope is deprecated\. Use empty cuda_graph_modules"),
    ("deprecation", r"^Please use DTensor instead and we are deprecating ShardedTensor"),
    ("deprecation", r"^`rope_scaling` is deprecated and will be removed"),  # the published Ling configs carry it
    ("megatron notice", r"^MimoModelConfig is experimental"),
    ("megatron notice", r"^Implicit initialization of Rerun State Machine!$"),
    ("megatron notice", r"^RerunStateMachine initialized in mode RerunMode\.DISABLED$"),
    ("torch.distributed.checkpoint", r"^torch\.distributed is disabled, unavailable or uninitialized, assuming"),
    ("torch.distributed.checkpoint", r"^The argument order of load has been changed"),
]
LOGGERS = ["torch.utils.cpp_extension", "megatron.core.models.gpt.gpt_model",  # where the logged ones come from
           "megatron.core.dist_checkpointing.strategies.torch", "megatron.core.rerun_state_machine"]
_PATTERNS = [(kind, re.compile(rx)) for kind, rx in KNOWN]
_OWN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
hidden: Counter = Counter()
_installed = False


def known(message: str) -> str | None:
    """The kind of a known-harmless notice, or None (then it is shown)."""
    for kind, rx in _PATTERNS:
        if rx.search(message):
            return kind
    return None


class _Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            kind = known(record.getMessage())
        except Exception:  # noqa: BLE001 — a malformed record is shown, not hidden
            return True
        if kind:
            hidden[kind] += 1
            return False
        return True


_FILTER = _Filter()


def verbose_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(--verbose given or MEGATRON_RING_VERBOSE=1, argv without --verbose)."""
    rest = [a for a in argv if a != "--verbose"]
    return (len(rest) != len(argv)) or os.environ.get(ENV, "") not in ("", "0"), rest


def install(verbose: bool = False) -> None:
    """Hide the known notices in this process (idempotent); with ``verbose``, show everything in it and in the
    processes it starts."""
    global _installed
    if verbose:
        os.environ[ENV] = "1"
        return
    if _installed:
        return
    _installed = True
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        kind = known(str(message))
        if kind:
            hidden[kind] += 1
        elif os.path.abspath(filename).startswith(_OWN + os.sep) and "site-packages" not in filename:
            print(f"megatron-ring: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    add_log_filter()
    atexit.register(_summary)


def add_log_filter() -> None:
    """The filter on the loggers the known notices come from (before those libraries are imported), and on the
    handlers that exist now (Python's last-resort handler, the root's, torch's own)."""
    targets = [logging.getLogger(n) for n in LOGGERS] + [logging.lastResort] + logging.getLogger().handlers
    for t in targets + logging.getLogger("torch").handlers:
        if t is not None and _FILTER not in t.filters:
            t.addFilter(_FILTER)


def _summary() -> None:
    if hidden:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(hidden.items()))
        cpu = "CPU mode: Transformer Engine/apex absent, torch fallbacks; " if "TE/apex absent" in hidden else ""
        print(f"megatron-ring: {cpu}{sum(hidden.values())} known library notices hidden ({kinds}); "
              f"--verbose shows them", file=sys.stderr)
