"""Weight-only quantization as a transform of a built model (as gpt-fast's quantize.py): the frozen
base's linears (attention, feed-forward and the output head) become `Int8Linear` (int8, one scale
per output channel) or `Int4Linear` (4-bit codes in groups along the input, a scale and zero per
group). They run on torch's weight-only kernels with bf16 activations: on CPU
`aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (torchao 0.18 has no int4 CPU
path with torch 2.14; its int8 works but the aten op is the same kernel); on CUDA
`aten._weight_int4pack_mm`, and int8 as a dequantized bf16 matmul (torch has no CUDA int8
weight-only op). The head is int8 in both modes: it decides every token, and GGUF files keep it
at 8 bits or more too.

GGUF quants map onto them without a float copy (`from_gguf`):
- Q4_1 stores w = d·q + m per block of 32; the int4 kernel computes (q - 8)·scale + zero, so the
  file's 4-bit codes are kept and scale = d, zero = m + 8d. Q4_0 (w = d·(q - 8)) has zero 0. Only
  d and m round, from fp16 to bf16.
- Q8_0 (w = d·q per block of 32) becomes int8 with one scale per row: the blocks' exact values
  requantized, which is a small error of its own (README: Quantization).

Gradients flow through a quantized linear to its input (the dequantized product), so an adapter
trains over a quantized frozen base; the base itself never changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

MODES = ("none", "int8", "int4")
GROUPS = (32, 64, 128)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # a block of 32 weights in the GGUF file
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class _QuantizedMatmul(torch.autograd.Function):
    """x @ W.T on the quantized kernel; backward: the input's gradient through dequantized W."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module.kernel(x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize().to(grad.dtype), None


class QuantizedLinear(nn.Module):
    """What both kinds share: the bf16 activation path and the autograd wrapper."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = _QuantizedMatmul.apply(flat, self) if torch.is_grad_enabled() and flat.requires_grad else self.kernel(flat)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantizedLinear):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, chunk: int = 4096) -> "Int8Linear":
        """One scale per row (absmax / 127); `w` may be a function of (start, end) giving those
        rows in fp32 with `.shape` of the whole, so no fp32 copy of a large matrix is ever made."""
        rows = w.shape[0]
        codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(rows, dtype=torch.float32, device=codes.device)
        for start in range(0, rows, chunk):
            part = w(start, start + chunk) if callable(w) else w[start:start + chunk].float()
            scales[start:start + chunk] = (part.abs().amax(dim=1) / 127).clamp(min=1e-12)
            codes[start:start + chunk] = torch.round(part / scales[start:start + chunk, None]).clamp(-128, 127)
        return cls(codes, scales)

    def kernel(self, x):
        if x.device.type == "cuda":
            return F.linear(x, self.codes.to(x.dtype)) * self.scales
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float()[:, None]


class Int4Linear(QuantizedLinear):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
        """codes (N, K) in 0..15; scales and zeros (N, K / group): w = (q - 8) * scale + zero."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group
        if codes.device.type == "cuda":
            pairs = codes.to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack((pairs[:, ::2] << 4) | pairs[:, 1::2], 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int) -> "Int4Linear":
        """Asymmetric per group: its min and max span the 16 codes."""
        w = w.float()
        N, K = w.shape
        g = w.reshape(N, K // group, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        codes = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).reshape(N, K)
        return cls(codes, scales, lo + 8 * scales, group)

    def kernel(self, x):
        if x.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)

    def dequantize(self) -> torch.Tensor:
        """W (N, K) as the kernel sees it: its product with the identity (bf16)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self.kernel(eye).t().float()


# -- fused projections ------------------------------------------------------------------------------
class Fused:
    """Several quantized linears of one input (q|k|v, gate|up) as one kernel call: their codes and
    scales concatenated by rows into one buffer, which each of them keeps viewing (no copy). A
    SmolLM2 token then makes 120 quantized matmul calls instead of 210. A plain object, not a
    Module: the buffers stay the parts' own in state_dict. `holds` tells whether the parts are still
    the model's (a V2 wrapper or LoRA replaces one: the layer then calls them one by one)."""

    def __init__(self, kernel: QuantizedLinear, parts: tuple):
        self.kernel, self.parts = kernel, parts

    def holds(self, linears) -> bool:
        """The parts are still these linears, on the kernel's device (a move gives them copies of
        their own). Identity and device only: both are free under torch.compile's guards, where a
        storage comparison would break the graph."""
        name = "codes" if isinstance(self.kernel, Int8Linear) else "packed"
        return (len(linears) == len(self.parts) and all(a is b for a, b in zip(linears, self.parts))
                and getattr(linears[0], name).device == getattr(self.kernel, name).device)

    def __call__(self, x):
        return self.kernel(x)


