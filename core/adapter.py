"""LLaMA-Adapter as a transform of a built Transformer, and its file format.

Each of the top L layers gets K learnable adaption prompts. Their keys and values come from the
layer's frozen wk/wv without RoPE; every query attends to them with a softmax of its own, and the
result, scaled by tanh(gate) with one zero-initialized gate per head, is added to the attention
output. At initialization the model is therefore exactly the base model. V2 options: learnable
bias and scale on the linear layers (y = scale * (Wx + bias), 0 and 1 at init) and norm tuning.
The same math runs in training and generation.

An `Adapter` owns all its parameters; `attach` and `detach` only swap references in the model,
so switching adapters never reloads the base.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError, first_line
from core.files import atomic_path
from core.model import RMSNorm, Transformer, attend

FORMAT = "llama-adapter"
FORMAT_VERSION = 1
V2_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@dataclass
class AdapterConfig:
    prompt_len: int = 10          # K
    layers: int = 30              # L, the top L layers (clamped to the model's depth)
    bias_scale: bool = False      # V2: learnable bias and scale on the adapted layers' linears
    norm_tuning: bool = False     # V2: the adapted layers' RMSNorm weights train
    encoder: str | None = None    # multimodal (ImageBind-LLM): the encoder whose embeddings a bind
    encoder_dim: int = 0          # network maps into the prompts; its width
    bind_blocks: int = 2          # residual RMSNorm + SwiGLU blocks of the bind network (width dim: 1M
                                  # parameters each at SmolLM2's 576, so shipped adapters stay small)
    bind_hidden: int = 0          # the bind blocks' SwiGLU width (0: dim; ImageBind-LLM: 4 x dim)
    bind_style: str = "studio"    # or the official ImageBind-LLM release's, see core.multimodal.BindNetwork
    lora_rank: int = 0            # LoRA pairs (rank r) on the adapted layers' seven linears (ImageBind-LLM)
    final_norm: bool = False      # the model's last norm trains too (V2 tunes every norm)
    prompt_bind_scales: bool = False  # each prompt takes the bind output through its own per-channel
                                  # scale (see AdaptionPrompt); off: the same addition to every prompt, as ImageBind-LLM
    bind_question: bool = False   # the bind network reads the question too (core.multimodal.BindNetwork)
    fusion_layers: int = 0        # the media condition reaches only the lowest N adapted layers (early
                                  # fusion, as the V2 paper describes it); 0: every adapted layer (late,
                                  # as the released code does)


class AdaptionPrompt(nn.Module):
    def __init__(self, prompt_len: int, dim: int, n_heads: int, bind_scales: bool = False):
        super().__init__()
        # N(0, 1) like the hidden states wk/wv normally see: a zero prompt would give zero keys
        # and values, and with the gate at zero neither would ever get a gradient.
        self.prompt = nn.Parameter(torch.randn(prompt_len, dim))
        self.gate = nn.Parameter(torch.zeros(n_heads))
        self._kv_cache = None
        # (B, dim) from a bind network (core.multimodal), added to every prompt of this layer, as
        # ImageBind-LLM injects its modality features; None for text-only use
        self.condition: torch.Tensor | None = None
        # Why per-prompt scales: with one addition c for every prompt, c's keys add the same score to
        # all K prompts and cancel in their softmax, and c's values add Wv c whatever the query: the
        # input reaches the layer as a fixed offset. Scaled per prompt (ones at init: the same start),
        # prompt k carries its own channels of c and a question can pick which ("the cube's colour").
        self.bind_scale = nn.Parameter(torch.ones(prompt_len, dim)) if bind_scales else None

    def prompt_kv(self, attn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, n_kv_heads, K, head_dim) keys and values, no RoPE. Cached only under no_grad
        (generation), keyed on the versions of every tensor they depend on, so an in-place update
        (training, load_state_dict) is never served stale; while training they are recomputed."""
        x = self.prompt.to(dtype).unsqueeze(0)
        if torch.is_grad_enabled():
            self._kv_cache = None
            return self._project(attn, x)
        deps = [self.prompt, *attn.wk.parameters(), *attn.wv.parameters()]
        key = (dtype, *((p.data_ptr(), p._version) for p in deps))
        if self._kv_cache is None or self._kv_cache[0] != key:
            self._kv_cache = (key, self._project(attn, x))
        return self._kv_cache[1]

    @staticmethod
    def _project(attn, x):
        # through wk/wv with their V2 bias and scale but without LoRA, as ImageBind-LLM projects its prompts
        n, K = x.shape[:2]
        wk, wv = (w.without_lora if isinstance(w, AdaptedLinear) else w for w in (attn.wk, attn.wv))
        k = wk(x).view(n, K, -1, attn.head_dim).transpose(1, 2)
        v = wv(x).view(n, K, -1, attn.head_dim).transpose(1, 2)
        return k, v

    def keys_values(self, attn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prompt keys and values, (1, n_kv_heads, K, head_dim) shared by every
        sequence, or (B, ...) one set per sequence of the condition (recomputed each call: K tokens, cheap)."""
        if self.condition is None:
            return self.prompt_kv(attn, dtype)
        c = self.condition[:, None, :] * (self.bind_scale if self.bind_scale is not None else 1)
        return self._project(attn, (self.prompt.unsqueeze(0) + c).to(dtype))

    def forward(self, attn, q: torch.Tensor) -> torch.Tensor:
        B, H, T, _ = q.shape
        k, v = self.keys_values(attn, q.dtype)
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        # every query over the K prompts only: the prompt part's own softmax
        out = attend(q, k, v)
        return torch.tanh(self.gate).to(q.dtype).view(1, H, 1, 1) * out


class AdaptedLinear(nn.Module):
    """y = scale * (base(x) + bias) + lora_b(lora_a(x)), each part optional: bias 0, scale 1 and
    lora_b 0 at init give the base output exactly."""

    def __init__(self, base: nn.Module, bias=None, scale=None, lora_a=None, lora_b=None):
        super().__init__()
        self.base, self.bias, self.scale, self.lora_a, self.lora_b = base, bias, scale, lora_a, lora_b

    @property
    def weight(self):
        return self.base.weight

    def without_lora(self, x):
        y = self.base(x)
        return (y + self.bias.to(x.dtype)) * self.scale.to(x.dtype) if self.bias is not None else y

    def forward(self, x):
        y = self.without_lora(x)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y


class AdaptedLayer(nn.Module):
    def __init__(self, cfg: AdapterConfig, dim: int, n_heads: int, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.prompt = AdaptionPrompt(cfg.prompt_len, dim, n_heads, cfg.prompt_bind_scales and bool(cfg.encoder))
        if cfg.bias_scale:
            self.bias = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.zeros(o)) for n, (o, _) in shapes.items()})
            self.scale = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.ones(o)) for n, (o, _) in shapes.items()})
        if cfg.lora_rank:  # a: small random, b: zero, so the product starts at zero
            self.lora_a = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.randn(cfg.lora_rank, i) / i ** 0.5)
                                            for n, (_, i) in shapes.items()})
            self.lora_b = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.zeros(o, cfg.lora_rank))
                                            for n, (o, _) in shapes.items()})
        if cfg.norm_tuning:
            self.attention_norm = nn.Parameter(torch.ones(dim))
            self.ffn_norm = nn.Parameter(torch.ones(dim))


class Adapter(nn.Module):
    def __init__(self, cfg: AdapterConfig, model_args, meta: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_model_layers = model_args.n_layers
        self.first_layer = model_args.n_layers - min(cfg.layers, model_args.n_layers)
        hd, dim, hidden = model_args.head_dim, model_args.dim, model_args.hidden_dim
        shapes = {"attention.wq": (model_args.n_heads * hd, dim), "attention.wk": (model_args.n_kv_heads * hd, dim),
                  "attention.wv": (model_args.n_kv_heads * hd, dim), "attention.wo": (dim, model_args.n_heads * hd),
                  "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}
        self.layers = nn.ModuleDict({str(i): AdaptedLayer(cfg, dim, model_args.n_heads, shapes)
                                     for i in range(self.first_layer, model_args.n_layers)})
        if cfg.final_norm:
            self.final_norm = nn.Parameter(torch.ones(dim))
        if cfg.encoder:
            from core.multimodal import BindNetwork
            self.bind = BindNetwork(cfg.encoder_dim, dim, cfg.bind_blocks, cfg.bind_hidden or None, cfg.bind_style,
                                    question_dim=dim if cfg.bind_question else 0)
        self.meta = meta or {}  # what the file says: base model, training summary, ...
        _set_plain(self, "_attached_to", None)

    @classmethod
    def create(cls, model: Transformer, cfg: AdapterConfig) -> "Adapter":
        """A fresh adapter for `model` (on its device), norm-tuning weights copied from its norms."""
        p = model.tok_embeddings.weight
        adapter = cls(cfg, model.args).to(p.device)
        if cfg.norm_tuning:
            with torch.no_grad():
                for i, layer in adapter.layers.items():
                    block = model.layers[int(i)]
                    layer.attention_norm.copy_(block.attention_norm.weight)
                    layer.ffn_norm.copy_(block.ffn_norm.weight)
        return adapter

    # -- attach / detach: pointer swaps only ------------------------------------------------
    def attach(self, model: Transformer) -> "Adapter":
        if getattr(model, "adapter", None) is not None:
            model.adapter.detach()
        check_compatible(self, model)
        for i, layer in self.layers.items():
            block = model.layers[int(i)]
            block.attention.prompt = layer.prompt
            if self.cfg.bias_scale or self.cfg.lora_rank:
                for name in V2_LINEARS:
                    parent, attr = _parent(block, name)
                    key = name.replace(".", "_")
                    parts = {}
                    if self.cfg.bias_scale:
                        parts.update(bias=layer.bias[key], scale=layer.scale[key])
                    if self.cfg.lora_rank:
                        parts.update(lora_a=layer.lora_a[key], lora_b=layer.lora_b[key])
                    setattr(parent, attr, AdaptedLinear(getattr(parent, attr), **parts))
            if self.cfg.norm_tuning:
                for norm in ("attention_norm", "ffn_norm"):
                    setattr(block, norm, _tuned_norm(getattr(block, norm), getattr(layer, norm)))
        if self.cfg.final_norm:
            model.norm = _tuned_norm(model.norm, self.final_norm)
        _set_plain(model, "adapter", self)
        _set_plain(self, "_attached_to", model)
        return self

    def detach(self):
        model = self._attached_to
        if model is None:
            return
        for i in self.layers:
            block = model.layers[int(i)]
            block.attention.prompt = None
            if self.cfg.bias_scale or self.cfg.lora_rank:
                for name in V2_LINEARS:
                    parent, attr = _parent(block, name)
                    setattr(parent, attr, getattr(parent, attr).base)
            if self.cfg.norm_tuning:
                for norm in ("attention_norm", "ffn_norm"):
                    setattr(block, norm, getattr(block, norm).base)
        if self.cfg.final_norm:
            model.norm = model.norm.base
        _set_plain(model, "adapter", None)
        _set_plain(self, "_attached_to", None)


def _tuned_norm(base: RMSNorm, weight: nn.Parameter) -> RMSNorm:
    """An RMSNorm with the adapter's weight in place of `base`'s (kept as .base for detach)."""
    tuned = RMSNorm(weight.shape[0], base.eps)
    tuned.weight = weight
    tuned.base = base
    return tuned


def _set_plain(module: nn.Module, name: str, value):
    """A back-reference, not a submodule: registering model<->adapter both ways would make a cycle."""
    object.__setattr__(module, name, value)


def _parent(block: nn.Module, dotted: str):
    first, attr = dotted.split(".")
    return getattr(block, first), attr


# -- base-model identity ------------------------------------------------------------------------
def base_fingerprint(model: Transformer) -> list[float]:
    """A few statistics of the base weights that survive a change of dtype (relative change < 1%)
    but tell apart different checkpoints of one architecture (e.g. a base and its instruct)."""
    with torch.no_grad():
        emb = model.tok_embeddings.weight
        stats = [emb[: min(256, emb.shape[0])].float().abs().mean(), getattr(model.norm, "base", model.norm).weight.float().mean()]
        for block in (model.layers[0], model.layers[-1]):
            stats.append(block.attention_norm.weight.float().mean() if not hasattr(block.attention_norm, "base")
                         else block.attention_norm.base.weight.float().mean())
            wq = block.attention.wq
            wq = getattr(wq, "base", wq)  # under a V2 adapter's wrapper
            stats.append((wq.dequantize() if hasattr(wq, "dequantize") else wq.weight).float().abs().mean())
    return [round(float(s), 6) for s in stats]


def base_description(model: Transformer) -> dict:
    a = model.args
    return {"architecture": "llama", "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads, "hidden_dim": a.hidden_dim, "vocab_size": a.vocab_size,
            "fingerprint": base_fingerprint(model)}


def check_compatible(adapter: Adapter, model: Transformer):
    check_base(adapter.meta, model)
    if adapter.n_model_layers != model.args.n_layers:
        raise UserError(f"adapter expects {adapter.n_model_layers} layers, this model has {model.args.n_layers}")


def check_base(meta: dict, model: Transformer):
    """Refuse an adapter whose metadata names a different base model (shape or weights)."""
    base = meta.get("base")
    if not base:
        return
    a = model.args
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"):
        if base.get(key) != getattr(a, key):
            raise UserError(f"adapter was made for a different base model: {key} {base.get(key)} "
                            f"vs this model's {getattr(a, key)}")
    fp, ours = base.get("fingerprint"), base_fingerprint(model)
    if fp and any(abs(x - y) > 0.01 * max(abs(x), abs(y), 1e-3) for x, y in zip(fp, ours)):
        raise UserError("adapter was made for a different base model: same shape, different weights "
                        "(fingerprint differs)")


# -- files ----------------------------------------------------------------------------------------
def save_adapter(adapter: Adapter, path: str | os.PathLike, model: Transformer | None = None,
                 training: dict | None = None):
    """safetensors weights with the JSON metadata in the header, written atomically."""
    from safetensors.torch import save_file
    meta = dict(adapter.meta)
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, config=asdict(adapter.cfg))
    if model is not None:
        meta["base"] = base_description(model)
    if training is not None:
        meta["training"] = training
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"llama_adapter": json.dumps(meta)})
    adapter.meta = meta


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of an adapter file, without loading its tensors."""
    from safetensors import safe_open
    path = Path(path)
    _check_is_safetensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("llama_adapter")
    except Exception as e:
        raise UserError(f"{path.name} is truncated or corrupt ({first_line(e, 200)})") from None
    if raw is None:
        raise UserError(f"{path.name} is a safetensors file but not an adapter made by this project (no llama_adapter metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path.name}: unsupported adapter format {meta.get('format')!r} "
                        f"version {meta.get('format_version')}; this build reads {FORMAT} version {FORMAT_VERSION}")
    return meta


def load_adapter(path: str | os.PathLike, model: Transformer, attach: bool = True) -> Adapter:
    """Load an adapter file for `model`: this project's safetensors format, or the official V1
    release (.pth with adapter_query.weight and per-layer gates). Errors are one-line UserErrors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # a torch zip checkpoint: an official release (V1, ImageBind-LLM)
        adapter = _load_official(path, model)
    elif head[:1] == b"\x80" and head[8:9] != b"{":  # a safetensors header of 128 + 256 k bytes starts with 0x80 too
        raise UserError(f"{path.name} is a raw Python pickle, which is never loaded; accepted: "
                        "a .safetensors adapter, or the official V1 .pth (weights only)")
    else:
        adapter = _load_safetensors(path, model)
    p = model.tok_embeddings.weight
    adapter.to(p.device)
    return adapter.attach(model) if attach else adapter


def _check_is_safetensors(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if n < 2 or head[8:9] != b"{":
        raise UserError(f"{path.name} is not a safetensors file; accepted: a .safetensors adapter made by this "
                        "project, or the official V1 .pth")
    if 8 + n > size:
        raise UserError(f"{path.name} is truncated (its header says {n} bytes, the file has {size - 8})")


def _load_safetensors(path: Path, model: Transformer) -> Adapter:
    from safetensors.torch import load_file
    meta = read_adapter_metadata(path)
    cfg = AdapterConfig(**meta["config"])
    adapter = Adapter(cfg, model.args, meta)
    check_compatible(adapter, model)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path.name} is truncated or corrupt ({first_line(e, 200)})") from None
    _load_tensors(adapter, tensors, path.name)
    return adapter


def _load_tensors(adapter: Adapter, tensors: dict, name: str):
    expected = adapter.state_dict()
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise UserError(f"{name}: tensors do not match the adapter's configuration "
                        f"(missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{name}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise UserError(f"{name}: tensor {k} holds NaN or infinite values")
    adapter.load_state_dict(tensors)


def _load_official(path: Path, model: Transformer) -> Adapter:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path.name} could not be read as a weights-only torch checkpoint ({first_line(e, 200)})") from None
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    if isinstance(sd, dict) and "prefix_query.weight" in sd:
        return _load_official_imagebind_llm(path, model, sd)
    if not isinstance(sd, dict) or "adapter_query.weight" not in sd:
        raise UserError(f"{path.name} is not an official LLaMA-Adapter file (no adapter_query.weight of V1, "
                        "no prefix_query.weight of ImageBind-LLM)")
    return _load_official_v1(path, model, sd)


def _load_official_v1(path: Path, model: Transformer, sd: dict) -> Adapter:
    gates = sorted((int(k.split(".")[1]), v) for k, v in sd.items() if k.endswith("attention.gate"))
    query = sd["adapter_query.weight"]
    a = model.args
    n_adapted = len(gates)
    if n_adapted == 0 or query.shape[0] % n_adapted or query.shape[1] != a.dim:
        raise UserError(f"{path.name}: adapter_query.weight has shape {tuple(query.shape)}, expected "
                        f"(layers*K, {a.dim}) with {n_adapted} gated layers")
    if gates[0][0] != a.n_layers - n_adapted or gates[-1][0] != a.n_layers - 1:
        raise UserError(f"{path.name}: gates for layers {gates[0][0]}..{gates[-1][0]} do not fit the top of "
                        f"this {a.n_layers}-layer model")
    cfg = AdapterConfig(prompt_len=query.shape[0] // n_adapted, layers=n_adapted)
    adapter = Adapter(cfg, a, {"source": "official LLaMA-Adapter V1 release", "file": path.name})
    prompts = query.float().view(n_adapted, cfg.prompt_len, a.dim)
    tensors = {}
    for j, (i, gate) in enumerate(gates):
        if gate.numel() != a.n_heads:
            raise UserError(f"{path.name}: layer {i} gate has {gate.numel()} heads, this model has {a.n_heads}")
        tensors[f"layers.{i}.prompt.prompt"] = prompts[j]
        tensors[f"layers.{i}.prompt.gate"] = gate.float().flatten()  # trained under tanh: used as is
    _load_tensors(adapter, tensors, path.name)
    return adapter


def _load_official_imagebind_llm(path: Path, model: Transformer, sd: dict) -> Adapter:
    """The released ImageBind-LLM adapter: one prompt token per layer for the top layers
    (prefix_query), per-head tanh gates, the bind network (image_bind_proj, image_bind_norm_i,
    SwiGLU image_bind_f{1,2,3}_i), and its V2 parts on the LM: biases, norms, LoRA pairs."""
    a, name = model.args, path.name
    query = sd["prefix_query.weight"]
    n = query.shape[0]
    if query.ndim != 2 or query.shape[1] != a.dim or not 1 <= n <= a.n_layers:
        raise UserError(f"{name}: prefix_query.weight has shape {tuple(query.shape)}, expected (layers <= "
                        f"{a.n_layers}, {a.dim}) for this model")
    first = a.n_layers - n
    proj = "image_bind_proj.weight" if "image_bind_proj.weight" in sd else "image_bind_proj.0.weight"
    if proj not in sd or "image_bind_f1_1.weight" not in sd:
        raise UserError(f"{name}: no image_bind_proj / image_bind_f1_1 weights: not an ImageBind-LLM adapter")
    blocks = sum(1 for k in sd if k.startswith("image_bind_norm_") and k.endswith(".weight"))
    layer_key = f"llama.layers.{first}."
    cfg = AdapterConfig(
        prompt_len=1, layers=n, encoder="imagebind", encoder_dim=sd[proj].shape[1], bind_blocks=blocks,
        bind_hidden=sd["image_bind_f1_1.weight"].shape[0],
        bind_style="imagebind-llm-legacy" if "image_bind_norm_1.bias" in sd else "imagebind-llm",
        bias_scale=any(f"{layer_key}{lin}.bias" in sd for lin in V2_LINEARS),
        norm_tuning=f"{layer_key}attention_norm.weight" in sd,
        lora_rank=sd[f"{layer_key}attention.lora_wq_l1.weight"].shape[0] if f"{layer_key}attention.lora_wq_l1.weight" in sd else 0,
        final_norm="llama.norm.weight" in sd)
    adapter = Adapter(cfg, a, {"source": "official ImageBind-LLM release", "file": name})
    tensors = {k: v.detach().clone() for k, v in adapter.state_dict().items()}  # V2 parts absent: identity
    used = set()

    def take(ours: str, theirs: str):
        if theirs in sd and ours in tensors:
            value = sd[theirs].float()
            # the release's gates are (1, heads, 1, 1): the same numbers in our shape; a wrong size
            # stays as it is and _load_tensors refuses it naming both shapes
            tensors[ours] = value.reshape(tensors[ours].shape) if value.numel() == tensors[ours].numel() else value
            used.add(theirs)

    for j, i in enumerate(range(first, a.n_layers)):
        tensors[f"layers.{i}.prompt.prompt"] = query[j].float()[None]
        used.add("prefix_query.weight")
        take(f"layers.{i}.prompt.gate", f"llama.layers.{i}.attention.gate")
        for lin in V2_LINEARS:
            key, (module, short) = lin.replace(".", "_"), lin.split(".")
            take(f"layers.{i}.bias.{key}", f"llama.layers.{i}.{lin}.bias")
            take(f"layers.{i}.lora_a.{key}", f"llama.layers.{i}.{module}.lora_{short}_l1.weight")
            take(f"layers.{i}.lora_b.{key}", f"llama.layers.{i}.{module}.lora_{short}_l2.weight")
        for norm in ("attention_norm", "ffn_norm"):
            take(f"layers.{i}.{norm}", f"llama.layers.{i}.{norm}.weight")
    take("final_norm", "llama.norm.weight")
    for part in ("weight", "bias"):
        take(f"bind.proj.{part}", proj.replace("weight", part))
        for b in range(blocks):
            take(f"bind.blocks.{b}.norm.{part}", f"image_bind_norm_{b + 1}.{part}")
            for f, w in (("f1", "w1"), ("f2", "w2"), ("f3", "w3")):
                take(f"bind.blocks.{b}.feed_forward.{w}.{part}", f"image_bind_{f}_{b + 1}.{part}")
    left = sorted(set(sd) - used)
    if left:
        raise UserError(f"{name}: {len(left)} tensors this loader does not place (e.g. {left[:3]}); "
                        "accepted: the ImageBind-LLM adapter layout")
    _load_tensors(adapter, tensors, name)
    return adapter


def cast_adapter_file(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "bfloat16"):
    """Rewrite an adapter file with its tensors in `dtype` (bf16 halves the size of the files that
    ship in assets/); loading casts them back to the model's dtype."""
    from safetensors.torch import load_file, save_file
    meta = read_adapter_metadata(src)
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in load_file(str(src)).items()}
    with atomic_path(dst) as tmp:
        save_file(tensors, tmp, metadata={"llama_adapter": json.dumps(meta)})


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m core.adapter", description="rewrite an adapter file in another dtype")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    a = ap.parse_args()
    cast_adapter_file(a.src, a.dst, a.dtype)
