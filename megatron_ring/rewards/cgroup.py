"""Limits on a sandbox's whole process tree through the kernel's control groups, where this host lets us create
them: cgroup v2 (memory.max, pids.max, cpu.max in a delegated subtree) or the v1 memory / pids / cpu hierarchies.
Rlimits are per process (five children may each use the address-space cap); a cgroup bounds their sum, and its
memory counts what the tree keeps in tmpfs and kernel objects (files, inodes, pipes). Where no controller is
writable, ``SandboxCgroup.create`` returns None and the sandbox says it runs on rlimits only."""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PREFIX = "megatron-ring-sandbox"


def _own_path(controller: str | None) -> str | None:
    """This process's cgroup path in the v2 hierarchy (controller None) or in a v1 controller's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if (controller is None and ctrls == "") or (controller and controller in ctrls.split(",")):
            return path
    return None


def _writable_dir(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK)


def _v2_parent() -> Path | None:
    if not (ROOT / "cgroup.controllers").exists():
        unified = ROOT / "unified"  # hybrid hosts mount v2 beside v1
        if not (unified / "cgroup.controllers").exists():
            return None
        base = unified
    else:
        base = ROOT
    own = _own_path(None)
    if own is None:
        return None
    parent = base / own.lstrip("/")
    try:
        have = set((parent / "cgroup.controllers").read_text().split())
    except OSError:
        return None
    if not {"memory", "pids"} <= have or not _writable_dir(parent):
        return None
    return parent


def _v1_parents() -> dict[str, Path]:
    out = {}
    for ctrl in ("memory", "pids", "cpu"):
        own = _own_path(ctrl)
        if own is None:
            continue
        parent = ROOT / ctrl / own.lstrip("/")
        if _writable_dir(parent) and (parent / "cgroup.procs").exists():
            out[ctrl] = parent
    return out if {"memory", "pids"} <= set(out) else {}


class SandboxCgroup:
    """One cgroup (per controller on v1) per sandbox slot, made on first use and kept (making one costs ~20 ms on
    v1; the slot's lock makes it one run's at a time); ``procs_files`` are what a run's first process joins."""

    def __init__(self, version: int, dirs: dict[str, Path]):
        self.version, self.dirs = version, dirs

    @classmethod
    def available(cls) -> str:
        """'v2', 'v1' or '' (rlimits only), for the sandbox's description."""
        return _layout()[0]

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids: int, cpus: float = 1.0) -> "SandboxCgroup | None":
        """The group ``name`` with these limits (made if missing), or None where no controller is writable."""
        version, parents = _layout()
        if not version:
            return None
        dirs = {}
        for ctrl, parent in parents.items():
            d = parent / f"{PREFIX}-{name}"
            d.mkdir(exist_ok=True)
            dirs[ctrl] = d
        if version == "v2":
            d = dirs["v2"]
            _write(d / "memory.max", memory_bytes)
            _write(d / "memory.swap.max", 0, optional=True)
            _write(d / "pids.max", pids)
            _write(d / "cpu.max", f"{int(cpus * 100000)} 100000", optional=True)
            return cls(2, dirs)
        _v1_memory(dirs["memory"], memory_bytes)
        _write(dirs["pids"] / "pids.max", pids)
        if "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", 100000, optional=True)
            _write(dirs["cpu"] / "cpu.cfs_quota_us", int(cpus * 100000), optional=True)
        return cls(1, dirs)

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def oom_kills(self) -> int:
        """How many processes of the tree the memory limit killed."""
        f = (self.dirs["v2"] / "memory.events") if self.version == 2 else (self.dirs["memory"] / "memory.oom_control")
        try:
            for line in f.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill":
                    return int(v)
        except OSError:
            pass
        return 0

    def clear(self) -> None:
        """Kills whatever is left in the group (nothing, normally: the sandbox's PID namespace is gone)."""
        for d in self.dirs.values():
            for _ in range(200):
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for p in pids:
                    try:
                        os.kill(p, 9)
                    except ProcessLookupError:
                        pass
                time.sleep(0.005)


@functools.lru_cache(maxsize=1)
def _layout() -> tuple[str, dict[str, Path]]:
    """Where this process may make sandbox groups, found once per process: ('v2', {'v2': parent}),
    ('v1', {controller: parent}) or ('', {})."""
    v2 = _v2_parent()
    if v2 is not None and _v2_can_enable(v2):
        return "v2", {"v2": v2}
    v1 = _v1_parents()
    return ("v1", v1) if v1 else ("", {})


def join(procs_files: list[str]) -> None:
    """In the sandbox's first process, before it drops privileges: move itself into the group."""
    me = str(os.getpid()).encode()
    for f in procs_files:
        fd = os.open(f, os.O_WRONLY)
        try:
            os.write(fd, me)
        finally:
            os.close(fd)


def _v2_can_enable(parent: Path) -> bool:
    """Controllers must be enabled for children in the parent's subtree_control (possible only when the parent
    has no processes of its own, or is the root)."""
    try:
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        if {"memory", "pids"} <= enabled:
            return True
        (parent / "cgroup.subtree_control").write_text("+memory +pids")
        return True
    except OSError:
        return False


def _v1_memory(d: Path, limit: int) -> None:
    """v1 wants memory <= memory+swap at every moment: raising a kept group's limit writes memsw first."""
    mem, sw = d / "memory.limit_in_bytes", d / "memory.memsw.limit_in_bytes"
    try:
        raising = limit > int(mem.read_text())
    except (OSError, ValueError):
        raising = False
    order = [(sw, True), (mem, False)] if raising else [(mem, False), (sw, True)]
    for f, optional in order:
        _write(f, limit, optional=optional)


def _write(f: Path, value, optional: bool = False) -> None:
    try:
        f.write_text(str(value))
    except OSError:
        if not optional:
            raise
