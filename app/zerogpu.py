"""ZeroGPU Spaces: the GPU is lent to one call of a function decorated with `spaces.GPU` (the
`spaces` package, which such Spaces have), in a worker forked for the call, and to nothing else.
So there a reply runs start to end inside one such call, instead of on the engine's worker
thread; its text deltas and token count come back across the fork. Anywhere else (`SPACES_ZERO_GPU`
unset) the decorator is a no-op and `ON_ZERO_GPU` is False, so the engine serves as usual.

Not yet run on a real ZeroGPU Space (none is reachable from here); the no-op path is tested.
"""
from __future__ import annotations

import os
import time
from typing import Iterator

ON_ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))
REPLY_SECONDS = 120  # the GPU time asked for one reply (ZeroGPU's quota counts it)

_waiting: dict[int, tuple] = {}  # reply id -> (engine, reply): the forked worker finds it in its copy of memory


def gpu(fn):
    """`spaces.GPU` on ZeroGPU (the function must be decorated when the app starts), else `fn` itself."""
    if not ON_ZERO_GPU:
        return fn
    import spaces
    return spaces.GPU(duration=REPLY_SECONDS)(fn)


@gpu
def _run(key: int) -> Iterator[tuple[str, int]]:
    engine, reply = _waiting.pop(key)
    for delta in engine.run_here(reply):
        yield delta, reply.tokens


def stream(engine, reply) -> Iterator[str]:
    """An unqueued reply's text deltas, computed under `spaces.GPU`; the reply's token count and
    timings are kept up to date here, for its stats line."""
    _waiting[id(reply)] = (engine, reply)
    try:
        for delta, tokens in _run(id(reply)):
            if reply.first_token is None:
                reply.first_token = time.perf_counter()
            reply.tokens = tokens
            yield delta
    finally:
        _waiting.pop(id(reply), None)
        reply.finished = reply.finished or time.perf_counter()
