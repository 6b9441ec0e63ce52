"""A sandbox for untrusted programs (the code reward), built on bubblewrap (Debian/RHEL package `bubblewrap`).

Each program gets its own sandbox, with all its test cases inside it (``_runner.py`` forks one child per test from
a warmed interpreter). The sandbox is:
- its own user namespace, with a **distinct host uid** per concurrent sandbox when the grader runs as root (slots
  held by file locks, uid = ``uid_base`` + slot; one uid for all when not root), no capabilities, no further user
  namespaces (``--disable-userns``);
- its own PID namespace **with its own /proc** (no sibling, no host process visible), IPC, network (loopback only),
  UTS and cgroup namespaces;
- a minimal read-only root: the interpreter and its libraries (``/usr/lib``), a private /dev and /proc, and a
  tmpfs scratch limited in bytes and (as root, mounted by us: bubblewrap's --tmpfs takes no inode count) in files
  — no /etc, no home, no checkout, no data, no shell;
- limits on the whole process tree by cgroup (memory incl. tmpfs and kernel objects, process count, one CPU) where
  the host lets us create one (``cgroup.py``: v2 or v1), and per-process rlimits always (CPU seconds, address
  space, file size, open files, processes): without a cgroup the memory cap is per process, not per tree;
- a wall-clock limit per test (the runner) and per program (here: kills the whole sandbox).

It never raises for anything the program does: each test's result says what happened. Without bubblewrap it
refuses to start unless ``allow_unsafe`` is given (then: the same runner, rlimits only, no isolation)."""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from . import cgroup

RUNNER = Path(__file__).with_name("_runner.py")
UID_BASE = 1_500_000  # host uids of the sandboxes (root only): UID_BASE + slot, outside any login user's range
INSIDE_UID = 65534  # what the program sees (nobody)
SLOTS = 4096
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_PDEATHSIG = 1


class SandboxUnavailable(RuntimeError):
    pass


@dataclass
class SandboxLimits:
    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_bytes: int = 512 << 20
    file_bytes: int = 1 << 20  # also the stdout/stderr cap
    open_files: int = 64
    processes: int = 32
    scratch_bytes: int = 4 << 20
    scratch_files: int = 4096


@dataclass
class RunResult:
    status: str  # ok | runtime_error | timeout | cpu_limit | memory_limit | output_limit | killed | skipped
    returncode: int
    stdout: str
    stderr: str


def _interpreter() -> str:
    """A system interpreter outside any home or checkout (the trainer's venv may live under a private home)."""
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(p, os.X_OK):
            return p
    return sys.executable


