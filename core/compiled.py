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
- Shapes are dynamic (cache length, prompt length, rows): a graph serves every length (only the
  KV caches' heads are fixed: core.model.mark_heads_static). torch still compiles one row apart from
  several (a size of 1 is always fixed), plain decoding apart from the engine's (each row at its
  own position; there one row in a one-slot cache is a kind of its own too), and rows with
  adapters apart from rows without. `ChatEngine.warm_up` runs the engine's base kinds before
  serving; an adapter kind compiles at its first use.
- The compile is paid once a process, at the first step: ~3 minutes on 2 cores with a cold cache,
  ~20 s with inductor's on-disk cache warm (`TORCHINDUCTOR_CACHE_DIR`; ours by default, so it
  survives /tmp cleaners). `core.serving.ChatEngine.warm_up` runs it before a server takes requests.
- One-row float products become multiply-sums (`one_row_matmuls`, an inductor pass over the
  compiled graph). A batch-1 token is ~120 matrix-vector products that stream the weights once;
  MKL's GEMV reads them at 11-18 GB/s here, while inductor's fused multiply-sum over contiguous
  rows streams at ~45 GB/s, about what a plain sum over the same bytes reaches. Over SmolLM2's 121
  fp32 products a token: 13-17 ms against 37-47 with F.linear (measured here, one process each).
  Float weights are laid out row-major for it (core.model.cpu_decode_layout). Several rows (the
  engine's batches) stay matrix products. int8 and int4 keep torch's kernels: the same rewrite of
  the int8 product was 2x faster alone but slower inside the fused graph, and int4's unpacking
  written as tensor ops compiled to loops 3-15x slower than its kernel.
- Dynamo checks guards before every step: that each of the ~420 tensors the graph reads still has
  its dtype, shape and strides, and more. The base's weights are fixed once the step is compiled
  (quantization and the layout come before it), so their tensor guards are dropped
  (`CompiledStep.guards`): about 1 ms of an int4 token's 8-9 here (tests/test_compiled.py and
  docs/quantization.md). The graph still reads the weights at every call; everything that varies
  between steps keeps its guards: the tokens, the KV caches, adapters' tensors, and which modules
  sit where (a V2 wrapper or an adapter's prompt is another graph).
- Any failure to compile or run the compiled step prints one notice and decodes eagerly from then.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from core.files import cache_dir
from core.model import Transformer, cpu_decode_layout


def _one_row(node) -> bool:
    """The product's left side is a single row on CPU, as the graph knows it statically."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    val = node.meta.get("val")
    return val is not None and val.device.type == "cpu" and val.dim() == 2 and statically_known_true(val.shape[0] == 1)


def _one_row_patterns():
    """The inductor pattern: x @ w (F.linear's mm) with one row of x, as a multiply-sum in fp32."""
    from torch._dynamo.utils import counters
    from torch._inductor.pattern_matcher import Arg, CallFunction, PatternMatcherPass, register_graph_pattern
    aten = torch.ops.aten
    patterns = PatternMatcherPass(pass_name="one_row_matmuls")

    @register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=patterns)
    def matmul(match, x, w):
        if not _one_row(x):
            return
        counters["inductor"]["one_row_matmuls"] += 1
        match.replace_by_example(lambda x, w: (x[:, :, None].float() * w[None].float()).sum(1).to(x.dtype), [x, w])
        # x is computed once, before the loop: left to itself inductor fuses its producer (the
        # final RMSNorm, say) into the loop and recomputes it for each of the head's 49,152 rows
        x.meta["inductor_realize_to_strides"] = True
    return patterns


@functools.cache
def one_row_matmuls():
    """The pass, as inductor's CustomGraphPass (its uuid keys inductor's on-disk cache). Each
    rewrite counts in torch._dynamo.utils.counters["inductor"]["one_row_matmuls"]."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class OneRowMatmuls(CustomGraphPass):
        patterns = _one_row_patterns()

        def __call__(self, graph):
            self.patterns.apply(graph)

        def uuid(self):
            return get_hash_for_files((__file__,))
    return OneRowMatmuls()


def base_weights(model: Transformer) -> dict[int, torch.Tensor]:
    """The model's weights as they are now, by id: its parameters and buffers, and those of the fused
    projections (core.quantize.Fused is a plain object, outside the module tree)."""
    tensors = [*model.parameters(), *model.buffers()]
    for layer in model.layers:
        for fused in (layer.attention.wqkv, layer.feed_forward.w13):
            if fused is None:  # no fused layout (a float model on CUDA, say)
                continue
            kernel = getattr(fused, "kernel", fused)  # a quantized Fused's kernel, or the float layout's tensor
            tensors += list(kernel.buffers()) if isinstance(kernel, torch.nn.Module) else [kernel]
    return {id(t): t for t in tensors}


class CompiledStep:
    """`forward` compiled on its first call; `forward` itself after a failure (said once).
    `weights`: tensors whose guards the step drops (base_weights; see the module docstring)."""

    def __init__(self, forward, weights: dict[int, torch.Tensor] | None = None):
        self.forward = forward
        self.weights = weights or {}
        self.failed = False
        self.compiled = None

    def guards(self, entries) -> list[bool]:
        """torch.compile's guard_filter_fn: keep every guard but the tensor checks of `weights`."""
        return [not (e.guard_type == "TENSOR_MATCH" and self.weights.get(id(e.value)) is e.value) for e in entries]

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.forward(*args, **kwargs)
        try:
            if self.compiled is None:
                # the C++ wrapper: 12.5 -> 8.4 ms a token at int4 here; CUDA steps would want CUDA graphs instead
                on_cpu = all(t.device.type == "cpu" for t in args if isinstance(t, torch.Tensor))
                options = {"guard_filter_fn": self.guards}
                if on_cpu:
                    options.update(cpp_wrapper=True, post_grad_custom_post_pass=one_row_matmuls())
                self.compiled = torch.compile(self.forward, dynamic=True, options=options)
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager step is always right
            self.failed = True
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"note: the compiled decode step failed ({type(e).__name__}: {first}); decoding eagerly",
                  file=sys.stderr)
            return self.forward(*args, **kwargs)


def compile_decode(model: Transformer) -> Transformer:
    """The model's one-token steps run compiled from now on (see the module docstring)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    # torch writes its /tmp default into the environment as soon as torch._dynamo is imported (the
    # model's loading does), so that value too means "not chosen by the user"
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    on_cpu = model.tok_embeddings.weight.device.type == "cpu"
    if on_cpu and getattr(model, "quantization", "none") == "none":
        cpu_decode_layout(model, column_major=False)  # what the one-row multiply-sums read fastest
    model.decode_step = CompiledStep(model.forward, base_weights(model))
    return model

