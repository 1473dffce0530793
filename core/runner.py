"""The model runner: what one engine step computes, whoever decided it (core.scheduler decides).

- `decode(rows)`: one forward over every live row, each at its own length and RoPE position,
  each with its own adapter (or none) and media condition.
- `prefill_whole(rows, prompts)`: several joining rows' whole prompts in one forward, then each
  takes the batch's next slot (a copy of its part of the prefill cache);
- `prefill(row, chunk)`: a chunk of one joining row's long prompt, on a cache of its own; `join`
  then copies that cache into the batch's next slot.

Live rows keep their keys and values packed in slots [0, B) of one `SlotCache` per layer, so the
decode step attends over a view of it (no gather), each row masked to its own length. A row that
leaves hands its slot to the last row (one row's copy). The cache grows as it is used: slots by
powers of two, length by `CHUNK` tokens; `SlotCache.tokens_for` is what the scheduler budgets.

Per-row adapters in one forward (`RowAdapters`), which no peer does for adaption prompts: each
layer's prompt keys and values of every row, padded to the longest K and masked, with each row's
tanh(gate) (zero where its adapter does not reach the layer: that row's output is then exactly the
base's); V2 bias, scale, LoRA and norm weights as per-row tensors (bias 0, scale 1, LoRA 0 and the
base norm for rows without). They are built when the rows change and swapped in for the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.adapter import V2_LINEARS, AdaptedLinear, Adapter
from core.model import KVCache, RMSNorm, Transformer, attend, mark_heads_static

CHUNK = 256  # the cache grows by this many positions


@dataclass(eq=False)  # a row is itself: two rows alike are still two rows
class Row:
    """What the runner needs of a live reply."""
    adapter: Adapter | None
    condition: torch.Tensor | None  # (1, dim) from the adapter's bind network, (1, K, dim) from visual queries
    length: int = 0                 # tokens in its cache


@dataclass
class DecodeStep:
    """Where a decode step's new keys and values go: row b at position positions[b]."""
    positions: torch.Tensor  # (B,)
    length: int              # keys to attend over: max(positions) + 1


class SlotCache(nn.Module):
    """One layer's keys and values of the live rows: (slots, n_kv_heads, capacity, head_dim). A
    Module, as the attention's `kv_cache` is; its tensors are plain attributes (they are replaced
    as it grows)."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        self.shape = (n_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.free()

    @staticmethod
    def tokens_for(rows: int, length: int) -> int:
        """Positions allocated for `rows` rows of up to `length` tokens (what the cache grows to)."""
        return SlotCache.slots_for(rows) * SlotCache.capacity_for(length)

    @staticmethod
    def slots_for(rows: int) -> int:
        """A power of two, at least `rows`."""
        return 1 << max(0, rows - 1).bit_length()

    @staticmethod
    def capacity_for(length: int) -> int:
        """Whole chunks, always more than `length`: a step that read the cache to its very end
        would be another shape to torch.compile (a contiguous slice), so another whole compile."""
        return (length // CHUNK + 1) * CHUNK

    def reserve(self, rows: int, length: int):
        slots, cap = self.k.shape[0], self.k.shape[2]
        want_slots = max(slots, self.slots_for(rows))
        want_cap = max(cap, self.capacity_for(length))
        if (want_slots, want_cap) == (slots, cap):
            return
        k = torch.zeros(want_slots, self.shape[0], want_cap, self.shape[1], dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        k[:slots, :, :cap], v[:slots, :, :cap] = self.k, self.v
        self.k, self.v = k, v
        mark_heads_static(k, v)

    def update(self, step: DecodeStep, k: torch.Tensor, v: torch.Tensor):
        """Called by Attention in a decode step: k, v (B, n_kv, 1, hd)."""
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)
        self.k[rows, :, step.positions] = k[:, :, 0]
        self.v[rows, :, step.positions] = v[:, :, 0]
        return self.k[:B, :, :step.length], self.v[:B, :, :step.length]

    def put(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        """A prefilled row's (1, n_kv, n, hd) keys and values into `slot`."""
        n = k.shape[2]
        self.k[slot, :, :n], self.v[slot, :, :n] = k[0], v[0]

    def move(self, src: int, dst: int, n: int):
        self.k[dst, :, :n], self.v[dst, :, :n] = self.k[src, :, :n], self.v[src, :, :n]

    def free(self):
        self.k = self.v = torch.empty(0, self.shape[0], 0, self.shape[1], dtype=self.dtype, device=self.device)