class Sandbox:
    def __init__(self, limits: SandboxLimits | None = None, allow_unsafe: bool = False,
                 interpreter: str | None = None, uid_base: int = UID_BASE):
        self.limits = limits or SandboxLimits()
        self.interpreter = os.path.realpath(interpreter or _interpreter())
        self.root = os.geteuid() == 0
        self.uid_base = uid_base
        self.max_seconds: float | None = None  # a cap on one run's whole budget (the reward pool's code bound)
        self.bwrap = shutil.which("bwrap")
        self.probe_error = "bwrap is not on PATH"
        self.isolated = self.bwrap is not None and self._probe()
        if not self.isolated and not allow_unsafe:
            raise SandboxUnavailable(
                "cannot start bubblewrap (`bwrap`, Debian/RHEL package bubblewrap) with user, PID, network and IPC "
                "namespaces here, so untrusted code would run with the host's view; refusing. Install bubblewrap "
                "(and allow unprivileged user namespaces; the interpreter must be readable by every user: "
                f"{self.interpreter}), or pass allow_unsafe=True (--sandbox-unsafe) to run it anyway. "
                f"({self.probe_error})")
        self.cgroups = cgroup.SandboxCgroup.available() if self.isolated and self.root else ""

    def describe(self) -> str:
        if not self.isolated:
            return "UNSAFE: no isolation, rlimits only"
        uids = f"distinct host uids from {self.uid_base}" if self.root else "one host uid (not root)"
        tree = f"cgroup {self.cgroups} (memory, pids, cpu) on the whole tree" if self.cgroups else \
            "no writable cgroup: per-process rlimits only (memory cap per process, not per tree)"
        return f"bubblewrap: user/pid/ipc/net/uts/cgroup namespaces, own /proc, read-only minimal root, {uids}, {tree}"

    # -- running ---------------------------------------------------------------------------------------------------
    def run(self, program: str, stdin: str = "") -> RunResult:
        return self.run_many(program, [stdin])[0]

    def run_many(self, program: str, inputs: list[str], stop_on_error: bool = False) -> list[RunResult]:
        """The program on every input, in one sandbox (a fresh process per input): a result per input. With
        ``stop_on_error`` the inputs after the first run that does not exit 0 are not run (status "skipped")."""
        lim = self.limits
        limits = asdict(lim)
        if not self.root:  # RLIMIT_NPROC counts the real user's processes: leave room above what runs now
            limits["processes"] += _user_process_count()
        req = {"program": program, "inputs": list(inputs), "limits": limits, "isolated": self.isolated,
               "stop_on_error": stop_on_error}
        with _Slot() as slot, tempfile.TemporaryDirectory(prefix="mr-sandbox-", dir=_shared_tmp()) as td:
            uid = self.uid_base + slot.n if (self.isolated and self.root) else None
            group = None
            if self.cgroups:
                group = cgroup.SandboxCgroup.create(f"slot{slot.n}", lim.memory_bytes + (48 << 20), lim.processes + 4)
                oom0 = group.oom_kills()
            scratch, runner = None, _runner_fd() if self.isolated else None
            if self.isolated:
                if self.root:  # a tmpfs with a file-count limit, mounted in bubblewrap's own mount namespace
                    scratch = os.path.join(td, "scratch")
                    os.mkdir(scratch)
                    os.chmod(td, 0o711)
                cmd = self._bwrap_cmd(runner, scratch)
            else:
                req["work"] = os.path.join(td, "run")
                cmd = [self.interpreter, "-I", str(RUNNER)]
            try:
                p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=td, start_new_session=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                     pass_fds=(runner,) if self.isolated else (),
                                     preexec_fn=_enter(group.procs_files if group else [], uid,
                                                       scratch and (scratch, lim.scratch_bytes, lim.scratch_files)))
                try:
                    out, err = p.communicate(json.dumps(req).encode(), timeout=self._budget(len(inputs)))
                except subprocess.TimeoutExpired:
                    _kill_group(p.pid)
                    out, err = p.communicate()
                oom = group.oom_kills() - oom0 if group else 0
            finally:
                if runner is not None:
                    os.close(runner)
                if group is not None:
                    group.clear()
        return self._results(out, err, len(inputs), oom)

    def _budget(self, n: int) -> float:
        own = n * (self.limits.wall_seconds + 0.5) + 10.0
        return own if self.max_seconds is None else min(own, self.max_seconds)

    def _bwrap_cmd(self, runner: int, scratch: str | None = None) -> list[str]:
        lim = self.limits
        tmp = ["--bind", scratch, "/tmp"] if scratch else ["--size", str(lim.scratch_bytes), "--tmpfs", "/tmp"]
        # --as-pid-1: the runner is the PID namespace's init (no bubblewrap reaper that its monitor would not wait
        # for); the kernel ends every process of the namespace, and reaps it, before the runner's exit is reported
        cmd = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1",
               "--new-session", "--cap-drop", "ALL", "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID),
               "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "LANG", "C.UTF-8"]
        for d in _library_dirs(self.interpreter):
            cmd += ["--ro-bind", d, d]
        cmd += ["--ro-bind", self.interpreter, self.interpreter, "--symlink", self.interpreter, "/usr/bin/python3",
                "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--ro-bind-data", str(runner), "/sandbox/runner.py",  # a copy: the package may sit in a private home
                "--proc", "/proc", "--dev", "/dev",
                *tmp,
                "--size", str(1 << 20), "--tmpfs", "/dev/shm",
                "--chdir", "/tmp", self.interpreter, "-I", "/sandbox/runner.py"]
        return cmd

    def _probe(self) -> bool:
        try:
            with _Slot() as slot:
                uid = self.uid_base + slot.n if self.root else None
                runner = _runner_fd()
                try:
                    p = subprocess.run(self._bwrap_cmd(runner)[:-3] + [self.interpreter, "-I", "-c", "print(6 * 7)"],
                                       capture_output=True, timeout=20, cwd="/", preexec_fn=_enter([], uid),
                                       pass_fds=(runner,))
                finally:
                    os.close(runner)
            self.probe_error = p.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit {p.returncode}"
            return p.returncode == 0 and p.stdout.strip() == b"42"
        except (OSError, subprocess.TimeoutExpired) as e:
            self.probe_error = f"{type(e).__name__}: {e}"
            return False

    def _results(self, out: bytes, err: bytes, n: int, oom: int) -> list[RunResult]:
        try:
            per_test = json.loads(out.decode().strip().splitlines()[-1])
            assert isinstance(per_test, list) and 0 < len(per_test) <= n
        except (ValueError, IndexError, AssertionError, UnicodeDecodeError):  # the sandbox itself was killed
            why = err.decode("utf-8", "replace")[-500:]
            return [RunResult("memory_limit" if oom else "killed", -signal.SIGKILL, "", why) for _ in range(n)]
        return [RunResult(_status(t, self.limits.file_bytes, oom), t["exit"], t["stdout"], t["stderr"])
                for t in per_test] + [RunResult("skipped", 0, "", "") for _ in range(n - len(per_test))]


