"""The adversarial suite of the code sandbox (issue 20): each attack is a program graded the way RL rollouts are
(the code reward on stdin/stdout tests), written so that it earns reward 1 **only if the attack works**. Every one
must score 0, honest programs graded at the same time beside them must still score 1, and nothing may be left on
the host (processes, SysV IPC, files). The exit-code / __eq__ / self-reading tricks against the HumanEval grader are
in test_eval.py (test_humaneval_grader_pays_for_data_not_exit_codes); the hedged math answers in test_rewards.py."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_ring.rewards import score
from megatron_ring.rewards.sandbox import UID_BASE, Sandbox, SandboxLimits

from .conftest import ROOT

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=4.0, memory_bytes=256 << 20, file_bytes=1 << 16, processes=16)
WIN = [{"input": "", "output": "WIN\n"}]  # an attacker prints exactly WIN only when its attack worked
HONEST = "```python\nimport time\ntime.sleep(0.8)\nn = int(input())\nprint(n * 3 + 1)\n```"
HONEST_TESTS = [{"input": "2\n", "output": "7\n"}, {"input": "-5\n", "output": "-14\n"}]
SECRET = "sibling-secret-4711"


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


def _code(src: str) -> str:
    return f"```python\n{src}\n```"


ATTACKS = {
    # a sibling's program, through its /proc entries (cwd, fds, memory), or any process of the host
    "read_sibling_program": """
import os
found = False
for p in os.listdir('/proc'):
    if p.isdigit() and int(p) != os.getpid():
        for f in ('cwd/main.py', 'fd/0', 'fd/1', 'cmdline', 'environ'):
            try:
                found |= b'SECRET' in open(f'/proc/{p}/{f}', 'rb').read()
            except OSError:
                pass
print('WIN' if found else 'no')""",
    "see_other_processes": """
import os
mine = {os.getpid(), os.getppid(), 1}
others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in mine]
print('WIN' if others else 'no')""",
    "kill_siblings": """
import os, signal
hit = 0
for p in range(2, 70000):
    if p != os.getpid():
        try:
            os.kill(p, signal.SIGKILL)
            hit += 1
        except OSError:
            pass
print('WIN' if hit else 'no')""",
    # the runner that forks the tests holds their results' channel: reading or writing it would forge results
    "tamper_runner": """
import os
hit = []
for what in (lambda: open('/proc/1/mem', 'r+b'), lambda: os.listdir('/proc/1/fd'),
             lambda: os.open('/proc/1/fd/3', os.O_WRONLY)):
    try:
        what()
        hit.append(1)
    except OSError:
        pass
print('WIN' if hit else 'no')""",
    # the host: files anywhere, the checkout and data, host-wide scratch places
    "read_host_files": """
import os
paths = ['/etc/passwd', '/etc/hostname', 'ROOTDIR/README.md', 'ROOTDIR/runs', '/root', '/home', '/work', '/var/tmp',
         '/run/lock', '/proc/1/root/etc/passwd', '/sys/fs/cgroup']
seen = [p for p in paths if os.path.exists(p)]
print('WIN' if seen else 'no')""",
    "persist_files": """
import os
hit = False
for d in ('/run/lock', '/var/tmp', '/dev/shm', '/tmp'):
    try:
        hit |= os.path.exists(d + '/mr_persist')
        open(d + '/mr_persist', 'w').write('x')
    except OSError:
        pass
