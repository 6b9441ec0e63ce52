"""Runs inside the sandbox (bubblewrap), stand-alone on purpose (stdlib only, Python >= 3.9 on Linux, run with -I).

One runner per program: it reads {program, inputs, limits, isolated} as JSON on stdin, compiles the program once
and, for every test input, forks a child from this warmed interpreter that becomes the program (`python3 main.py`
semantics: a fresh ``__main__``, SystemExit / uncaught exception / atexit / non-daemon threads handled as the
interpreter does), with its own stdin/stdout/stderr as anonymous memory files (no path another process could open),
its rlimits and a wall-clock deadline. Between tests every other process of the sandbox is killed, so nothing one
test leaves running sees the next. The runner is not dumpable (no ptrace, no /proc/<pid>/mem or fd of it for the
program, which runs as the same uid; as the PID namespace's init it takes no signal from inside), and answers on a
private descriptor the children never inherit. It prints
one JSON line: per test {exit, timed_out, stdout, stderr, out_bytes, err_bytes}."""
import json
import os
import resource
import select
import signal
import sys
import time

PR_SET_DUMPABLE = 4


def main() -> None:
    req = json.loads(sys.stdin.buffer.read())
    answer = os.dup(1)  # the results channel: close-on-exec, never given to a child (they close fds >= 3)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    _not_dumpable()
    lim, program = req["limits"], req["program"]
    try:
        code = compile(program, "main.py", "exec")
        syntax = None
    except (SyntaxError, ValueError) as e:  # reported like the interpreter would, for every test
        code, syntax = None, "".join(__import__("traceback").format_exception_only(type(e), e))
    work = req.get("work", "/tmp/run")
    results = []
    for i, stdin in enumerate(req["inputs"]):
        d = os.path.join(work, str(i))
        os.makedirs(d, mode=0o700)
        with open(os.path.join(d, "main.py"), "w", encoding="utf-8") as f:
            f.write(program)  # tracebacks show lines; a program may read its own file (it holds no tests)
        results.append(_one(code, syntax, stdin, lim, d, req.get("isolated", False)))
        if req.get("stop_on_error") and (results[-1]["exit"] != 0 or results[-1]["timed_out"]):
            break  # the caller needs every test to pass: the rest are not run
    os.write(answer, (json.dumps(results) + "\n").encode())


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, 0)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _one(code, syntax, stdin: str, lim: dict, workdir: str, isolated: bool) -> dict:
    fin, fout, ferr = _memfd("stdin", stdin.encode()), _memfd("stdout"), _memfd("stderr")
    pid = os.fork()
    if pid == 0:  # the program
        try:
            _become_program(code, syntax, lim, workdir, fin, fout, ferr)
        finally:
            os._exit(127)
    timed_out = not _wait(pid, lim["wall_seconds"])
    if timed_out:
        _kill(pid)
    _, st = os.waitpid(pid, 0)
    _kill_the_rest(pid, isolated)
    cap = lim["file_bytes"]
    out = {"exit": os.waitstatus_to_exitcode(st), "timed_out": timed_out,
           "stdout": os.pread(fout, cap, 0).decode("utf-8", "replace"),
           "stderr": os.pread(ferr, cap, 0).decode("utf-8", "replace"),
           "out_bytes": os.fstat(fout).st_size, "err_bytes": os.fstat(ferr).st_size}
    for fd in (fin, fout, ferr):
        os.close(fd)
    return out


def _wait(pid: int, seconds: float) -> bool:
    """True when the child ended within ``seconds`` (it is then a zombie, reaped by the caller); by polling on
    kernels without pidfd (< 5.3)."""
    try:
        pfd = os.pidfd_open(pid)
    except OSError:
        pfd = None
    if pfd is not None:
        try:
            return bool(select.select([pfd], [], [], seconds)[0])
        finally:
            os.close(pfd)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.002)
    return False


def _kill(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def _kill_the_rest(pid: int, isolated: bool) -> None:
    """Every process the test left behind dies before the next test starts. In the sandbox the runner is its PID
    namespace's init: kill(-1) reaches every other process there, and orphans are its own to reap. Unsafe mode
    (no namespace: never kill(-1) on a host) reaches only the test's session."""
    if not (isolated and os.getpid() == 1):
        _kill(pid)
        return
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # SIGKILL is asynchronous: reap until no process but this one is left
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.001)
        except ChildProcessError:
            return


def _become_program(code, syntax, lim, workdir, fin, fout, ferr) -> None:
    os.setsid()
    for fd, to in ((fin, 0), (fout, 1), (ferr, 2)):
        os.dup2(fd, to)
    os.closerange(3, 1 << 16)
    limits = [(resource.RLIMIT_FSIZE, lim["file_bytes"]), (resource.RLIMIT_NOFILE, lim["open_files"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, lim["processes"]),
              (resource.RLIMIT_AS, lim["memory_bytes"])]
    for what, n in limits:
        resource.setrlimit(what, (n, n))
    # SIGXCPU at the soft limit (reported as cpu_limit), SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_seconds"], lim["cpu_seconds"] + 1))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"})
    os._exit(_run_as_main(code, syntax, workdir))


def _run_as_main(code, syntax, workdir) -> int:
    import atexit
    import builtins
    import threading
    import types

    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                       buffering=1)
    if syntax is not None:
        sys.stderr.write(syntax)
        sys.stderr.flush()
        return 1
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = os.path.join(workdir, "main.py"), builtins
    sys.modules["__main__"], sys.argv, sys.path[0:0] = main, ["main.py"], [workdir]
    status = 0
    try:
        exec(code, main.__dict__)  # noqa: S102 — the untrusted program, in its sandbox
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException as e:  # noqa: BLE001 — as the interpreter reports an uncaught exception
        sys.stderr.write(_format_exc(e, skip=1))
        status = 1
    for step in (getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)):
        try:
            if step is not None:
                step()
        except BaseException:  # noqa: BLE001
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 — e.g. the file-size limit; the host sees the size
            status = status or 120
    return status


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _format_exc(e: BaseException, skip: int = 0) -> str:
    """The traceback as the interpreter prints it, without the runner's own ``skip`` frames."""
    import traceback

    tb = e.__traceback__
    for _ in range(skip):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    return "".join(traceback.format_exception(type(e), e, tb))


def _not_dumpable() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


if __name__ == "__main__":
    main()