def _status(t: dict, cap: int, oom: int) -> str:
    rc = t["exit"]
    if t["timed_out"]:
        return "timeout"
    if rc == -signal.SIGXCPU:
        return "cpu_limit"
    if t["out_bytes"] >= cap or t["err_bytes"] >= cap or rc == -signal.SIGXFSZ:
        return "output_limit"
    if "MemoryError" in t["stderr"] or "Cannot allocate memory" in t["stderr"] or (oom and rc == -signal.SIGKILL):
        return "memory_limit"
    if rc < 0:
        return "killed"
    return "ok" if rc == 0 else "runtime_error"


@functools.cache
def _runner_source() -> bytes:
    return RUNNER.read_bytes()


def _runner_fd() -> int:
    """The runner's source in an anonymous file, passed to bubblewrap, which copies it in."""
    fd = os.memfd_create("runner")
    os.write(fd, _runner_source())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                n += d.stat().st_uid == uid
            except OSError:
                pass
    return n


def _shared_tmp() -> str | None:
    """Where the per-run folder (the scratch's mount point) goes: a place every sandbox uid can traverse."""
    return "/tmp" if os.path.isdir("/tmp") else None


def _library_dirs(interpreter: str) -> list[str]:
    """The read-only root: the interpreter's standard library and shared libraries (/usr/lib, /usr/lib64 on
    Debian), or its own prefix when it lives elsewhere."""
    dirs = [d for d in ("/usr/lib", "/usr/lib64") if os.path.isdir(d)]
    prefix = str(Path(interpreter).parent.parent)
    if prefix not in ("/usr", "/") and not any(prefix.startswith(d + "/") for d in dirs):
        dirs.append(prefix)
    return dirs


def _enter(procs_files: list[str], uid: int | None, scratch: tuple | None = None):
    """preexec: join the sandbox's cgroup and mount its scratch (size and file-count limited tmpfs, in a mount
    namespace of bubblewrap's own: gone with it) as root, then become its distinct host uid before bubblewrap runs."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def fn():
        if scratch is not None:
            path, size, files = scratch
            os.unshare(os.CLONE_NEWNS)
            if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0 or libc.mount(
                    b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                    f"size={size},nr_inodes={files},mode=1777".encode()) != 0:
                raise OSError(ctypes.get_errno(), f"mounting the sandbox scratch on {path}")
        if procs_files:
            cgroup.join(procs_files)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change (which clears it): a grading worker
        # killed past its bound takes its sandbox with it (the sandbox leads a session of its own)
    return fn


class _Slot:
    """A slot number held for the duration of one sandbox run, across every process of the machine (file locks):
    the host uid and cgroup of concurrent sandboxes never collide."""
    DIR = Path(tempfile.gettempdir()) / "megatron-ring-sandbox-slots"

    def __enter__(self):
        self.DIR.mkdir(mode=0o700, exist_ok=True)
        for n in range(SLOTS):  # the lowest free slot: few slots (uids, cgroups) are ever made
            fd = os.open(self.DIR / str(n), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.n, self.fd = n, fd
            return self
        raise SandboxUnavailable(f"all {SLOTS} sandbox slots are taken")

    def __exit__(self, *exc):
        os.close(self.fd)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None) -> int:
    """``python -m megatron_ring.rewards.sandbox --check``: can this node run the reward sandbox? (the RL job
    scripts ask every node before they convert a checkpoint or start a server: a node without bubblewrap or user
    namespaces would otherwise fail the run only when the trainer builds its reward pool, minutes later)"""
    import argparse
    import socket

    ap = argparse.ArgumentParser(prog="python -m megatron_ring.rewards.sandbox")
    ap.add_argument("--check", action="store_true", help="probe the sandbox here; exit 3 with the reason if it fails")
    ap.parse_args(argv)
    try:
        box = Sandbox()
    except SandboxUnavailable as e:
        print(f"[sandbox] {socket.gethostname()}: {e}", file=sys.stderr, flush=True)
        return 3
    print(f"[sandbox] {socket.gethostname()}: {box.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