class RowPrompts(nn.Module):
    """One layer's adaption prompts for each row of a batch (see the module docstring)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor):
        super().__init__()
        self.k, self.v, self.mask, self.gates = k, v, mask, gates  # (B, n_kv, K, hd) x2, (B, 1, 1, K), (B, H, 1, 1)
        mark_heads_static(k, v)  # fixed heads: as symbols they break a compiled step at attention

    def forward(self, attn, q: torch.Tensor) -> torch.Tensor:
        return self.gates * attend(q, self.k, self.v, self.mask)


class RowLinear(AdaptedLinear):
    """AdaptedLinear with each row's own parts: bias and scale (B, 1, out) broadcast over the row's
    tokens in the same formula; LoRA pairs (B, r, in) and (B, out, r) as batched products."""

    def forward(self, x):  # x (B, T, in)
        y = self.without_lora(x)
        if self.lora_a is not None:
            y = y + torch.bmm(torch.bmm(x, self.lora_a.transpose(1, 2)), self.lora_b.transpose(1, 2))
        return y


class RowNorm(nn.Module):
    """An RMSNorm with each row's own weight (B, 1, dim)."""

    def __init__(self, base: RMSNorm, weight: torch.Tensor):
        super().__init__()
        self.base, self.weight, self.eps = base, weight, base.eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RowAdapters:
    """The swaps that give each row of a batch its own adapter and condition in one forward."""

    def __init__(self, model: Transformer, rows: list[Row]):
        self.swaps: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, replacement)
        dtype = model.tok_embeddings.weight.dtype
        adapters = [r.adapter for r in rows]
        if not any(adapters):
            return
        B, args = len(rows), model.args
        kv = self._prompt_keys_values(model, rows, dtype)
        for i, block in enumerate(model.layers):
            parts = [a.layers[str(i)] if a is not None and str(i) in a.layers else None for a in adapters]
            if not any(p is not None for p in parts):
                continue
            attn = block.attention
            K = max(kv[b][i][0].shape[2] for b in range(B) if parts[b] is not None)
            k = torch.zeros(B, attn.n_kv_heads, K, attn.head_dim, dtype=dtype)
            v, mask = torch.zeros_like(k), torch.ones(B, 1, 1, K, dtype=torch.bool)
            gates = torch.zeros(B, args.n_heads, 1, 1, dtype=dtype)
            for b, part in enumerate(parts):
                if part is None:
                    continue  # zero keys and values, gate 0: exactly nothing added
                pk, pv = kv[b][i]
                k[b, :, :pk.shape[2]], v[b, :, :pv.shape[2]] = pk[0], pv[0]
                mask[b, :, :, pk.shape[2]:] = False
                gates[b, :, 0, 0] = part.prompt.gate_values(dtype)
            self.swaps.append((attn, "prompt", RowPrompts(k, v, mask, gates)))
            self._v2_swaps(block, [a.cfg if a is not None else None for a in adapters], parts, dtype)
        finals = [a.final_norm if a is not None and a.cfg.final_norm else None for a in adapters]
        if any(f is not None for f in finals):
            self.swaps.append((model, "norm", RowNorm(model.norm, self._per_row(finals, model.norm.weight, dtype))))

    @staticmethod
    def _prompt_keys_values(model, rows, dtype):
        """kv[b][layer] = row b's (1, n_kv, K, hd) prompt keys and values at that layer, its adapter
        attached (V2 projects prompts through its own bias and scale) and its condition set."""
        from core.multimodal import conditioned
        kv = [{} for _ in rows]
        for b, row in enumerate(rows):
            if row.adapter is None:
                continue
            row.adapter.attach(model)
            try:
                with conditioned(model, row.condition):
                    for i in row.adapter.layers:
                        attn = model.layers[int(i)].attention
                        kv[b][int(i)] = attn.prompt.keys_values(attn, dtype)
            finally:
                row.adapter.detach()
        return kv

    def _v2_swaps(self, block, cfgs, parts, dtype):
        for name in V2_LINEARS:
            parent, attr = getattr(block, name.split(".")[0]), name.split(".")[1]
            base, key = getattr(parent, attr), name.replace(".", "_")
            bias = [p.bias[key] if p is not None and c.bias_scale else None for c, p in zip(cfgs, parts)]
            scale = [p.scale[key] if p is not None and c.bias_scale else None for c, p in zip(cfgs, parts)]
            lora = [(p.lora_a[key], p.lora_b[key]) if p is not None and c.lora_rank else None for c, p in zip(cfgs, parts)]
            if not any(b is not None for b in bias) and not any(lora):
                continue
            out_f, in_f = base.out_features, base.in_features
            row_parts = {}
            if any(b is not None for b in bias):
                row_parts["bias"] = self._per_row(bias, torch.zeros(out_f), dtype)
                row_parts["scale"] = self._per_row(scale, torch.ones(out_f), dtype)
            if any(lora):
                r = max(pair[0].shape[0] for pair in lora if pair)
                a = torch.zeros(len(lora), r, in_f, dtype=dtype)
                bm = torch.zeros(len(lora), out_f, r, dtype=dtype)
                for i, pair in enumerate(lora):
                    if pair:
                        a[i, :pair[0].shape[0]], bm[i, :, :pair[1].shape[1]] = pair[0].to(dtype), pair[1].to(dtype)
                row_parts.update(lora_a=a, lora_b=bm)
            self.swaps.append((parent, attr, RowLinear(base, **row_parts)))
        norms = [(p.attention_norm, p.ffn_norm) if p is not None and c.norm_tuning else None for c, p in zip(cfgs, parts)]
        if any(norms):
            for j, norm in enumerate(("attention_norm", "ffn_norm")):
                base = getattr(block, norm)
                weights = [n[j] if n else None for n in norms]
                self.swaps.append((block, norm, RowNorm(base, self._per_row(weights, base.weight, dtype))))

    @staticmethod
    def _per_row(values, default, dtype) -> torch.Tensor:
        """(B, 1, n): each row's vector, `default` where it has none."""
        return torch.stack([(v if v is not None else default).detach().to(dtype) for v in values])[:, None, :]

    def install(self, model: Transformer):
        self._saved = [(parent, attr, getattr(parent, attr)) for parent, attr, _ in self.swaps]
        for parent, attr, new in self.swaps:
            setattr(parent, attr, new)

    def uninstall(self, model: Transformer):
        for parent, attr, old in reversed(self._saved):
            setattr(parent, attr, old)


