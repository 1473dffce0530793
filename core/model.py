"""One plain-PyTorch LLaMA-family decoder (LLaMA-1/2/3, TinyLlama, SmolLM, any LlamaForCausalLM).

Weights use Meta's module names (tok_embeddings, layers.N.attention.wq, ...) and the Hugging Face
"rotate-half" RoPE layout; loaders of interleaved-layout checkpoints (Meta, GGUF) un-permute Q/K.
Adapters, model parallelism and the like are transforms applied to a built model (core/adapter.py,
core/parallel.py); the only hook here is `Attention.prompt`, which an adapter fills.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}
    rope_scaling: dict | None = None
    rope_freq_factors: list[float] | None = None  # GGUF's rope_freqs tensor (divides inv_freq)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim: int | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN width as Meta's params.json implies it (2/3 of 4*dim, scaled, rounded up)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended
        smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    if args.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float64)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32 as the reference implementations do, then cast back (F.rms_norm is
        # x * rsqrt(mean(x^2) + eps) in one kernel: bit-identical to the spelled-out ops, 2x faster)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def mark_heads_static(*caches: torch.Tensor):
    """A KV cache's (batch, heads, length, head_dim) as the compiled decode step (core.compiled)
    should see them: heads and head_dim fixed (as symbols they break the graph at attention).
    Batch and length are left to the step's `dynamic=True`, so one graph serves every prompt and
    batch (as fixed sizes, each new length would compile the whole step again, minutes on 2 cores,
    until torch's recompile limit sends decoding back to eager). Left unmarked, they are "duck"
    sizes: the 60 caches of SmolLM2, all of one length, share one symbol, where marked dynamic each
    had its own, each converted and checked before every token (~7% of an int4 token here,
    docs/quantization.md)."""
    for t in caches:
        torch._dynamo.mark_static(t, 1)
        torch._dynamo.mark_static(t, 3)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        # plain attributes, not buffers: torch.compile takes a module's buffers as fixed shapes
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        mark_heads_static(self.k, self.v)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_kv_heads = args.n_kv_heads  # held by this module (a share of them under model parallelism)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        # An adapter's gated adaption prompt (core.adapter.AdaptionPrompt); None for the base model.
        # A submodule slot from the start: a module set there and then None again stays in
        # _modules, and a compiled step's guards must find it in the same place either way (else the
        # base model's graph is compiled again after the first adapter, and runs split in pieces)
        self.register_module("prompt", None)
        self.wqkv = None  # [wq; wk; wv] in one storage (cpu_decode_layout, core.quantize.fuse)

    def forward(self, x, cos, sin, mask, start_pos: int):
        B, T, _ = x.shape
        q, k, v = project(x, (self.wq, self.wk, self.wv), self.wqkv)
        # the heads this module holds (fewer under model parallelism), counted from the projection's
        # fixed width: as -1 they would be a symbol in a compiled step of dynamic batch
        q, k, v = (t.view(B, T, t.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        out = attend(q, k, v, mask, is_causal=mask is None and T > 1 and start_pos == 0)
        if self.prompt is not None:
            out = out + self.prompt(self, q)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(d)) v, each query head on its group's key/value head. One query per
    row in bf16 on CPU goes through plain matmuls (softmax in fp32): torch's fused kernel takes
    3-7x as long there (154 against 56 us over 256 keys, 577 against 84 over 1024, measured here)."""
    B, H, T, D = q.shape
    if T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        n_kv = k.shape[1]
        scores = q.view(B, n_kv, H // n_kv, D) @ k.transpose(-1, -2) * D ** -0.5  # (B, n_kv, group, keys)
        if mask is not None:
            scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
        return (scores.float().softmax(-1).to(q.dtype) @ v).view(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=H != k.shape[1])


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13 = None  # [w1; w3] in one storage (cpu_decode_layout, core.quantize.fuse)

    def forward(self, x):
        gate, up = project(x, (self.w1, self.w3), self.w13)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, start_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.decode_step = None  # the one-token forward compiled (core.compiled); None: this forward

    # -- KV cache ---------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int):
        p = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch, attn.n_kv_heads, max_len, attn.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    # -- forward ----------------------------------------------------------------------------
    def first_trainable_layer(self) -> int:
        """Index of the lowest layer holding a parameter that wants gradients, or whose prompts
        carry a condition that does (a bind network in training); n_layers if none, -1 if the
        embedding wants them. Layers below it run without autograd."""
        if self.tok_embeddings.weight.requires_grad:
            return -1
        for i, layer in enumerate(self.layers):
            condition = getattr(layer.attention.prompt, "condition", None)
            if any(p.requires_grad for p in layer.parameters()) or (condition is not None and condition.requires_grad):
                return i
        return len(self.layers)

    def forward(self, tokens: torch.Tensor, start_pos=0, key_mask: torch.Tensor | None = None,
                last_only: bool = False, select: torch.Tensor | None = None,
                return_hidden: bool = False, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at cache positions [start_pos, start_pos+T).
        key_mask (B, start_pos+T) bool marks real (non-pad) tokens, for batches of left-padded
        prompts; RoPE positions then count real tokens only. Returns logits (B, T|1, vocab) fp32,
        or with `select` ((B, T) bool) only the selected positions' logits, (N, vocab): training
        needs them at response tokens only, and the output head is a large share of the work.
        return_hidden: the final-normed hidden states instead of logits (for a fused head + loss).
        positions (B, T) and attn_mask (B, 1, T, keys): rows each at their own place (the batched
        decode of core.runner), whose KV caches read `start_pos` as they define it."""
        B, T = tokens.shape
        grad = torch.is_grad_enabled()
        first = self.first_trainable_layer() if grad else len(self.layers)
        if positions is not None:
            pos, mask = positions, attn_mask
        elif key_mask is None:
            pos = torch.arange(start_pos, start_pos + T, device=tokens.device)
            mask = None
            if T > 1 and start_pos > 0:  # a chunk continuing a cache: causal with an offset
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=tokens.device).tril(start_pos)
        else:
            pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:start_pos + T]
            causal = torch.ones(T, start_pos + T, dtype=torch.bool, device=tokens.device).tril(start_pos)
            mask = causal & key_mask[:, None, None, :]
            # a pad query attends to itself, so no row is fully masked (that would give NaN)
            self_key = torch.zeros(T, start_pos + T, dtype=torch.bool, device=tokens.device)
            self_key[torch.arange(T), torch.arange(start_pos, start_pos + T)] = True
            mask = mask | self_key
        angles = pos.unsqueeze(-1).float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        if cos.dim() == 3:  # per-sequence positions: (B, T, hd) -> (B, 1, T, hd)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        with torch.set_grad_enabled(grad and first < 0):
            h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            with torch.set_grad_enabled(grad and i >= first):
                h = layer(h, cos, sin, mask, start_pos)
        if last_only:
            h = h[:, -1:]
        if select is not None:
            h = h[select]
        h = self.norm(h)
        return h if return_hidden else self.output(h).float()


def project(x: torch.Tensor, linears, fused) -> tuple[torch.Tensor, ...]:
    """x through each of `linears`, in one call while `fused` still holds them: a float weight
    (cpu_decode_layout) or a quantized kernel (core.quantize.Fused)."""
    if isinstance(fused, torch.Tensor):
        if still_fused(linears, fused):
            return F.linear(x, fused).split([linear.out_features for linear in linears], dim=-1)
    elif fused is not None and fused.holds(linears):
        return fused(x).split([linear.out_features for linear in linears], dim=-1)
    return tuple(linear(x) for linear in linears)


def still_fused(linears, fused: torch.Tensor | None) -> bool:
    """Whether `fused` still holds the weights of `linears`, stacked in order.

    cpu_decode_layout() makes q|k|v and gate|up one matrix each while the separate Linears keep
    viewing their slice, so adapters (which call wk/wv), state_dict and loaders see no change. Any
    later transform that wraps or replaces one of them (V2 bias/scale, model parallelism), moves it
    (.to) or makes it trainable breaks the match, and the layer falls back to separate matmuls."""
    if fused is None:
        return False
    row = 0
    for linear in linears:
        w = linear.weight
        if (type(linear) is not nn.Linear or w.requires_grad or w.device != fused.device
                or w.stride() != fused.stride()):
            return False
        # the storage check breaks a compiled graph in two at every layer (dynamo cannot trace
        # data_ptr); the compiled step (core.compiled) relies on its guards over the rest
        if not torch.compiler.is_compiling() and w.data_ptr() != fused[row].data_ptr():
            return False
        row += w.shape[0]
    return True


def cpu_decode_layout(model: "Transformer", column_major: bool = True) -> "Transformer":
    """Lay out the frozen weights for batch-1 CPU decoding, which streams all of them from DRAM
    once per token: fewer, wider matrices, laid out the way the matrix-vector kernel reads fastest.

    - q|k|v and gate|up become one matmul each (fewer, larger GEMVs);
    - column_major (for eager MKL): linear weights with out >= in are stored transposed, keeping
      their logical (out, in) shape. With Linear's row-major layout MKL's GEMV walks rows of only
      `in` floats (576 for SmolLM2) and streamed ~8 GB/s from DRAM here, with (in, out) rows 11-18
      GB/s (the down projection, in > out, is faster row-major: 12.5 vs 10.5 GB/s). F.linear(x, w)
      multiplies by w.t(), which is then contiguous: no copies. The tied embedding reads the same
      storage (a strided row gather, cheap for a few tokens).
    - row-major (for the compiled step, core.compiled): its one-row products are multiply-sums
      along each row, which stream at ~45 GB/s over contiguous rows.
    Called again, it re-lays the model out (one matrix at a time)."""
    def lay(w):
        return w.t().contiguous().t() if column_major else w.contiguous()
    fused_parts = set()
    with torch.no_grad():
        for module in model.modules():
            parts = (module.wq, module.wk, module.wv) if isinstance(module, Attention) else \
                (module.w1, module.w3) if isinstance(module, FeedForward) else ()
            if parts and all(type(m) is nn.Linear for m in parts):  # a V2 wrapper or LoRA: left as it is
                setattr(module, "wqkv" if isinstance(module, Attention) else "w13", _stack(lay, parts))
                fused_parts.update(parts)
            elif type(module) is nn.Linear and module not in fused_parts \
                    and module.out_features >= module.in_features:
                module.weight.data = lay(module.weight.data)
    return model


def _stack(lay, linears) -> torch.Tensor:
    fused = lay(torch.cat([m.weight.data for m in linears]))
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[row:row + n]
        row += n
    return fused


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
