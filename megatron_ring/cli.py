"""``megatron-ring`` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_recipes(a):
    from .config import list_recipes, load_recipe

    if a.get:  # one value by dotted path, e.g. stages.rl.engine (for shell scripts)
        v = load_recipe(a.get[0]).to_dict()
        for part in a.get[1].split("."):
            if not isinstance(v, dict) or part not in v:
                raise ValueError(f"recipe {a.get[0]}: no {a.get[1]}")
            v = v[part]
        print(v if not isinstance(v, (dict, list)) else json.dumps(v))
    elif a.name:
        print(json.dumps(load_recipe(a.name).to_dict(), indent=2))
    else:
        print("\n".join(list_recipes()))


def _note_ignored(cfg_path) -> None:
    """The config fields accepted but ignored (no effect on the network), said once per command."""
    from .model.hf_config import load_hf_config, map_hf_config

    note = map_hf_config(load_hf_config(cfg_path)).ignored_note()
    if note:
        print(f"note: {note}", file=sys.stderr)


def _cmd_init(a):
    from .init_model import init_hf_checkpoint

    if a.config:
        _note_ignored(a.config)
    print(init_hf_checkpoint(a.out, a.recipe, a.seed, config=a.config))


def _hide_gpus() -> None:
    """Conversions run on the CPU (16.8B parameters do not fit one GPU): hide CUDA before anything initialises it."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _cmd_convert(a):
    _hide_gpus()
    from .convert.run import hf_to_mcore_checkpoint, mcore_to_hf_checkpoint

    if a.direction == "hf-to-mcore":
        _note_ignored(a.hf)
        out = hf_to_mcore_checkpoint(a.hf, a.out, dtype=a.dtype)
    else:
        out = mcore_to_hf_checkpoint(a.ckpt, a.out, tokenizer_dir=a.tokenizer, dtype=a.dtype)
    print(f"wrote {out}")


def _cmd_export(a):
    """A training checkpoint (or a run dir: its selected, else latest) → a servable HF folder."""
    _hide_gpus()
    from pathlib import Path

    from .config import load_recipe
    from .convert.run import mcore_to_hf_checkpoint
    from .rl.config import resolve_start

    ckpt = resolve_start(a.ckpt)
    tok = a.tokenizer
    if tok is None:  # the tokenizer the checkpoint's recipe trained with
        meta = json.loads((ckpt / "megatron_ring.json").read_text())
        try:
            stages = load_recipe(meta.get("recipe", "tiny")).stages
        except Exception:  # noqa: BLE001 — an unknown recipe: fall back below
            stages = {}
        cands = [st.get("tokenizer") for st in stages.values() if isinstance(st, dict)] + ["runs/tiny/data/tokenizer"]
        tok = next((c for c in cands if c and (Path(c) / "tokenizer.json").exists()), None)
        if tok is None:
            raise ValueError(f"{ckpt}: no tokenizer found for its recipe; pass --tokenizer DIR")
    out = mcore_to_hf_checkpoint(ckpt, a.out, tokenizer_dir=tok, dtype=a.dtype)
    print(f"exported {ckpt} -> {out} (tokenizer {tok})")


def _cmd_check_hf(a):
    from .convert.hf_io import read_hf_state
    from .convert.mapping import verify_hf_state
    from .model.hf_config import load_hf_config

    _note_ignored(a.path)  # (maps the config: refuses what is not implemented, naming the field)
    cfg = load_hf_config(a.path)
    state = read_hf_state(a.path)
    verify_hf_state(state, cfg)
    print(f"{a.path}: {len(state)} tensors, exactly the set SGLang's bailing_moe loader reads")


def _cmd_verify(a):
    from .convert.verify import verify

    r = verify(a.hf, a.ckpt, a.tp, a.pp, a.ep, a.dispatcher, a.greedy, a.out)
    if r and not r["ok"]:
        raise ValueError(f"megatron and HF disagree: max abs diff {r['max_abs_diff']:.3g}")


