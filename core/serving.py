"""Serving several chats from one model in memory.

One worker thread owns the model. It interleaves the live requests one decoding step at a time,
so a long reply does not hold everyone else back, and before each step it puts that request's
own KV cache and adapter in place: both are reference swaps, so a reply that started on one
adapter finishes on it even if the live adapter is switched meanwhile.
"""
from __future__ import annotations

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
    owner: str = ""
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
        self.live: Adapter | None = getattr(lm.model, "adapter", None)  # what new requests get
        self._inbox: queue.Queue[Reply] = queue.Queue()
        self._model_lock = threading.Lock()  # held for each step, and for idle adapter swaps
        self._active: list[Reply] = []
        threading.Thread(target=self._work, name="chat-engine", daemon=True).start()

    # -- the public side ------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, owner: str = "",
               adapter: Adapter | None | str = "live", condition: torch.Tensor | None = None) -> Reply:
        params.validate()
        reply = Reply(ids, params, self.live if adapter == "live" else adapter, owner, condition=condition)
        self._inbox.put(reply)
        return reply

    def cancel(self, owner: str):
        """Stop the replies of one browser session (its Stop button)."""
        for reply in list(self._active) + list(self._inbox.queue):
            if reply.owner == owner:
                reply.cancelled.set()

    def set_live(self, adapter: Adapter | None):
        """Make `adapter` (or None) what new replies use. Replies already running keep theirs.
        If the model is idle the swap happens now."""
        self.live = adapter
        with self._model_lock:
            self._use_adapter(adapter)

    # -- the worker -----------------------------------------------------------------------
    def _work(self):
        while True:
            if not self._active:
                self._active.append(self._inbox.get())
            while not self._inbox.empty():
                self._active.append(self._inbox.get_nowait())
            for reply in list(self._active):
                done = reply.cancelled.is_set()
                if not done:
                    with self._model_lock:
                        done = self._step(reply)
                if done:
                    self._active.remove(reply)
                    if reply._tokens is not None:
                        reply._tokens.close()
                    reply._caches = None
                    reply.finished = reply.finished or time.perf_counter()
                    reply.deltas.put(_DONE)
            if not self._active:  # idle: leave the live adapter in place for the next request
                with self._model_lock:
                    self._use_adapter(self.live)

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
