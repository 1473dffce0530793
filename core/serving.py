"""Serving several chats from one model in memory.

One worker thread owns the model. It interleaves the live requests one decoding step at a time,
so a long reply does not hold everyone else back; sessions take turns, one reply each a round,
so a session with several replies on the way gets no more than one that has a single reply.
Before each step it puts that request's
own KV cache and adapter in place: both are reference swaps, so every request runs on the
adapter it asked for (or none), whatever the others asked for.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from core.adapter import Adapter
from core.chat_format import stop_strings
from core.generation import SamplingParams, TextStream, generate_tokens
from core.loading import LoadedModel
from core.multimodal import conditioned

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
    condition: torch.Tensor | None = None  # (1, dim) from the adapter's bind network: an image, clip, cloud
    deltas: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    error: BaseException | None = None
    # the worker's own: the token generator, the text decoder and the KV cache between steps
    _tokens: Iterator | None = field(default=None, repr=False)
    _text: TextStream | None = field(default=None, repr=False)
    _caches: list | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self.deltas.get()
                if item is _DONE:
                    break
                yield item
        finally:
            self.cancelled.set()  # a consumer that stops listening frees the worker
        if self.error is not None:
            raise self.error

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token (the prompt's prefill excluded)."""
        if self.first_token is None or self.finished is None or self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / max(self.finished - self.first_token, 1e-9)


class ChatEngine:
    def __init__(self, lm: LoadedModel):
        self.lm, self.model = lm, lm.model
        self._inbox: queue.Queue[Reply] = queue.Queue()
        self._active: list[Reply] = []
        self._resting = getattr(lm.model, "adapter", None)  # what the model holds between replies
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="chat-engine", daemon=True)
        self._worker.start()
        atexit.register(self.close)

    def close(self, timeout_s: float = 10.0):
        """Stop the worker after its current step. Runs at exit too: a thread killed inside a
        forward at interpreter shutdown aborts the whole process."""
        self._closing = True
        self._inbox.put(None)  # wakes an idle worker
        self._worker.join(timeout_s)

    # -- the public side ------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, owner: str = "", adapter: Adapter | None = None,
               condition: torch.Tensor | None = None, client: str = "", queued: bool = True) -> Reply:
        """A new reply, in line for the worker; with `queued` False, for `run_here` instead."""
        params.validate()
        reply = Reply(ids, params, adapter, owner, client, condition=condition)
        if queued:
            self._inbox.put(reply)
        return reply

    def run_here(self, reply: Reply) -> Iterator[str]:
        """Run an unqueued reply start to end in the calling thread, yielding its text deltas: a
        ZeroGPU Space lends the GPU to one call at a time, so there a reply runs inside that call
        (`app.zerogpu`) instead of on the worker."""
        try:
            done = False
            while not done:
                done = reply.cancelled.is_set() or self._step(reply)
                while not reply.deltas.empty():
                    yield reply.deltas.get_nowait()
        finally:
            self._finish(reply)
        if reply.error is not None:
            raise reply.error

    def in_flight(self, owner: str = "", client: str = "") -> tuple[int, int]:
        """Replies queued or running now: (of session `owner`, from address `client`)."""
        replies = [r for r in self._pending() if not r.cancelled.is_set()]
        return sum(r.owner == owner for r in replies), sum(r.client == client for r in replies)

    def cancel(self, owner: str):
        """Stop the replies of one browser session (its Stop button)."""
        for reply in self._pending():
            if reply.owner == owner:
                reply.cancelled.set()

    def _pending(self) -> list[Reply]:
        return [r for r in list(self._active) + list(self._inbox.queue) if r is not None]

    # -- the worker -----------------------------------------------------------------------
    def _work(self):
        while not self._closing:
            waiting = [self._inbox.get()] if not self._active else []
            while not self._inbox.empty():
                waiting.append(self._inbox.get_nowait())
            self._active += [r for r in waiting if r is not None]
            finished = []
            for reply in self._round():
                if self._closing:
                    return
                if reply.cancelled.is_set() or self._step(reply):
                    self._active.remove(reply)
                    self._finish(reply)
                    finished.append(reply)
            if not self._active:  # idle: the model as it was given, before anyone hears the end
                self._use_adapter(self._resting)
            for reply in finished:
                reply.deltas.put(_DONE)

    def _round(self) -> list[Reply]:
        """This round's replies: each session's first; a session's others go to the back of the
        line, so they take turns in later rounds."""
        picked, owners = [], set()
        for reply in list(self._active):
            owner = reply.owner or id(reply)  # in-process requests have no session: each is its own
            if owner in owners:
                continue
            owners.add(owner)
            picked.append(reply)
        for reply in picked:  # stepped now: behind the session's waiting replies
            self._active.remove(reply)
            self._active.append(reply)
        return picked

    def _finish(self, reply: Reply):
        if reply._tokens is not None:
            reply._tokens.close()
        reply._caches = None
        reply.finished = reply.finished or time.perf_counter()

    def _step(self, reply: Reply) -> bool:
        """Advance one reply by one token; True when it is finished."""
        self._use_adapter(reply.adapter)
        try:
            if reply._tokens is None:
                reply._tokens = generate_tokens(self.model, [reply.ids], reply.params, self.lm.stop_ids)
                reply._text = TextStream(self.lm.tokenizer, reply.params.stop)
            else:
                self._put_caches(reply._caches)
            with conditioned(self.model, reply.condition):
                step = next(reply._tokens, None)
            reply._caches = [layer.attention.kv_cache for layer in self.model.layers]
        except Exception as e:  # a bad request fails alone; the worker keeps serving
            reply.error = e
            return True
        text = reply._text
        if step is None or step[0] is None:
            tail = text.finish()
            if tail:
                reply.deltas.put(tail)
            return True
        reply.tokens += 1
        if reply.first_token is None:
            reply.first_token = time.perf_counter()
        delta = text.push(step[0])
        if delta:
            reply.deltas.put(delta)
        if text.stopped or reply.tokens >= reply.params.max_new_tokens:
            reply.finished = time.perf_counter()
            return True
        return False

    def _put_caches(self, caches: list):
        for layer, cache in zip(self.model.layers, caches):
            layer.attention.kv_cache = cache

    def _use_adapter(self, adapter: Adapter | None):
        current = getattr(self.model, "adapter", None)
        if current is adapter:
            return
        if adapter is None:
            current.detach()
        else:
            adapter.attach(self.model)