def _cmd_plan(a):
    """Per-rank GPU memory of a training recipe; exit 1 (naming the largest term) when it does not fit."""
    import yaml

    from .config import load_recipe
    from .config.recipe import RECIPE_DIR
    from .model.hf_config import load_hf_config
    from .model.memory import GiB, recipe_plan

    recipe = load_recipe(a.recipe)
    hf, where = recipe.hf_config, f"recipe {recipe.name}"
    if a.config:
        hf, where = load_hf_config(a.config), a.config
    elif not hf:  # a training recipe: the architecture of the model recipe it is (eventually) based on
        from pathlib import Path

        p = Path(a.recipe) if Path(a.recipe).suffix else RECIPE_DIR / f"{a.recipe}.yaml"
        while not hf:
            base = (yaml.safe_load(p.read_text()) or {}).get("base")
            if not base:
                raise ValueError(f"recipe {recipe.name} names no architecture: pass --config CONFIG_JSON")
            hf, where, p = load_recipe(base).hf_config, f"recipe {base}", RECIPE_DIR / f"{base}.yaml"
    p = recipe_plan(recipe, hf, a.gpus, a.gpu_mem, flash=not a.local_attention, prompt_tokens=a.prompt_tokens)
    print(f"model: {where}\n{p.table()}")
    if not p.fits:
        big = p.largest()
        raise ValueError(f"does not fit: {p.total / GiB:.1f} GiB per rank > {a.gpu_mem:g} GiB; the largest term is "
                         f"{big} ({p.terms[big] / GiB:.1f} GiB)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-ring", description=__doc__,
                                epilog="--verbose (any command): show every library notice (default: known-harmless "
                                       "ones are summarised in one line)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("select", help="entropy-based SFT checkpoint selection: megatron-ring select --help")
    sub.add_parser("rl", help="C3PO RL stage: megatron-ring rl --recipe rl_stage1_tiny --help")
    sub.add_parser("rollouts", help="sample+score K responses per prompt (input of data_tools difficulty)")
    sub.add_parser("rl-plot", help="Fig. 7-style panels of RL runs")
    sub.add_parser("sft", help="distillation SFT: megatron-ring sft --recipe sft_distill_tiny --help")
    sub.add_parser("preflight", help="(every rank) GPUs per step, weight-sync address, one launch per node: "
                   "sbatch slurm/preflight.sh")
    sub.add_parser("submit", help="a stage as a submitit job (Slurm, else local): megatron-ring submit --help")
    sub.add_parser("eval", help="benchmarks at the paper's protocol against an OpenAI endpoint: megatron-ring eval --help")
    sub.add_parser("data", help="data curation steps: megatron-ring data <step> --help (same as python -m data_tools)")

    s = sub.add_parser("recipes", help="list recipes, or print one")
    s.add_argument("name", nargs="?")
    s.add_argument("--get", nargs=2, metavar=("RECIPE", "KEY"), help="print one value, e.g. rl_stage1_tiny stages.rl.out")
    s.set_defaults(fn=_cmd_recipes)

    s = sub.add_parser("init", help="write a randomly initialised HF checkpoint (+ tokenizer) for a recipe")
    s.add_argument("--recipe", default="tiny")
    s.add_argument("--config", help="a HF config.json (file or folder) instead of the recipe's, used as is")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_init)

    s = sub.add_parser("convert", help="HF safetensors <-> megatron-core dist checkpoint")
    s.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    s.add_argument("--hf", help="HF checkpoint folder (hf-to-mcore)")
    s.add_argument("--ckpt", help="megatron-ring checkpoint folder (mcore-to-hf)")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", help="tokenizer folder to ship with the export")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("export", help="a training checkpoint or run dir -> a servable HF folder (SGLang / CPU server)")
    s.add_argument("--ckpt", required=True, help="a checkpoint, or a run dir (its selected, else latest checkpoint)")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", help="default: the one named by the checkpoint's recipe")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("verify", help="(under torchrun) megatron at a layout vs HF on the same weights")
    s.add_argument("--hf", required=True)
    s.add_argument("--ckpt", required=True)
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--pp", type=int, default=1)
    s.add_argument("--ep", type=int, default=1)
    s.add_argument("--dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    s.add_argument("--greedy", type=int, default=0, help="also compare N greedy tokens")
    s.add_argument("--out", help="write the JSON report here")
    s.set_defaults(fn=_cmd_verify)

    s = sub.add_parser("plan", help="per-rank GPU memory of a training recipe (refused when it does not fit)")
    s.add_argument("--recipe", required=True)
    s.add_argument("--gpus", type=int, required=True, help="GPUs of the training job")
    s.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU (default 80)")
    s.add_argument("--config", help="the model's config.json (default: the recipe's, or its base recipe's)")
    s.add_argument("--prompt-tokens", type=int, default=1024, help="RL: longest prompt (default 1024)")
    s.add_argument("--local-attention", action="store_true", help="unfused attention (no Transformer Engine)")
    s.set_defaults(fn=_cmd_plan)
    s = sub.add_parser("check-hf", help="verify a HF folder holds exactly the tensors its config implies")
    s.add_argument("path")
    s.set_defaults(fn=_cmd_check_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import quiet

    verbose, argv = quiet.verbose_requested(sys.argv[1:] if argv is None else argv)
    quiet.install(verbose)  # known library notices in one line (--verbose: all of them)
    if argv[:1] == ["data"]:  # megatron-ring data <step> ... == python -m data_tools <step> ...
        from data_tools.__main__ import main as data_main

        return data_main(argv[1:])
    if argv[:1] == ["select"]:
        from .select.entropy import main as select_main

        return select_main(argv[1:])
    if argv[:1] == ["rl"]:  # under torchrun for several ranks
        from .rl.cli import main as rl_main

        return rl_main(argv[1:])
    if argv[:1] == ["rollouts"]:
        from .rl.rollout_stats import main as rollouts_main

        return rollouts_main(argv[1:])
    if argv[:1] == ["rl-plot"]:
        from .rl.plot import main as plot_main

        return plot_main(argv[1:])
    if argv[:1] == ["eval"]:
        from .eval.cli import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["submit"]:  # a stage (or slurm/*.sh) as a submitit job: Slurm, else a local process
        from .launch import main as submit_main

        return submit_main(argv[1:])
    if argv[:1] == ["preflight"]:  # under torchrun on every rank (sbatch slurm/preflight.sh)
        from .preflight import main as preflight_main

        return preflight_main(argv[1:])
    if argv[:1] == ["sft"]:  # under torchrun for several ranks
        from .sft.trainer import main as sft_main

        return sft_main(argv[1:])
    a = build_parser().parse_args(argv)
    if a.cmd == "convert":
        need = "hf" if a.direction == "hf-to-mcore" else "ckpt"
        if getattr(a, need) is None:
            print(f"megatron-ring convert {a.direction}: --{need} is required", file=sys.stderr)
            return 2
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"megatron-ring {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
