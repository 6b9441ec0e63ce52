"""Scoring rollouts in a pool of worker processes (spawned: they never share the trainer's threads or
its process group). A job is {domain, response, answer | test_cases | prefix+check+entry_point, truncated}
(domain: math, science, code, code_check — HumanEval —, choice — GPQA); a worker failure is a
reward 0 with the reason, never an exception in the trainer.

Every grading is bounded in wall time by the pool itself, whatever the grader does inside (a library's own
timeouts are alarms that C code such as a huge integer conversion never sees): past ``timeout_s`` (math, science,
choice) or ``code_timeout_s`` (code, from the job's dispatch to a worker) the worker's whole session is killed and a
fresh worker replaces it; the sample scores 0 with reason ``grader_timeout``. Each worker leads its own session, so
a signal sent to the trainer's process group (torchrun forwards SIGUSR1 there) does not reach the graders.

Each worker is the only child of a small keeper process, a child subreaper: a worker killed (by the pool past its
bound, or from outside) orphans its running sandbox, which the keeper reaps instead of the node's PID 1 (in many
containers PID 1 reaps nothing, and every timed-out program would leave zombies)."""
from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict
from multiprocessing.connection import wait

from . import Reward
from .sandbox import Sandbox, SandboxLimits

TIMEOUT = "grader_timeout"
MATH_TIMEOUT_S = 5.0  # the default bound of one math/science/choice grading (RL recipes, eval)
CODE_TIMEOUT_S = 60.0  # of one program against all its test cases (RL; eval's longer per-test limit: 2x)
_SANDBOX: Sandbox | None = None
CODE_DOMAINS = ("code", "code_check")


def reward_job(row: dict, response: str, truncated: bool) -> dict:
    """The scoring job of one response to a prompt row (id, prompt, domain, answer | test_cases)."""
    return {"domain": row["domain"], "response": response, "answer": row.get("answer"),
            "test_cases": row.get("test_cases"), "truncated": truncated}


def score(job: dict, sandbox: Sandbox | None = None) -> Reward:
    from .code import code_reward, function_reward
    from .verify_math import choice_reward, math_reward

    domain, truncated = job.get("domain"), bool(job.get("truncated"))
    try:
        if domain in ("math", "science"):
            return math_reward(job["response"], job["answer"], truncated)
        if domain == "code":
            return code_reward(job["response"], job.get("test_cases") or [], sandbox or _SANDBOX, truncated)
        if domain == "code_check":
            return function_reward(job["response"], job["prefix"], job["check"], job["entry_point"],
                                   sandbox or _SANDBOX, truncated, reference=job.get("answer"))
        if domain == "choice":
            return choice_reward(job["response"], job["answer"], truncated)
        return Reward(0.0, f"no_reward_for_domain:{domain}")
    except Exception as e:  # a grader bug must not take the trainer down
        return Reward(0.0, f"grader_error:{type(e).__name__}: {e}"[:200])


