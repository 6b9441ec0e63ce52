"""The one decoding core of the CPU engines: continuous batching over the exported HF model.

Three front doors share it: the RL in-process engine (``rl/rollout.py``: ``sample_batch``), the SGLang look-alike
(``serving/native.py``) and the OpenAI server (``serving/openai_server.py``), the last two through ``Scheduler``.

A ``Batch`` holds the running sequences in one left-padded KV cache (``BatchKV``: a row per sequence, an attention
mask marking each row's own positions). Sequences join at a token boundary (``admit``: the newcomers' prefill as one
left-padded batch, then their cache rows are merged in; no row ever attends to another row's positions: the mask is
per row) and leave when done (``step`` drops them; columns that only padding uses are trimmed). Every sequence
samples from its own generator with its own settings (temperature 0: greedy; top-p), so what it draws depends on its
seed and its own logits, not on what else runs beside it."""
from __future__ import annotations

import contextlib
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(eq=False)  # (a sequence is itself: hashed and compared by identity)
class Seq:
    prompt: list[int]
    max_new: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    eos: frozenset = frozenset()  # stop tokens (empty: generate to max_new)
    on_token: Callable[[int], None] | None = None  # called with each new token, in order
    on_done: Callable[["Seq"], None] | None = None  # called once: finish is set (or error)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the front door gave up on it
    tag: object = None  # the caller's (the prompt index of a rollout)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None  # "stop" (eos), "length", "cancelled"
    error: BaseException | None = None

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


class BatchKV:
    """A KV cache of rows that come and go: per layer [rows, kv heads, time, head dim], left-padded, in buffers
    with room to grow (a step writes its one position instead of copying the whole cache)."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers  # buffers; positions [:n] are used
        self.v: list[torch.Tensor | None] = [None] * layers
        self.n = [0] * layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n[layer_idx]

    def update(self, k: torch.Tensor, v: torch.Tensor, i: int):
        n, s = self.n[i], k.shape[2]
        if self.k[i] is None or n + s > self.k[i].shape[2]:
            self.k[i], self.v[i] = (_room(old, n, new, n + s) for old, new in ((self.k[i], k), (self.v[i], v)))
        else:
            self.k[i][:, :, n:n + s], self.v[i][:, :, n:n + s] = k, v
        self.n[i] = n + s
        return self.k[i][:, :, :n + s], self.v[i][:, :, :n + s]

    def rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i][:, :, :self.n[i]], self.v[i][:, :, :self.n[i]]

    def select(self, rows: torch.Tensor, drop_cols: int = 0) -> None:
        for i in range(len(self.k)):
            k, v = self.rows(i)
            self.k[i], self.v[i] = k[rows, :, drop_cols:], v[rows, :, drop_cols:]
            self.n[i] -= drop_cols

    def join(self, other: "BatchKV") -> None:
        """Append ``other``'s rows, left-padding whichever is shorter in time (padding is masked out)."""
        for i in range(len(self.k)):
            if self.k[i] is None:
                self.k[i], self.v[i], self.n[i] = other.k[i], other.v[i], other.n[i]
                continue
            T = max(self.n[i], other.n[i])
            (a, b), (c, d) = self.rows(i), other.rows(i)
            pad = lambda t: torch.nn.functional.pad(t, (0, 0, T - t.shape[2], 0))  # noqa: E731
            self.k[i], self.v[i], self.n[i] = torch.cat([pad(a), pad(c)], 0), torch.cat([pad(b), pad(d)], 0), T