class Runner:
    def __init__(self, model: Transformer):
        self.model = model
        p = model.tok_embeddings.weight
        self.caches = [SlotCache(layer.attention.n_kv_heads, layer.attention.head_dim, p.dtype, p.device)
                       for layer in model.layers]
        self.rows: list[Row] = []  # the live rows, in slot order
        self._adapters: RowAdapters | None = None  # built for self.rows; None: to build

    # -- rows joining and leaving --------------------------------------------------------------
    def start(self, length: int, rows: int = 1) -> list[KVCache]:
        """A prefill cache of its own, for `rows` prompts of up to `length` tokens."""
        p = self.model.tok_embeddings.weight
        return [KVCache(rows, layer.attention.n_kv_heads, length, layer.attention.head_dim, p.dtype, p.device)
                for layer in self.model.layers]

    @torch.no_grad()
    def prefill(self, row: Row, own: list[KVCache], tokens: list[int], start: int) -> torch.Tensor:
        """The next chunk of one joining row's (long) prompt, at positions [start, start + len(tokens)),
        on its own cache. Returns the logits (vocab,) after the chunk's last token."""
        x = torch.tensor([tokens], device=self.model.tok_embeddings.weight.device)
        return self._forward_on(own, [row], lambda: self.model(x, start, last_only=True))[0, -1]

    @torch.no_grad()
    def prefill_whole(self, rows: list[Row], prompts: list[list[int]]) -> torch.Tensor:
        """Several joining rows' whole prompts in one forward (left-padded, with a key mask); each
        then takes the next slot. Returns the logits (B, vocab) after each prompt."""
        device = self.model.tok_embeddings.weight.device
        longest = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        key_mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, longest - len(p):] = torch.tensor(p, device=device)
            key_mask[i, longest - len(p):] = True
        own = self.start(longest, len(prompts))
        padded = bool((~key_mask).any())
        logits = self._forward_on(own, rows, lambda: self.model(tokens, 0, key_mask if padded else None,
                                                                 last_only=True))[:, -1]
        for i, (row, p) in enumerate(zip(rows, prompts)):
            row.length = len(p)
            self.join(row, own, offset=longest - len(p), index=i)
        return logits

    def _forward_on(self, caches: list, rows: list[Row] | RowAdapters, forward):
        """Run `forward` with these caches in the model and these rows' adapters (or those built)."""
        model = self.model
        saved = [layer.attention.kv_cache for layer in model.layers]
        for layer, cache in zip(model.layers, caches):
            layer.attention.kv_cache = cache
        adapters = rows if isinstance(rows, RowAdapters) else RowAdapters(model, rows)
        adapters.install(model)
        try:
            return forward()
        finally:
            adapters.uninstall(model)
            for layer, cache in zip(model.layers, saved):
                layer.attention.kv_cache = cache

    def join(self, row: Row, own: list[KVCache], offset: int = 0, index: int = 0):
        """A prefilled row takes the next slot: its `row.length` tokens from row `index` of its
        prefill cache, starting at `offset` (left padding)."""
        slot = len(self.rows)
        for cache, kv in zip(self.caches, own):
            cache.reserve(slot + 1, row.length + 1)
            end = offset + row.length
            cache.put(slot, kv.k[index:index + 1, :, offset:end], kv.v[index:index + 1, :, offset:end])
        self.rows.append(row)
        self._adapters = None

    def leave(self, row: Row):
        """`row` ends; the last row moves into its slot."""
        slot, last = self.rows.index(row), len(self.rows) - 1
        if slot != last:
            for cache in self.caches:
                cache.move(last, slot, self.rows[last].length)
            self.rows[slot] = self.rows[last]
        self.rows.pop()
        self._adapters = None
        if not self.rows:
            for cache in self.caches:
                cache.free()

    # -- the batched step ----------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Each live row's next token in, at its own position; logits (B, vocab) out."""
        model, rows = self.model, self.rows
        device = model.tok_embeddings.weight.device
        positions = torch.tensor([r.length for r in rows], device=device)
        length = int(positions.max()) + 1
        for cache in self.caches:
            cache.reserve(len(rows), length)
        keys = torch.arange(length, device=device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, keys)
        if self._adapters is None:
            self._adapters = RowAdapters(model, rows)
        x = torch.tensor(tokens, device=device)[:, None]
        logits = self._forward_on(self.caches, self._adapters, lambda: (model.decode_step or model)(
            x, DecodeStep(positions, length), positions=positions[:, None], attn_mask=mask))[:, -1]
        for row in rows:
            row.length += 1
        return logits