def cpu_workers() -> int:
    """One grading worker per CPU this process may use (each sandbox is held to one CPU by its cgroup)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _keep(conn, pid, *args) -> None:
    """The keeper: a child subreaper that forks the worker (``pid.value``: its pid, for the pool's kill), reaps it
    and every orphan it leaves (its sandboxes) until none is left, then exits as the worker did."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.setsid()  # out of the trainer's process group: its signals (SIGUSR1, ^C) are the trainer's to handle
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    worker = os.fork()
    if worker == 0:
        code = 0
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a keeper killed from outside takes it along
            _work(conn, *args)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    pid.value = worker
    # terminated (multiprocessing ends its daemons so at exit): end the worker, still reap what it leaves
    signal.signal(signal.SIGTERM, lambda *_: _kill_session(worker))
    conn.close()  # the worker's end only: the pool sees EOF the moment the worker dies
    code = 1
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:  # the worker and its orphans are all reaped
            break
        if done == worker:
            code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: the keeper dies by it too (the pool reports "died (exit -N)")
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _kill_session(pid: int) -> None:
    """SIGKILL to the session that ``pid`` leads (and to ``pid`` itself, in case it has not led one yet)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _work(conn, limits: dict, allow_unsafe: bool, code_timeout_s: float) -> None:
    """A worker: its own session (the pool kills the whole of it, sandboxes included), warmed before it says ready
    (importing and first use of Math-Verify take seconds that must not count against a job's bound)."""
    global _SANDBOX
    os.setsid()
    _SANDBOX = Sandbox(SandboxLimits(**limits), allow_unsafe=allow_unsafe)
    _SANDBOX.max_seconds = max(code_timeout_s - 2.0, 1.0)  # its own kill comes first: a clean "timeout" status
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeouts log the whole (hostile) input
    from .verify_math import math_reward

    math_reward("\\boxed{\\frac{1}{2}}", "0.5")
    conn.send("ready")
    try:
        while (job := conn.recv()) is not None:
            r = score(job)
            conn.send((r.value, r.reason))
    except (EOFError, BrokenPipeError):  # the pool's process is gone (killed): so is this worker's reason to be
        pass


class _Worker:
    def __init__(self, ctx, args: tuple):
        self.conn, child = ctx.Pipe()
        self.pid = ctx.Value("i", 0, lock=False)  # the grading process (the keeper's child) once forked
        self.proc = ctx.Process(target=_keep, args=(child, self.pid, *args), daemon=True)
        self.proc.start()
        child.close()
        self.ready, self.job = False, None  # job: (future, deadline)

    def kill(self) -> None:
        """Kill the worker's session; its keeper reaps it and its orphaned sandbox, then exits (killed too if it
        does not within 5 s, or if the worker was never forked)."""
        if self.pid.value:
            _kill_session(self.pid.value)
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


class RewardPool:
    def __init__(self, workers: int = 2, limits: SandboxLimits | None = None, allow_unsafe: bool = False,
                 timeout_s: float = MATH_TIMEOUT_S, code_timeout_s: float = CODE_TIMEOUT_S):
        """``workers`` 0: one per CPU (``cpu_workers``). ``timeout_s`` / ``code_timeout_s``: the wall-time bound of
        one grading (math, science, choice / code)."""
        limits = limits or SandboxLimits()
        Sandbox(limits, allow_unsafe=allow_unsafe)  # refuse here, before any rollout, if isolation is missing
        if timeout_s <= 0 or code_timeout_s <= 0:
            raise ValueError(f"reward timeouts must be > 0 (got {timeout_s}, {code_timeout_s})")
        self.timeout_s, self.code_timeout_s = float(timeout_s), float(code_timeout_s)
        self._ctx, self._args = mp.get_context("spawn"), (asdict(limits), allow_unsafe, self.code_timeout_s)
        self._queue: collections.deque = collections.deque()
        self._lock, self._closed, self._error = threading.Lock(), False, None
        self._wake_r, self._wake_w = socket.socketpair()
        self.replaced, self._failed_starts = 0, 0  # workers killed past their bound (or dead) and replaced
        self._workers = [_Worker(self._ctx, self._args) for _ in range(workers or cpu_workers())]
        self._thread = threading.Thread(target=self._loop, name="reward-pool", daemon=True)
        self._thread.start()

    def bound(self, job: dict) -> float:
        return self.code_timeout_s if job.get("domain") in CODE_DOMAINS else self.timeout_s

    def submit(self, job: dict) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"reward pool: {self._error or 'closed'}")
            self._queue.append((fut, job))
        self._wake_w.send(b"x")
        return fut

    def map(self, jobs: list[dict]) -> list[Reward]:
        futs = [self.submit(j) for j in jobs]
        return [f.result() for f in futs]

    # -- the dispatcher thread ------------------------------------------------------------------------------------
    def _assign(self) -> None:
        for w in self._workers:
            while w.ready and w.job is None and self._queue:
                fut, job = self._queue.popleft()
                if fut.set_running_or_notify_cancel():
                    w.conn.send(job)
                    w.job = (fut, time.monotonic() + self.bound(job))

    def _replace(self, w: _Worker, reason: str) -> None:
        self.replaced += 1
        w.kill()
        if w.job is not None:
            w.job[0].set_result(Reward(0.0, reason))
        self._failed_starts = 0 if w.ready else self._failed_starts + 1
        if self._failed_starts >= 3:  # workers that die before they are ready will not start: stop, say why
            raise RuntimeError(f"reward workers die while starting (exit code {w.proc.exitcode}, 3 in a row); "
                               "their stderr above says why")
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self._args)

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug here must fail the waiting callers, not hang them
            with self._lock:
                self._closed, self._error, pending = True, str(e), [f for f, _ in self._queue] + \
                    [w.job[0] for w in self._workers if w.job is not None]
            for f in pending:
                if not f.done():
                    f.set_exception(RuntimeError(f"reward pool: {e}"))
            for w in self._workers:
                w.kill()

    def _serve(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._assign()
            deadlines = [w.job[1] for w in self._workers if w.job is not None]
            timeout = max(min(deadlines) - time.monotonic(), 0.0) if deadlines else None
            by_conn = {w.conn: w for w in self._workers}
            for obj in wait([*by_conn, self._wake_r], timeout):
                if obj is self._wake_r:
                    self._wake_r.recv(4096)
                    continue
                w = by_conn[obj]
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):  # the worker died (killed from outside, out of memory)
                    w.proc.join(5)  # its keeper exits as it did, once the orphans are reaped
                    self._replace(w, f"worker_error:died (exit {w.proc.exitcode})")
                    continue
                if msg == "ready":
                    w.ready = True
                elif w.job is not None:
                    w.job[0].set_result(Reward(*msg))
                    w.job = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.job[1]:
                    self._replace(w, TIMEOUT)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._queue = list(self._queue), collections.deque()
        self._wake_w.send(b"x")
        self._thread.join()
        for fut, _ in pending:
            fut.cancel()
        for w in self._workers:
            if w.job is not None:
                w.job[0].set_result(Reward(0.0, "worker_error:pool closed"))
            w.kill()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
