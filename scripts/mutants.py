"""Planted bugs and the tests that must catch them: ``bash scripts/mutants.sh [ID ...]``.

Each entry of ``tests/mutants.yaml`` names a file, an exact text in it and its replacement (the planted bug), and
the tests that claim to guard against it. For each, the tree is copied to a scratch folder (tracked and untracked
files, no venv), the bug is planted there, and the tests run against the copy (it comes first on PYTHONPATH).
A mutant is *caught* when the tests fail. Prints a table planted -> caught by; exit 1 if any survives or a
planted text is no longer in its file (the list must follow the code). ``--jobs N`` (default: 2, the CI machine's
cores) runs N mutants at a time, each in a scratch copy of its own.
"""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run_mutant(m: dict, scratch: Path, jobs: int = 1) -> tuple[str, float, str]:
    target = scratch / m["file"]
    text = target.read_text()
    if text.count(m["find"]) != 1:
        return "STALE", 0.0, f"the planted text occurs {text.count(m['find'])}x in {m['file']} (want 1)"
    target.write_text(text.replace(m["find"], m["replace"]))
    env = {**os.environ, "PYTHONPATH": str(scratch)}
    if jobs > 1:  # N mutants share the cores: one OpenMP thread per process (a team of 2 on a shared core waits at
        env.setdefault("OMP_NUM_THREADS", "1")  # every barrier for its descheduled thread: several times slower)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m["tests"]],
                       cwd=scratch, env=env, capture_output=True, text=True, timeout=m.get("timeout", 1800))
    target.write_text(text)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return ("caught" if r.returncode != 0 else "SURVIVED"), time.time() - t0, last


def main(argv: list[str]) -> int:
    jobs = 2
    if argv[:1] == ["--jobs"]:
        jobs, argv = int(argv[1]), argv[2:]
    mutants = yaml.safe_load((ROOT / "tests" / "mutants.yaml").read_text())
    if argv:
        unknown = set(argv) - {m["id"] for m in mutants}
        if unknown:
            raise SystemExit(f"mutants: no such id in tests/mutants.yaml: {sorted(unknown)}")
        mutants = [m for m in mutants if m["id"] in argv]
    todo: queue.Queue = queue.Queue()
    for i, m in enumerate(mutants):
        todo.put((i, m))
    rows: dict[int, tuple] = {}
    lock = threading.Lock()
    t_all = time.time()

    def worker():
        with tempfile.TemporaryDirectory(prefix="mutants-") as d:
            scratch = Path(d)
            copy_tree(scratch)
            where = subprocess.run([sys.executable, "-c", "import megatron_ring; print(megatron_ring.__file__)"],
                                   cwd=scratch, env={**os.environ, "PYTHONPATH": str(scratch)}, capture_output=True,
                                   text=True).stdout
            if not where.startswith(str(scratch)):
                raise SystemExit(f"mutants: megatron_ring imports from {where!r}, not the scratch copy")
            while True:
                try:
                    i, m = todo.get_nowait()
                except queue.Empty:
                    return
                verdict, secs, detail = run_mutant(m, scratch, jobs)
                with lock:
                    rows[i] = (m["id"], m["bug"], verdict, " ".join(m["tests"]), f"{secs:.0f}", detail)
                    print(f"{m['id']}: {verdict} ({secs:.0f} s) {detail}", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(jobs, len(mutants))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = sum(r[2] != "caught" for r in rows.values()) + len(mutants) - len(rows)
    print("\n| mutant | planted bug | verdict | caught by | s | tests' last line |\n|---|---|---|---|---|---|")
    for i in sorted(rows):
        print("| " + " | ".join(str(c).replace("|", "/") for c in rows[i]) + " |")
    caught = sum(r[2] == "caught" for r in rows.values())
    print(f"\n{caught} of {len(mutants)} mutants caught ({jobs} at a time, {time.time() - t_all:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