print('WIN' if hit else 'no')""",
    "sysv_shm_outlives_run": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
ids = [libc.shmget(0, 32 << 20, 0o1000 | 0o666) for _ in range(4)]
for i in ids:
    if i >= 0:
        ctypes.memset(libc.shmat(i, None, 0), 1, 32 << 20)
print('no', ids)  # the win is on the host: segments left behind (checked there)""",
    "network": """
import socket
try:
    socket.create_connection(('10.0.0.1', 80), timeout=1)
    print('WIN')
except OSError:
    print('no')""",
    # resources beyond the caps, which would hurt the programs graded beside
    "aggregate_memory": """
import os, time
r, w = os.pipe()
for i in range(6):
    if os.fork() == 0:
        x = b'x' * (100 << 20)  # 600 MiB in all against a 256 MiB cap
        os.write(w, b'k')
        time.sleep(2)
        os._exit(0)
time.sleep(1.5)
os.set_blocking(r, False)
try:
    n = len(os.read(r, 100))
except BlockingIOError:
    n = 0
print('WIN' if n == 6 else 'no')""",
    "nested_user_namespace": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ok = libc.unshare(0x10000000) == 0  # CLONE_NEWUSER: would allow a tmpfs of its own, past the scratch cap
print('WIN' if ok else 'no')""",
    "scratch_files_past_cap": """
try:
    for n in range(20000):  # the scratch holds 4096 files
        open(f'/tmp/f{n}', 'w').close()
    print('WIN')
except OSError:
    print('no')""",
    "scratch_bytes_past_cap": """
try:
    for i in range(300):  # 18 MB in files under the 64 KiB file-size limit; the scratch holds 4 MiB
        open(f'/tmp/b{i}', 'wb').write(b'x' * 60000)
    print('WIN')
