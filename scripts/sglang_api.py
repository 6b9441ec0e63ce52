"""Snapshot the request fields of the pinned SGLang release (what our client sends and the CPU server accepts).

    .venv/bin/python scripts/sglang_api.py [--version 0.5.23] [--wheel PATH]

Downloads the SGLang wheel without dependencies (it pins its own torch; nothing is installed), reads the request
classes from ``sglang/srt/managers/io_struct.py`` and ``sglang/srt/sampling/sampling_params.py`` with ``ast``
(no import), and writes ``tests/data/sglang_api.json``: per class, each field and whether it has a default.
tests/test_transport_parts.py checks every payload we build, and the CPU server's request models, against it. Run it
when the ``gpu`` extra's SGLang pin moves."""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CLASSES = {
    "sglang/srt/managers/io_struct.py": ["GenerateReqInput", "InitWeightsUpdateGroupReqInput",
                                         "UpdateWeightsFromDistributedReqInput", "UpdateWeightsFromTensorReqInput",
                                         "UpdateWeightFromDiskReqInput", "ReleaseMemoryOccupationReqInput",
                                         "ResumeMemoryOccupationReqInput", "AbortReq", "BaseReq", "BeginWeightUpdateReqInput",
                                         "EndWeightUpdateReqInput"],
    "sglang/srt/sampling/sampling_params.py": ["SamplingParams"],
}
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sglang_api.json"


def fields(src: str, name: str) -> dict[str, bool]:
    """Annotated class attributes -> has a default (a dataclass / msgspec Struct's fields)."""
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            out = {}
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    out[st.target.id] = st.value is not None
            if name == "SamplingParams" and not out:  # a plain class: the __init__ keyword arguments
                init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
                a = init.args
                defaults = [None] * (len(a.args) - len(a.defaults)) + list(a.defaults)
                out = {x.arg: d is not None for x, d in zip(a.args, defaults) if x.arg != "self"}
            return out
    raise SystemExit(f"class {name} not found")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.5.23")
    ap.add_argument("--wheel", help="a downloaded sglang wheel (default: pip download --no-deps)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        wheel = a.wheel
        if not wheel:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", td,
                            f"sglang=={a.version}"], check=True)
            wheel = next(Path(td).glob("sglang-*.whl"))
        z = zipfile.ZipFile(wheel)
        out = {"sglang": a.version, "classes": {}}
        for path, names in CLASSES.items():
            src = z.read(path).decode()
            for n in names:
                out["classes"][n] = fields(src, n)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({sum(map(len, out['classes'].values()))} fields of {len(out['classes'])} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