INT4_ROW_BLOCK = 64  # the CPU int4 packing lays rows out in blocks of 64: a row slice at a multiple is a pack of its own


def fuse(linears) -> Fused | None:
    """A Fused for `linears` where their kind allows (see Fused), else None."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or len({m.in_features for m in linears}) != 1:
        return None
    rows = [m.out_features for m in linears]
    bounds = [sum(rows[:i]) for i in range(len(rows) + 1)]
    if kinds == {Int8Linear}:
        kernel = Int8Linear(torch.cat([m.codes for m in linears]), torch.cat([m.scales for m in linears]))
        for m, start, end in zip(linears, bounds, bounds[1:]):
            m.codes, m.scales = kernel.codes[start:end], kernel.scales[start:end]
        return Fused(kernel, tuple(linears))
    if kinds == {Int4Linear} and len({m.group for m in linears}) == 1 and linears[0].packed.device.type == "cpu" \
            and all(b % INT4_ROW_BLOCK == 0 for b in bounds):
        kernel = Int4Linear.__new__(Int4Linear)
        QuantizedLinear.__init__(kernel)
        kernel.out_features, kernel.in_features, kernel.group = bounds[-1], linears[0].in_features, linears[0].group
        kernel.register_buffer("packed", torch.cat([m.packed for m in linears]))
        kernel.register_buffer("scales_zeros", torch.cat([m.scales_zeros for m in linears], dim=1))
        for m, start, end in zip(linears, bounds, bounds[1:]):
            m.packed = kernel.packed[start:end]
        return Fused(kernel, tuple(linears))
    return None


# -- GGUF blocks -----------------------------------------------------------------------------------
def gguf_blocks(raw, kind: str) -> dict:
    """A Q4_0, Q4_1 or Q8_0 tensor's blocks ((rows, bytes) numpy uint8, as the file holds them) as
    torch tensors: codes (rows, cols) and per-block d (and m), (rows, cols / 32), in fp32."""
    import numpy as np
    rows = raw.shape[0]
    blocks = np.asarray(raw).reshape(rows, -1, BLOCK_BYTES[kind])
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0])
    if kind == "Q8_0":
        codes = blocks[..., 2:].copy().view(np.int8)
        return {"codes": torch.from_numpy(codes.reshape(rows, -1).astype(np.int32)), "d": d}
    start = 4 if kind == "Q4_1" else 2
    qs = blocks[..., start:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j: low nibble of byte j; j + 16: high
    out = {"codes": torch.from_numpy(codes.reshape(rows, -1).astype(np.int32)), "d": d}
    if kind == "Q4_1":
        out["m"] = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0])
    return out


def from_gguf(raw, kind: str, mode: str, device="cpu") -> QuantizedLinear:
    """A quantized linear from a GGUF tensor's bytes, keeping its codes where the mode allows."""
    if mode == "int4" and kind in ("Q4_0", "Q4_1") and raw.shape[0] % 16 == 0:
        blocks = gguf_blocks(raw, kind)
        d = blocks["d"].to(device)
        zeros = blocks["m"].to(device) + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
        return Int4Linear(blocks["codes"].to(device), d, zeros, 32)
    return Int8Linear.from_float(RowsOf(raw, kind, device))


