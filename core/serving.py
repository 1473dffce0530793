"""Serving many chats from one model in memory: continuous batching.

One worker thread owns the model and runs engine steps. In each, the scheduler (core.scheduler)
says who runs: every live reply decodes one token in one batched forward (core.runner), each row
with its own position, KV length, adapter (or none) and media condition; and the first request
in line, once the KV budget has room for it, prefills a chunk of its prompt on the side. Rows
join after their prefill and leave when done, between steps. Each row samples with its own
parameters (temperature, top-p, top-k, seed, repetition penalty and guard).
"""
from __future__ import annotations

import atexit
import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from core.adapter import Adapter
from core.chat_format import stop_strings
from core.errors import UserError
from core.generation import RepeatGuard, SamplingParams, TextStream, guarded, sample
from core.loading import LoadedModel
from core.runner import Row, Runner
from core.scheduler import Scheduler

_DONE = object()


def chat_setup(lm: LoadedModel, adapter: Adapter | None) -> tuple[str, str | None, list[str]]:
    """Prompt format, default system prompt and text stop markers for chatting through `adapter`.
    An adapter trained in another format than the checkpoint's chats in the format it learned its
    replies in, without the checkpoint's default system prompt, which its training prompts lacked."""
    fmt, system = lm.chat_format, lm.system_prompt
    trained_on = (adapter.meta.get("training") or {}).get("prompt_format") if adapter is not None else None
    if trained_on and trained_on != fmt:
        fmt, system = trained_on, None
    return fmt, system, [s for s in stop_strings(fmt) if lm.tokenizer.token_id(s) is None]


@dataclass
class Reply:
    """One request's stream of text deltas, and its numbers once done."""
    ids: list[int]
    params: SamplingParams
    adapter: Adapter | None
    owner: str = ""   # the session that asked (its Stop button cancels it)
    client: str = ""  # the address it came from
    condition: torch.Tensor | None = None  # (1, dim) from the bind network, (1, K, dim) from visual queries
    deltas: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    error: BaseException | None = None
    position: int | None = None  # place in line while it waits for room in the batch (1: next)
    finish_reason: str | None = None  # "stop" (a stop token or string) or "length" (max new tokens, the context)
    generated: list[int] = field(default_factory=list)
    # the worker's own: its row in the batch, its prompt's prefill cache and progress, the text decoder
    _row: Row | None = field(default=None, repr=False)
    _own: list | None = field(default=None, repr=False)
    _prefilled: int = field(default=0, repr=False)
    _text: TextStream | None = field(default=None, repr=False)
    _rng: torch.Generator | None = field(default=None, repr=False)
    _guard: RepeatGuard | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        return self.updates()

    def updates(self, every_s: float | None = None) -> Iterator[str | None]:
        """Text deltas as they come; with `every_s`, also None each time that long passes without
        one (a page then shows the reply's place in line). Leaving early cancels the reply."""
        try:
            while True:
                try:
                    item = self.deltas.get(timeout=every_s)
                except queue.Empty:
                    yield None
                    continue
                if item is _DONE:
                    break
                yield item
        finally:
            self.cancelled.set()  # a consumer that stops listening frees its row
        if self.error is not None:
            raise self.error

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token (the prompt's prefill excluded)."""
        if self.first_token is None or self.finished is None or self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / max(self.finished - self.first_token, 1e-9)


@functools.cache
def _libgomp():
    """The GNU libgomp torch has loaded, or None (not Linux, or another OpenMP runtime)."""
    import ctypes
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith(".so.1")}
    except OSError:
        return None
    return ctypes.CDLL(paths.pop()) if paths else None  # dlopen of a loaded library returns that one


def release_openmp_workers() -> bool:
    """Free the calling thread's idle OpenMP workers (OpenMP 5's omp_pause_resource_all), where
    torch runs on GNU libgomp. libgomp gives each thread that starts a parallel region a team of
    its own, kept after the region ends, and once the process holds more of its threads than
    there are CPUs, every team's barriers stop spinning and sleep at once (its "throttled" spin
    count). The engine's thread is one team; any other thread that computed (the one that loaded
    the model, a request handler that ran an encoder) is a second. On 2 cores that took the
    compiled fp32 step from 50 to 23 tok/s in the engine, and freeing the loader's workers took it
    back to 44-51 (measured here, one process each). True if a pool was freed or none was held."""
    lib = _libgomp()
    return lib is not None and lib.omp_pause_resource_all(2) == 0  # 2: omp_pause_hard