def _room(old: torch.Tensor | None, n: int, new: torch.Tensor, need: int) -> torch.Tensor:
    """A buffer holding ``old[:, :, :n]`` then ``new``, with room for about as many positions again."""
    buf = new.new_empty((*new.shape[:2], max(need + 64, need * 3 // 2), new.shape[3]))
    if old is not None:
        buf[:, :, :n] = old[:, :, :n]
    buf[:, :, n:need] = new
    return buf


def _pad_left(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    T = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (T - r.shape[-1], 0), value=value) for r in rows])


class Batch:
    """The running sequences of one model, decoded together one token per ``step``."""

    def __init__(self, model, pad: int):
        self.model, self.pad = model, pad
        self.layers = model.config.num_hidden_layers
        self.seqs: list[Seq] = []
        self.kv, self.att, self.pos, self.logits = BatchKV(self.layers), None, None, None

    def __len__(self) -> int:
        return len(self.seqs)

    @torch.inference_mode()
    def admit(self, new: list[Seq]) -> None:
        """The newcomers' prefill (one left-padded batch of their prompts), merged into the running batch."""
        from .modeling_bailing_moe import output_cache

        if not new:
            return
        ids = _pad_left([torch.tensor(s.prompt) for s in new], self.pad)
        att = _pad_left([torch.ones(len(s.prompt), dtype=torch.long) for s in new], 0)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        kv = BatchKV(self.layers)
        out = self.model(input_ids=ids, attention_mask=att, position_ids=pos, cache=kv, use_cache=True,
                         logits_to_keep=1)
        assert output_cache(out) is kv
        logits = out.logits[:, -1].float()
        if not self.seqs:
            self.kv, self.att, self.pos, self.logits = kv, att, pos[:, -1:], logits
        else:
            self.kv.join(kv)
            self.att = _pad_left([*self.att, *att], 0)  # (the cache rows are padded the same way in join)
            self.pos = torch.cat([self.pos, pos[:, -1:]], 0)
            self.logits = torch.cat([self.logits, logits], 0)
        self.seqs += new

    @torch.inference_mode()
    def step(self) -> list[Seq]:
        """One token for every running sequence; returns those that finished (already removed)."""
        from .modeling_bailing_moe import output_cache

        if not self.seqs:
            return []
        nxt, done = [], []
        toks, lps = _draw(self.logits, self.seqs)
        for b, (s, t, lp) in enumerate(zip(self.seqs, toks, lps)):
            if s.cancelled.is_set():
                s.finish = "cancelled"
                nxt.append(self.pad)
                done.append(b)
                continue
            s.tokens.append(t)
            s.logprobs.append(lp)
            nxt.append(t)
            if t in s.eos:
                s.finish = "stop"
            elif len(s.tokens) >= s.max_new:
                s.finish = "length"
            if s.on_token is not None:
                s.on_token(t)
            if s.finish is not None or s.cancelled.is_set():
                s.finish = s.finish or "cancelled"
                done.append(b)
        finished = [self.seqs[b] for b in done]
        if done:
            keep = [b for b in range(len(self.seqs)) if b not in set(done)]
            self._keep(keep)
            nxt = [nxt[b] for b in keep]
        if self.seqs:
            self.att = torch.cat([self.att, torch.ones((len(self.seqs), 1), dtype=torch.long)], 1)
            self.pos = self.pos + 1
            out = self.model(input_ids=torch.tensor(nxt)[:, None], attention_mask=self.att, position_ids=self.pos,
                             cache=self.kv, use_cache=True)
            assert output_cache(out) is self.kv
            self.logits = out.logits[:, -1].float()
        return finished

    def _keep(self, keep: list[int]) -> None:
        self.seqs = [self.seqs[b] for b in keep]
        if not keep:
            self.kv, self.att, self.pos, self.logits = BatchKV(self.layers), None, None, None
            return
        rows = torch.tensor(keep)
        att = self.att[rows]
        used = att.any(0).nonzero()
        drop = int(used[0]) if len(used) else 0  # leading columns only padding uses any more
        self.kv.select(rows, drop)
        self.att, self.pos, self.logits = att[:, drop:], self.pos[rows], self.logits[rows]


def _draw(logits: torch.Tensor, seqs: list[Seq]) -> tuple[list[int], list[float]]:
    """The next token of every row and its (temperature-scaled) log-prob; greedy at temperature 0. Whole-batch
    operations act row by row (softmax, a stable sort) and each row draws from its own generator, so a row's token
    does not depend on the other rows."""
    temps = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in seqs])
    logp = torch.log_softmax(logits / temps[:, None], -1)
    toks = logp.argmax(-1)
    nucleus = [b for b, s in enumerate(seqs) if s.temperature > 0 and s.top_p < 1.0]
    if nucleus:
        sp, si = logp[nucleus].exp().sort(dim=-1, descending=True, stable=True)
        top_p = torch.tensor([seqs[b].top_p for b in nucleus])[:, None]
        sp = sp * (sp.cumsum(-1) - sp < top_p)  # the smallest prefix whose mass reaches top_p
        for r, b in enumerate(nucleus):
            c = torch.multinomial(sp[r:r + 1] / sp[r:r + 1].sum(-1, keepdim=True), 1, generator=seqs[b].gen)
            toks[b] = si[r, c[0, 0]]
    for b, s in enumerate(seqs):
        if s.temperature > 0 and s.top_p >= 1.0:
            toks[b] = torch.multinomial(logp[b:b + 1].exp(), 1, generator=s.gen)[0, 0]
    return toks.tolist(), logp.gather(-1, toks[:, None])[:, 0].tolist()


