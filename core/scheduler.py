"""The scheduler: who runs in each engine step (core.serving runs the loop, core.runner the math).

Requests wait in one line, first come first served. The first in line is admitted when its
worst case fits: the batch cache as it would grow with it (every row at the longest reservation,
prompt plus max new tokens: `SlotCache.tokens_for`) within the token budget, and the batch under
`max_batch` rows. Each step has `chunk` prompt tokens beside the running rows' decode: the first
in line and those behind it whose whole prompts fit them are prefilled together, and join the
running rows; a longer prompt is prefilled alone, `chunk` tokens a step, so it never stalls the
others for its whole length. Requests that do not fit wait, and each knows its place in line.
"""
from __future__ import annotations

from collections import deque

from core.errors import UserError
from core.runner import SlotCache


class Scheduler:
    def __init__(self, context: int, max_batch: int = 16, token_budget: int = 32768, chunk: int = 512):
        self.context, self.max_batch, self.token_budget, self.chunk = context, max_batch, token_budget, chunk
        self.waiting: deque = deque()
        self.joining: list = []  # admitted, being prefilled
        self.running: list = []

    def reserve(self, request) -> int:
        """The most cache positions `request` can take: its prompt and all its new tokens."""
        return min(len(request.ids) + request.params.max_new_tokens, self.context)

    def check(self, request):
        """Refuse, at once, a request that could never fit, however long it waited."""
        need = SlotCache.tokens_for(1, self.reserve(request))
        if need > self.token_budget:
            raise UserError(f"prompt ({len(request.ids)} tokens) plus max new tokens ({request.params.max_new_tokens}) "
                            f"needs {need} cache positions; this server's KV budget is {self.token_budget}: ask for "
                            "fewer new tokens or a shorter prompt")

    def add(self, request):
        self.waiting.append(request)
        request.position = len(self.waiting)

    def fits(self, request) -> bool:
        rows = [*self.running, *self.joining, request]
        longest = max(self.reserve(r) for r in rows)
        return len(rows) <= self.max_batch and SlotCache.tokens_for(len(rows), longest) <= self.token_budget

    def next_to_prefill(self) -> list:
        """The requests whose prompts run this step: a long prompt being prefilled; else the first
        in line, if it fits, and those behind it that fit too and whose whole prompts share this
        step's chunk. Positions in line are updated."""
        if not self.joining:
            tokens = 0
            while self.waiting and self.fits(self.waiting[0]):
                n = len(self.waiting[0].ids)
                if self.joining and tokens + n > self.chunk:
                    break
                self.joining.append(self.waiting.popleft())
                self.joining[-1].position = None
                tokens += n
                if n > self.chunk:  # a long prompt goes alone, in chunks
                    break
        for place, request in enumerate(self.waiting, 1):
            request.position = place
        return list(self.joining)

    def joined(self, request):
        self.joining.remove(request)
        self.running.append(request)

    def drop(self, request):
        """`request` ends, wherever it is."""
        for group in (self.joining, self.running, self.waiting):
            if request in group:
                group.remove(request)

    def all(self) -> list:
        return [*self.running, *self.joining, *self.waiting]
