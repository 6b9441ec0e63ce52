"""Run under torchrun: many cases in one world, one after the other (one launch instead of one per case: the
interpreter, torch + megatron-core imports and the rendezvous are paid once).

    torchrun --nproc-per-node=N tests/mp/worlds.py PLAN.json REPORT

PLAN is a list of ``{"id": ..., "run": "case_x.py" | "module:megatron_ring.cli", "args": [...]}``: each case runs as
its script would under its own torchrun (``__main__``, its own ``sys.argv``), in the same process group; between
cases megatron's model-parallel state is torn down (``init_distributed`` builds the next case's layout) and its MoE
metrics tracker emptied. Every rank writes ``REPORT.rank<R>.json``: ``{id: "ok" | traceback}``. A case that raises
ends the world at once (the other ranks would wait in its collectives): torchrun then stops every rank, and the
cases after it are absent from the reports (conftest.world says "not run")."""
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

MP = Path(__file__).resolve().parent


def _reset() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    get_moe_layer_wise_logging_tracker().clear()


def main() -> None:
    plan, report = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    done: dict[str, str] = {}
    out = Path(f"{report}.rank{rank}.json")
    for case in plan:
        sys.argv = [case["run"], *map(str, case["args"])]
        try:
            if case["run"].startswith("module:"):
                runpy.run_module(case["run"].split(":", 1)[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(MP / case["run"]), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                done[case["id"]] = f"exited with {e.code}"
        except BaseException:  # noqa: BLE001 (reported, then the world ends)
            done[case["id"]] = traceback.format_exc()
        if case["id"] in done:
            out.write_text(json.dumps(done))
            print(f"[worlds] rank {rank}: case {case['id']} failed:\n{done[case['id']]}", file=sys.stderr, flush=True)
            os._exit(1)
        done[case["id"]] = "ok"
        out.write_text(json.dumps(done))
        _reset()


if __name__ == "__main__":
    main()