def run_to_end(model, pad: int, seqs: list[Seq], max_batch: int, should_stop: Callable[[], bool] | None = None,
               on_stop: Callable[[int], None] | None = None) -> None:
    """Decode ``seqs`` to the end with at most ``max_batch`` running, a newcomer joining as soon as a row frees
    (the offline form of ``Scheduler``). ``should_stop`` is asked before every token; when true, ``on_stop(t)``
    is called (it raises) with the longest generated length so far."""
    waiting, batch = deque(seqs), Batch(model, pad)
    while waiting or batch.seqs:
        if should_stop is not None and should_stop():
            on_stop(max((len(s.tokens) for s in batch.seqs), default=0))
        room = max_batch - len(batch)
        if waiting and room > 0:
            batch.admit([waiting.popleft() for _ in range(min(room, len(waiting)))])
        batch.step()


class Scheduler:
    """Continuous batching for servers: ``submit`` from any thread; one decoding thread admits waiting sequences at
    token boundaries (up to ``max_batch`` running) and steps the batch; each sequence's ``on_done`` is called when it
    leaves. A failing step fails the sequences that were in it (their ``error``) and the thread keeps serving."""

    def __init__(self, model, pad: int, max_batch: int = 16):
        self.model, self.pad, self.max_batch = model, pad, max_batch
        self.waiting: deque[Seq] = deque()
        self.cv = threading.Condition()
        self.batch = Batch(model, pad)
        self.peak, self.paused = 0, 0  # peak: the most sequences that ran together
        self.busy = False  # a step is under way (admitting or decoding)
        self.after_step: list[Callable[[], None]] = []  # called after every step (a server hands its tokens over)
        threading.Thread(target=self._loop, name="decode", daemon=True).start()

    @property
    def running(self) -> int:
        return len(self.batch)

    def submit(self, seq: Seq) -> None:
        with self.cv:
            self.waiting.append(seq)
            self.cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """No sequence running or admitted meanwhile (a weight update between generations, as SGLang's scheduler
        runs it): waits for the running batch to finish; while paused, the decoding thread admits nothing and so
        has nothing to step."""
        with self.cv:
            self.paused += 1
            try:
                while self.batch.seqs or self.busy:
                    self.cv.wait()
            except BaseException:
                self.paused -= 1
                raise
        try:
            yield
        finally:
            with self.cv:
                self.paused -= 1
                self.cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.batch.seqs and (not self.waiting or self.paused):
                    self.cv.wait()
                new = []
                while self.waiting and not self.paused and len(self.batch) + len(new) < self.max_batch:
                    s = self.waiting.popleft()
                    if s.cancelled.is_set():
                        s.finish = "cancelled"
                        _done(s)
                    else:
                        new.append(s)
                self.busy = True
            try:
                self.batch.admit(new)
                self.peak = max(self.peak, len(self.batch))
                finished = self.batch.step()
            except Exception as e:  # noqa: BLE001 — the requests in this batch fail, the server does not
                finished = list(dict.fromkeys([*self.batch.seqs, *new]))
                for s in finished:
                    s.error = e
                self.batch = Batch(self.model, self.pad)
            for s in finished:
                _done(s)
            for fn in self.after_step:
                fn()
            with self.cv:
                self.busy = False
                self.cv.notify_all()  # (an exclusive() waiting for the batch to drain)


def _done(s: Seq) -> None:
    if s.on_done is not None:
        s.on_done(s)
