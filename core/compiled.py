"""The compiled one-token decode step, a transform applied to a built model (as quantize is).

Batch-1 decode of a small model is bound by overhead, not arithmetic: SmolLM2-135M at int4 does
about 3 ms of weight-only matmuls a token, yet eager PyTorch takes about 14 ms, most of it in the
~1,500 small ops' dispatch (measured here: bench/bench_decode.py --vs llamacpp, 71 tok/s eager
and 125 compiled). torch.compile (inductor) fuses the norms, RoPE, attention and residuals into
a few C++ loops, and its C++ wrapper calls them and the matmul kernels without the Python
interpreter between them.

- `compile_decode(model)` sets `model.decode_step`; `core.generation.generate_tokens` and the
  engine's `core.runner.Runner.decode` call it for every one-token step (prefill stays eager: it
  is one large forward that runs at the GEMMs' speed already).
- Shapes are dynamic (cache length, prompt length, rows): a graph serves every length. torch
  still compiles one row apart from several, plain decoding apart from the engine's (each row at
  its own position), and rows with adapters apart from rows without: up to six graphs in all.
- The compile is paid once a process, at the first step: ~3 minutes on 2 cores with a cold cache,
  ~20 s with inductor's on-disk cache warm (`TORCHINDUCTOR_CACHE_DIR`; ours by default, so it
  survives /tmp cleaners). `core.serving.ChatEngine.warm_up` runs it before a server takes requests.
- Any failure to compile or run the compiled step prints one notice and decodes eagerly from then.
"""
from __future__ import annotations

import os
import sys
import torch

from core.files import cache_dir
from core.model import Transformer

class CompiledStep:
    """`forward` compiled on its first call; `forward` itself after a failure (said once)."""

    def __init__(self, forward):
        self.forward = forward
        self.failed = False
        self.compiled = None

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.forward(*args, **kwargs)
        try:
            if self.compiled is None:
                # the C++ wrapper: 12.5 -> 8.4 ms a token at int4 here; CUDA steps would want CUDA graphs instead
                on_cpu = all(t.device.type == "cpu" for t in args if isinstance(t, torch.Tensor))
                self.compiled = torch.compile(self.forward, dynamic=True,
                                              options={"cpp_wrapper": True} if on_cpu else None)
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager step is always right
            self.failed = True
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"note: the compiled decode step failed ({type(e).__name__}: {first}); decoding eagerly",
                  file=sys.stderr)
            return self.forward(*args, **kwargs)


def compile_decode(model: Transformer) -> Transformer:
    """The model's one-token steps run compiled from now on (see the module docstring)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    model.decode_step = CompiledStep(model.forward)
    return model