class RowsOf:
    """A GGUF tensor's exact rows on demand, rows(start, end) in fp32 (for chunked requantizing)."""

    def __init__(self, raw, kind: str, device="cpu"):
        self.raw, self.kind, self.device = raw, kind, torch.device(device)
        self.shape = (raw.shape[0], raw.shape[1] // BLOCK_BYTES[kind] * 32)

    def __call__(self, start: int, end: int) -> torch.Tensor:
        return dequantize_blocks(gguf_blocks(self.raw[start:end], self.kind), self.kind).to(self.device)


def dequantize_rows(raw, kind: str, dtype: torch.dtype, chunk: int = 4096) -> torch.Tensor:
    """A GGUF tensor's exact values in `dtype`, unpacked `chunk` rows at a time (no fp32 copy of it)."""
    out = torch.empty(raw.shape[0], raw.shape[1] // BLOCK_BYTES[kind] * 32, dtype=dtype)
    for start in range(0, raw.shape[0], chunk):
        out[start:start + chunk] = dequantize_blocks(gguf_blocks(raw[start:start + chunk], kind), kind).to(dtype)
    return out


def dequantize_blocks(blocks: dict, kind: str) -> torch.Tensor:
    """The blocks' exact values, (rows, cols) fp32 (one tensor at a time, never the whole model)."""
    d = blocks["d"].repeat_interleave(32, dim=1)
    q = blocks["codes"].float()
    if kind == "Q8_0":
        return d * q
    if kind == "Q4_0":
        return d * (q - 8)
    return d * q + blocks["m"].repeat_interleave(32, dim=1)


# -- the transform -----------------------------------------------------------------------------
def quantize(model, mode: str, group: int = 32, sources: dict | None = None, device=None):
    """Replace `model`'s block linears and output head with quantized ones (in place; returns it).
    `sources`: weight name -> (kind, GGUF blocks) for weights to take from a GGUF file's codes;
    the others are quantized from the model's own (float) weights. A width `group` does not divide
    falls back to the largest of GROUPS that does; a linear int4 cannot hold (no group divides its
    input width, or its output width is not a multiple of 16) becomes int8."""
    if mode not in MODES:
        raise UserError(f"unknown quantization {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "none":
        return model
    sources = sources or {}
    device = device or model.tok_embeddings.weight.device
    for i, block in enumerate(model.layers):
        for name in BLOCK_LINEARS:
            part, attr = name.split(".")
            parent = getattr(block, part)
            key = f"layers.{i}.{name}.weight"
            setattr(parent, attr, _quantized(getattr(parent, attr), key, mode, group, sources, device))
        attn, ffn = block.attention, block.feed_forward
        attn.wqkv, ffn.w13 = fuse((attn.wq, attn.wk, attn.wv)), fuse((ffn.w1, ffn.w3))  # replacing the fp32 layout's
    tied = model.args.tie_embeddings and "output.weight" not in sources
    model.output = _quantized(model.output, "tok_embeddings.weight" if tied else "output.weight", "int8", group,
                              sources, device)
    model.quantization = mode
    return model


def _quantized(linear, key: str, mode: str, group: int, sources: dict, device) -> QuantizedLinear:
    if key in sources:
        kind, raw = sources[key]
        return from_gguf(raw, kind, mode, device)
    w = linear.weight.detach().to(device)
    if mode == "int4" and w.shape[0] % 16 == 0:  # the CPU int4 packing needs 16 | out_features
        fits = [g for g in (group, *sorted(GROUPS, reverse=True)) if w.shape[1] % g == 0]
        if fits:
            return Int4Linear.from_float(w, fits[0])
    return Int8Linear.from_float(w)
