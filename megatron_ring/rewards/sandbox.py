"""A sandbox for untrusted programs (the code reward): each run gets fresh network, mount and PID
namespaces (no network; the host's /tmp, /var/tmp and /dev/shm hidden behind empty tmpfs mounts; every
process it starts dies with it), CPU-time / address-space / file-size / open-file / process-count limits,
a wall-clock timeout that kills its whole process group, an unprivileged user when we are root, a
throw-away working directory, and capped stdout/stderr. It never raises for anything the program does:
the result says what happened. Without namespaces it refuses to start unless ``allow_unsafe`` is given."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

JAIL = Path(__file__).with_name("_jail.py")
NOBODY = 65534


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


@dataclass
class RunResult:
    status: str  # ok | runtime_error | timeout | cpu_limit | memory_limit | output_limit | killed
    returncode: int
    stdout: str
    stderr: str


def _interpreter() -> str:
    """A system interpreter every user can execute (the trainer's venv may live under a private home)."""
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(p, os.X_OK):
            return p
    return sys.executable


class Sandbox:
    def __init__(self, limits: SandboxLimits | None = None, allow_unsafe: bool = False,
                 interpreter: str | None = None):
        self.limits = limits or SandboxLimits()
        self.interpreter = interpreter or _interpreter()
        self.root = os.geteuid() == 0
        self.prefix = self._namespaces()
        if self.prefix is None and not allow_unsafe:
            raise SandboxUnavailable(
                "cannot create network/mount/PID namespaces here (`unshare` failed), so untrusted code would "
                "run with network access; refusing. Pass allow_unsafe=True (--sandbox-unsafe) to run it anyway.")
        self.isolated = self.prefix is not None

    def _namespaces(self) -> list[str] | None:
        unshare = shutil.which("unshare")
        if unshare is None:
            return None
        cmd = [unshare, "--net", "--mount", "--pid", "--fork", "--kill-child"]
        if not self.root:
            cmd.insert(1, "--map-root-user")
        try:
            ok = subprocess.run(cmd + ["true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        return cmd if ok else None

    def _config(self) -> dict:
        cfg = asdict(self.limits)
        cfg["interpreter"] = self.interpreter
        cfg["uid"] = NOBODY if self.root else None
        if not self.root:  # RLIMIT_NPROC counts the real user's processes: leave room above what runs now
            cfg["processes"] += _user_process_count()
        return cfg

    def run(self, program: str, stdin: str = "") -> RunResult:
        lim = self.limits
        with tempfile.TemporaryDirectory(prefix="mr-sandbox-") as td:
            td = Path(td)
            (td / "main.py").write_text(program, encoding="utf-8")
            (td / "stdin").write_text(stdin, encoding="utf-8")
            (td / "status").write_text("")
            if self.isolated:
                cmd = self.prefix + [sys.executable, "-I", str(JAIL), str(td / "main.py"), json.dumps(self._config()),
                                     str(td / "status")]
                preexec = None
            else:  # unsafe mode: limits only, in the scratch directory
                cmd = [self.interpreter, "-I", "main.py"]
                preexec = _limits_preexec(lim)
            with open(td / "stdin", "rb") as fin, open(td / "stdout", "wb") as fout, open(td / "stderr", "wb") as ferr:
                p = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=td, start_new_session=True,
                                     preexec_fn=preexec, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
                timed_out = False
                try:
                    p.wait(timeout=lim.wall_seconds)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(p.pid)
                    p.wait()
                _kill_group(p.pid, wait=True)  # whatever is left of its processes, and wait until they are gone
            out, err = _read_capped(td / "stdout", lim.file_bytes), _read_capped(td / "stderr", lim.file_bytes)
            rc = p.returncode
            if self.isolated:  # the program's own exit status, as its namespace's init saw it
                st = (td / "status").read_text()
                rc = json.loads(st)["exit"] if st else (rc if rc < 0 else -signal.SIGKILL)
            over = (td / "stdout").stat().st_size >= lim.file_bytes or (td / "stderr").stat().st_size >= lim.file_bytes
        return RunResult(_status(rc, timed_out, over, err), rc, out, err)


def _status(rc: int, timed_out: bool, over: bool, err: str) -> str:
    if timed_out:
        return "timeout"
    if rc == -signal.SIGXCPU:
        return "cpu_limit"
    if over or rc == -signal.SIGXFSZ:
        return "output_limit"
    if "MemoryError" in err or "Cannot allocate memory" in err:
        return "memory_limit"
    if rc < 0:
        return "killed"
    return "ok" if rc == 0 else "runtime_error"


def _kill_group(pid: int, wait: bool = False) -> None:
    import time

    deadline = time.monotonic() + 10
    try:
        os.killpg(pid, signal.SIGKILL)
        while wait and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
            time.sleep(0.02)
            os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


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


def _limits_preexec(lim: SandboxLimits):
    import resource

    def fn():
        for what, n in [(resource.RLIMIT_CPU, lim.cpu_seconds), (resource.RLIMIT_AS, lim.memory_bytes),
                        (resource.RLIMIT_FSIZE, lim.file_bytes), (resource.RLIMIT_NOFILE, lim.open_files),
                        (resource.RLIMIT_CORE, 0)]:
            resource.setrlimit(what, (n, n))

    return fn