except OSError:
    print('no')""",
    "fork_bomb": """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass""",
}


def _attack(name: str) -> str:
    return _code(ATTACKS[name].replace("ROOTDIR", str(ROOT)).replace("SECRET", SECRET))


def _sysv() -> tuple[int, int]:
    count = lambda f: len(Path(f).read_text().splitlines()) - 1 if Path(f).exists() else 0  # noqa: E731
    return count("/proc/sysvipc/shm"), count("/proc/sysvipc/msg")


def _status(d: Path) -> dict[str, str]:
    """/proc/<pid>/status as a dict (the ``Uid:`` line, not the file's owner: that is root for a process that is
    not dumpable or, on some kernels, a zombie)."""
    return dict(line.split(":\t", 1) for line in (d / "status").read_text().splitlines() if ":\t" in line)


def _sandbox_processes() -> list[int]:
    """Processes (zombies included) running as a sandbox uid that are this test's: bubblewrap started here, or
    anything of a sandbox left behind (an orphan goes to PID 1). Another xdist worker's live sandboxes, beside this
    test, have their own parents."""
    out, mine = [], {str(os.getpid()), "1"}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = _status(d)
                if int(st["Uid"].split()[0]) >= UID_BASE and st["PPid"].strip() in mine:
                    out.append(int(d.name))
            except (OSError, KeyError, ValueError):
                pass
    return out


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_scores_zero_and_honest_neighbours_score_one(sandbox, name):
    """The attacker is graded at the same time as two honest programs (the K samples of one prompt are graded
    concurrently in RL); the honest ones carry a secret in their source that the sibling readers look for."""
    honest = HONEST.replace("import time", f"import time  # {SECRET}")
    ipc0 = _sysv()
    with ThreadPoolExecutor(3) as ex:
        h1 = ex.submit(score, {"domain": "code", "response": honest, "test_cases": HONEST_TESTS}, sandbox)
        time.sleep(0.2)  # the honest ones are running when the attack starts
        a = ex.submit(score, {"domain": "code", "response": _attack(name), "test_cases": WIN}, sandbox)
        h2 = ex.submit(score, {"domain": "code", "response": honest, "test_cases": HONEST_TESTS}, sandbox)
        attacker, honest1, honest2 = a.result(), h1.result(), h2.result()
    assert attacker.value == 0.0, (name, attacker)
    assert honest1.value == honest2.value == 1.0, (honest1, honest2)
    assert _sysv() == ipc0  # no SysV segment or queue outlives its sandbox
    assert _sandbox_processes() == []
    assert not any(Path(d, "mr_persist").exists() for d in ("/run/lock", "/var/tmp", "/dev/shm", "/tmp"))


def test_persisted_files_are_gone_for_the_next_program(sandbox):
    """A second run of the persisting program finds nothing the first one wrote."""
    for _ in range(2):
        assert score({"domain": "code", "response": _attack("persist_files"), "test_cases": WIN}, sandbox).value == 0


def test_concurrent_sandboxes_run_as_distinct_host_uids(sandbox):
    """As root, each sandbox running at the same time is another host uid (>= UID_BASE), seen from the host."""
    if os.geteuid() != 0:
        pytest.skip("distinct host uids need root (one uid for all otherwise: said by Sandbox.describe())")

    def three_at_once() -> dict[str, set[int]]:
        seen: dict[str, set[int]] = {}
        stop = threading.Event()

        def watch():
            while not stop.is_set():  # bubblewrap processes started here, and what runs under each
                for d in Path("/proc").iterdir():
                    try:
                        if d.name.isdigit() and (st := _status(d))["PPid"].strip() == str(os.getpid()):
                            uid = int(st["Uid"].split()[0])
                            kids = Path(d, "task", d.name, "children").read_text().split()
                            if uid >= UID_BASE and kids and "Z" not in st["State"]:
                                seen.setdefault(os.readlink(f"/proc/{kids[0]}/ns/pid"), set()).add(uid)
                    except (OSError, KeyError, ValueError):
                        pass
                time.sleep(0.02)

        t = threading.Thread(target=watch)
        t.start()
        with ThreadPoolExecutor(3) as ex:  # (2 s each: on a loaded 2-core machine a 1 s sandbox was once missed)
            runs = list(ex.map(lambda _: sandbox.run("import time\ntime.sleep(2)"), range(3)))
        stop.set()
        t.join()
        assert [r.status for r in runs] == ["ok"] * 3, runs
        return seen

    # every sandbox seen has one uid, and no two share one; a loaded machine's watcher has missed one of the three
    # (seen in CI: two namespaces), so up to three rounds until a round sees all three
    for _ in range(3):
        seen = three_at_once()
        assert all(len(u) == 1 for u in seen.values()) and len(set().union(*seen.values())) == len(seen), seen
        if len(seen) == 3:  # three PID namespaces, three uids
            break
    assert len(seen) == 3, seen


def test_the_tree_is_limited_as_a_whole_where_cgroups_exist(sandbox):
    """Where a cgroup could be made (as root, v1 or v2), memory and process count hold for the whole tree; the
    sandbox says which limits it runs on."""
    text = sandbox.describe()
    assert "bubblewrap" in text
    if os.geteuid() == 0 and Path("/sys/fs/cgroup").is_dir():
        assert "cgroup v" in text, text


def test_many_test_cases_share_one_sandbox_and_see_fresh_processes(sandbox):
    """All test cases of a program run in one sandbox, each in a fresh process: a daemon left by one test is gone
    before the next starts, and each test's stdin is its own."""
    prog = ("import os, sys, time\nn = int(input())\nothers = [p for p in os.listdir('/proc') if p.isdigit() and "
            "int(p) not in (1, os.getpid())]\nprint(n, len(others))\nsys.stdout.flush()\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n")
    res = sandbox.run_many(prog, [f"{i}\n" for i in range(5)])
    assert [r.stdout for r in res] == [f"{i} 0\n" for i in range(5)], res
    assert [r.status for r in res] == ["ok"] * 5


def test_a_slot_is_reused_with_other_limits():
    """Slots (uid, cgroup) are kept between runs; sandboxes with other limits (RL vs eval) reuse them, in either
    order, and each run gets its own limits."""
    hog = "x = b'x' * (200 << 20)\nprint(len(x))"
    small = Sandbox(SandboxLimits(memory_bytes=128 << 20, wall_seconds=5.0))
    big = Sandbox(SandboxLimits(memory_bytes=512 << 20, wall_seconds=5.0))
    for _ in range(2):
        assert small.run(hog).status == "memory_limit"
        assert big.run(hog).stdout.strip() == str(200 << 20)
