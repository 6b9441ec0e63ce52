"""Runs inside the sandbox's fresh namespaces (network, mount, PID) as their first process, still
privileged there: reads the program, hides the host's writable scratch places behind empty tmpfs mounts,
sets the resource limits, drops to an unprivileged user (when it started as real root) and execs the
interpreter on the program in a throw-away directory. Stand-alone on purpose (stdlib only, run with -I)."""
import json
import os
import resource
import sys


def main() -> None:
    src, cfg, status_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    with open(src, encoding="utf-8") as f:
        program = f.read()
    status_fd = os.open(status_path, os.O_WRONLY)  # on the host, opened before the host's /tmp is hidden
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _mount_tmpfs(d, cfg["file_bytes"] * 4)
    work = "/tmp/job"
    os.makedirs(work, mode=0o700)
    with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
        f.write(program)
    uid = cfg.get("uid")
    if uid is not None:
        for p in (work, os.path.join(work, "main.py")):
            os.chown(p, uid, uid)
    os.chdir(work)
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        _become_program(cfg, uid, work)
    # We are the namespace's init: when we return, the kernel kills every process left in it.
    _, st = os.waitpid(pid, 0)
    os.write(status_fd, json.dumps({"exit": os.waitstatus_to_exitcode(st)}).encode())


def _become_program(cfg: dict, uid, work: str) -> None:
    lim = [(resource.RLIMIT_AS, cfg["memory_bytes"]),
           (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, cfg["open_files"]),
           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, cfg["processes"])]
    for what, n in lim:
        resource.setrlimit(what, (n, n))
    # SIGXCPU at the soft limit (reported as cpu_limit), SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(cfg["interpreter"], [cfg["interpreter"], "-I", "main.py"], env)


def _mount_tmpfs(target: str, size: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"size={max(size, 1 << 20)},mode=1777".encode()
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, opts) != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {target}")


if __name__ == "__main__":
    main()
