"""Zero-initialized gated prompts for other encoders: the paper's claim that zero-init attention
also tunes pretrained vision and language encoders (ViT, RoBERTa, CLIP) well.

The same idea as `core.adapter.AdaptionPrompt`, for Hugging Face encoders of either attention layout:
- `query`/`key`/`value` linears in a self-attention module that returns its heads' output before
  the output projection (BERT, RoBERTa, MiniLM: post-norm);
- `q_proj`/`k_proj`/`v_proj` and an `o_proj` or `out_proj` in one module (ViT, DeiT and CLIP's
  towers in transformers 5: pre-norm); the prompts' output joins the heads' before that projection.
The norm's place does not matter: the prompts enter inside the attention, whatever surrounds it.
open_clip's towers use nn.MultiheadAttention (one fused in-projection) and are not covered.

In each of the top L layers, K learnable prompts go through the layer's own key and value
projections; the layer's queries attend to them in a softmax of their own, and that output, scaled
per head by tanh(gate), is added to the attention's output. Gates start at zero, so at init the
encoder's output is exactly the pretrained one's; `gate_init` other than 0 gives the ablation.

`add_gated_prompts(encoder, ...)` is a transform of a built model: a forward hook on each adapted
attention module, removed again by `GatedPrompts.remove()`. The encoder's own weights are frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError


class LayerPrompts(nn.Module):
    """One attention layer's K prompts and per-head gates."""

    def __init__(self, dim: int, n_heads: int, prompt_len: int, gate_init: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.prompts = nn.Parameter(torch.randn(prompt_len, dim) * 0.02)
        self.gate = nn.Parameter(torch.full((n_heads,), float(gate_init)))

    def forward(self, projections, hidden: torch.Tensor) -> torch.Tensor:
        """What the prompts add to the heads' output (B, T, dim) for the attention's input `hidden`
        (B, T, dim); `projections`: the layer's (query, key, value) linears."""
        query, key, value = projections
        B, T, D = hidden.shape
        H, hd = self.n_heads, D // self.n_heads
        q = query(hidden).view(B, T, H, hd).transpose(1, 2)                       # (B, H, T, hd)
        p = self.prompts.to(hidden.dtype)
        k = key(p).view(-1, H, hd).transpose(0, 1)                                # (H, K, hd)
        v = value(p).view(-1, H, hd).transpose(0, 1)
        weights = (q @ k.transpose(-1, -2) * hd ** -0.5).softmax(-1)             # (B, H, T, K)
        out = (weights @ v) * torch.tanh(self.gate).to(hidden.dtype)[None, :, None, None]
        return out.transpose(1, 2).reshape(B, T, D)


# (query, key, value, the output projection when it is inside the same module)
LAYOUTS = (("query", "key", "value", None), ("q_proj", "k_proj", "v_proj", "o_proj"),
           ("q_proj", "k_proj", "v_proj", "out_proj"))


def attention_modules(encoder: nn.Module) -> list[tuple[nn.Module, tuple]]:
    """The encoder's self-attention modules bottom to top, each with its layout's names."""
    found = []
    for module in encoder.modules():
        names = next((n for n in LAYOUTS if all(isinstance(getattr(module, a, None), nn.Linear) for a in n if a)), None)
        if names:
            found.append((module, names))
    return found


class GatedPrompts(nn.Module):
    """The prompts of the top `layers` attention modules of `encoder`, hooked in."""

    def __init__(self, encoder: nn.Module, n_heads: int, prompt_len: int = 10, layers: int = 4,
                 gate_init: float = 0.0):
        super().__init__()
        found = attention_modules(encoder)
        if not found:
            raise UserError(f"{type(encoder).__name__} has no attention with query/key/value linears; accepted: "
                            "Hugging Face BERT, RoBERTa, MiniLM, ViT, DeiT, CLIP and alike")
        if not 1 <= layers <= len(found):
            raise UserError(f"layers must be 1..{len(found)} for this encoder, got {layers}")
        dim = getattr(found[0][0], found[0][1][0]).in_features
        if dim % n_heads:
            raise UserError(f"width {dim} is not a multiple of {n_heads} heads")
        top = found[len(found) - layers:]
        self.targets = [module for module, _ in top]
        self.layers = nn.ModuleList(LayerPrompts(dim, n_heads, prompt_len, gate_init) for _ in top)
        self._hooks = []
        for (module, names), prompts in zip(top, self.layers):
            self._hook(module, names, prompts)

    def _hook(self, attn: nn.Module, names: tuple, prompts: LayerPrompts):
        projections = tuple(getattr(attn, n) for n in names[:3])
        if names[3] is None:  # the module returns the heads' output: add to it
            def add(module, args, kwargs, output):
                extra = prompts(projections, args[0] if args else kwargs["hidden_states"])
                return (output[0] + extra, *output[1:]) if isinstance(output, tuple) else output + extra
            self._hooks.append(attn.register_forward_hook(add, with_kwargs=True))
            return
        # the output projection is inside: keep the module's input, add just before that projection
        seen = {}

        def keep(module, args, kwargs):
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]

        def add_before(module, args):
            return (args[0] + prompts(projections, seen.pop("hidden")).to(args[0].dtype), *args[1:])
        self._hooks.append(attn.register_forward_pre_hook(keep, with_kwargs=True))
        self._hooks.append(getattr(attn, names[3]).register_forward_pre_hook(add_before))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def add_gated_prompts(encoder: nn.Module, n_heads: int, prompt_len: int = 10, layers: int = 4,
                      gate_init: float = 0.0) -> GatedPrompts:
    """Freeze `encoder` and hook gated prompts into its top `layers` attention modules."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    return GatedPrompts(encoder, n_heads, prompt_len, layers, gate_init)