def beside_engine(fn):
    """Mark `fn` as torch work done on a thread other than the engine's (a request handler's, the
    app's start): the OpenMP workers it started are freed when it returns (see
    release_openmp_workers), so the engine's team keeps both cores to itself."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_openmp_workers()
    return run


class ChatEngine:
    def __init__(self, lm: LoadedModel, max_batch: int = 16, kv_budget: int = 32768, prefill_chunk: int = 512):
        self.lm, self.model = lm, lm.model
        self.scheduler = Scheduler(lm.model.args.max_seq_len, max_batch, kv_budget, prefill_chunk)
        self.runner = Runner(lm.model)
        self._inbox: queue.Queue[Reply | None] = queue.Queue()
        self._resting = getattr(lm.model, "adapter", None)  # what the model holds between replies
        self._closing = False
        release_openmp_workers()  # the engine's thread computes from now on
        self._worker = threading.Thread(target=self._work, name="chat-engine", daemon=True)
        self._worker.start()
        atexit.register(self.close)

    def close(self, timeout_s: float = 10.0):
        """Stop the worker after its current step. Runs at exit too: a thread killed inside a
        forward at interpreter shutdown aborts the whole process."""
        self._closing = True
        self._inbox.put(None)  # wakes an idle worker
        self._worker.join(timeout_s)

    def warm_up(self):
        """Run each kind of decode step before requests come: a compiled step (core.compiled)
        compiles at each kind's first use, minutes on 2 cores. The kinds: one row in a fresh
        cache (one slot), several rows, and one row left among several slots when the others
        are done (torch takes a size of 1 as fixed, so one slot is a graph of its own)."""
        for lengths in ((3,), (3, 6)):
            replies = [self.submit([1, 2, 3], SamplingParams(max_new_tokens=n, ignore_eos=True)) for n in lengths]
            for reply in replies:
                "".join(reply)

    # -- the public side ------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, owner: str = "", adapter: Adapter | None = None,
               condition: torch.Tensor | None = None, client: str = "", queued: bool = True) -> Reply:
        """A new reply, in line for the worker; with `queued` False, for `run_here` instead.
        One that could never fit the KV budget is refused at once."""
        params.validate()
        if not ids:
            raise UserError("empty prompt: give at least one token of text")
        if len(ids) >= self.model.args.max_seq_len:
            raise UserError(f"prompt is {len(ids)} tokens; this model's context is {self.model.args.max_seq_len}")
        reply = Reply(ids, params, adapter, owner, client, condition=condition)
        self.scheduler.check(reply)
        if queued:
            self._inbox.put(reply)
        return reply

    def in_flight(self, owner: str = "", client: str = "") -> tuple[int, int]:
        """Replies waiting or running now: (of session `owner`, from address `client`)."""
        replies = [r for r in self._pending() if not r.cancelled.is_set()]
        return sum(r.owner == owner for r in replies), sum(r.client == client for r in replies)

    def cancel(self, owner: str):
        """Stop the replies of one browser session (its Stop button)."""
        for reply in self._pending():
            if reply.owner == owner:
                reply.cancelled.set()

    def _pending(self) -> list[Reply]:
        return [r for r in [*self.scheduler.all(), *list(self._inbox.queue)] if r is not None]

    def run_here(self, reply: Reply) -> Iterator[str]:
        """Run an unqueued reply start to end in the calling thread, on a runner of its own,
        yielding its text deltas: a ZeroGPU Space lends the GPU to one call at a time, so there a
        reply runs inside that call (`app.zerogpu`) instead of on the worker."""
        runner = Runner(self.model)
        try:
            done = False
            while not done and not reply.cancelled.is_set():
                if reply._prefilled < len(reply.ids):
                    done = bool(self._prefill(runner, [reply]))
                else:
                    done = self._decode_step(runner, [reply])[0]
                while not reply.deltas.empty():
                    yield reply.deltas.get_nowait()
        finally:
            self._end(runner, reply)
        if reply.error is not None:
            raise reply.error

    # -- the worker -----------------------------------------------------------------------
    def _work(self):
        """One engine step a turn. The scheduler's running replies are the runner's rows."""
        while not self._closing:
            incoming = [self._inbox.get()] if not self.scheduler.all() else []
            while not self._inbox.empty():
                incoming.append(self._inbox.get_nowait())
            for reply in incoming:
                if reply is not None:
                    self.scheduler.add(reply)
            if self._closing:
                return
            finished = [r for r in self.scheduler.all() if r.cancelled.is_set()]
            for reply in finished:
                self._end(self.runner, reply)
            if self._resting is not None and getattr(self.model, "adapter", None) is self._resting:
                self._resting.detach()  # rows bring their own adapters
            joining = self.scheduler.next_to_prefill()
            if joining:
                try:
                    finished += self._prefill(self.runner, joining)
                except Exception as e:  # a bad request fails with its prefill; the worker keeps serving
                    for reply in joining:
                        reply.error = e
                    finished += joining
                for reply in joining:
                    if reply in finished:
                        self._end(self.runner, reply)
                    elif reply._prefilled == len(reply.ids):  # its whole prompt is in: it joined the batch
                        self.scheduler.joined(reply)
            running = list(self.scheduler.running)
            if running:
                try:
                    done = [r for r, d in zip(running, self._decode_step(self.runner, running)) if d]
                except Exception as e:  # nothing a request can send does this: fail the batch, keep serving
                    for reply in running:
                        reply.error = e
                    done = running
                for reply in done:
                    self._end(self.runner, reply)
                finished += done
            if not self.scheduler.all() and self._resting is not None:  # idle: the model as it was given,
                self._resting.attach(self.model)                         # before anyone hears the end
            for reply in finished:
                reply.deltas.put(_DONE)

    def _end(self, runner: Runner, reply: Reply):
        """`reply` leaves the line or the batch (cancelled, failed or done)."""
        self.scheduler.drop(reply)
        if reply._row is not None and reply._row in runner.rows:
            runner.leave(reply._row)
        reply._own = None
        reply.finished = reply.finished or time.perf_counter()

    def _prefill(self, runner: Runner, replies: list[Reply]) -> list[Reply]:
        """This step's prompt work for `replies`: their whole prompts in one forward, or the next
        chunk of one long prompt. A reply whose prompt is all in has joined the runner's rows and
        has its first token; returns those already finished (the first token was a stop)."""
        for reply in replies:
            if reply._row is None:
                reply._row = Row(reply.adapter, reply.condition)
                reply._text = TextStream(self.lm.tokenizer, reply.params.stop)
                reply._guard = RepeatGuard(reply.params.ngram_guard) if reply.params.ngram_guard else None
                if reply.params.seed is not None:
                    device = self.model.tok_embeddings.weight.device
                    reply._rng = torch.Generator(device=device).manual_seed(reply.params.seed)
        first = replies[0]
        chunk = self.scheduler.chunk
        if len(replies) == 1 and (first._prefilled or len(first.ids) > chunk):  # a long prompt
            if first._own is None:
                first._own = runner.start(len(first.ids))
            start = first._prefilled
            logits = runner.prefill(first._row, first._own, first.ids[start:start + chunk], start)
            first._prefilled += len(first.ids[start:start + chunk])
            if first._prefilled < len(first.ids):
                return []
            first._row.length = len(first.ids)
            runner.join(first._row, first._own)
            first._own = None
            logits = logits[None]
        else:
            logits = runner.prefill_whole([r._row for r in replies], [r.ids for r in replies])
            for reply in replies:
                reply._prefilled = len(reply.ids)
        return [r for r, row_logits in zip(replies, logits) if self._emit(r, self._sample(r, row_logits))]

    def _decode_step(self, runner: Runner, replies: list[Reply]) -> list[bool]:
        """One batched forward over the running rows (in the runner's slot order); whether each of
        `replies` is finished."""
        by_row = {id(r._row): r for r in replies}
        order = [by_row[id(row)] for row in runner.rows]
        logits = runner.decode([r.generated[-1] for r in order])
        done = {id(r): self._emit(r, self._sample(r, logits[i])) for i, r in enumerate(order)}
        return [done[id(r)] for r in replies]

    def _sample(self, reply: Reply, logits: torch.Tensor) -> int:
        p = reply.params
        seen = torch.tensor([reply.ids + reply.generated]) if p.repetition_penalty != 1.0 else None
        return int(sample(guarded(logits[None].float(), [reply._guard]), p, seen, reply._rng)[0])

    def _emit(self, reply: Reply, token: int) -> bool:
        """Stream `token`'s text; True when the reply is finished."""
        if token in self.lm.stop_ids and not reply.params.ignore_eos:
            tail = reply._text.finish()
            if tail:
                reply.deltas.put(tail)
            reply.finish_reason = "stop"
            return True
        reply.generated.append(token)
        if reply._guard is not None:
            reply._guard.push(token)
        reply.tokens += 1
        if reply.first_token is None:
            reply.first_token = time.perf_counter()
        delta = reply._text.push(token)
        if delta:
            reply.deltas.put(delta)
        at_context = len(reply.ids) + len(reply.generated) >= self.model.args.max_seq_len
        if reply._text.stopped or reply.tokens >= reply.params.max_new_tokens or at_context:
            reply.finish_reason = "stop" if reply._text.stopped else "length"
            if not reply._text.stopped:
                tail = reply._text.finish()
                if tail:
                    reply.deltas.put(tail)
            reply.finished = time.perf_counter()
            return True
        return False
