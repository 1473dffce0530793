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

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "adapters"  # made for the embedded model, one per kind
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
    visual_blocks: int = 0        # V2's visual queries (core.multimodal.VisualQuery) in place of the bind
    visual_width: int = 768       # network: this many ViT blocks of this width and head count over K
    visual_heads: int = 16        # learnable queries and the encoder's tokens; 0: the bind network
    gate_scale: bool = False      # a second gate per layer, one number multiplying tanh(gate), 1 at init
                                  # (V2.1's new_gate in its LoRA releases)


class AdaptionPrompt(nn.Module):
    def __init__(self, prompt_len: int, dim: int, n_heads: int, bind_scales: bool = False, gate_scale: bool = False):
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
        self.gate_scale = nn.Parameter(torch.ones(1)) if gate_scale else None

    def gate_values(self, dtype: torch.dtype) -> torch.Tensor:
        """(n_heads,) what each head's prompt attention is multiplied by: tanh(gate) [x gate_scale]."""
        g = torch.tanh(self.gate) if self.gate_scale is None else torch.tanh(self.gate) * self.gate_scale
        return g.to(dtype)

    def prompt_kv(self, attn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, n_kv_heads, K, head_dim) keys and values, no RoPE. Cached only under no_grad
        (generation), keyed on the versions of every tensor they depend on, so an in-place update
        (training, load_state_dict) is never served stale; while training they are recomputed, and
        inside a compiled step too (the key reads data_ptr(), which dynamo cannot trace: it broke
        the step at every adapted layer; K rows through wk/wv are cheap inside the graph)."""
        x = self.prompt.to(dtype).unsqueeze(0)
        if torch.is_grad_enabled():
            self._kv_cache = None
            return self._project(attn, x)
        if torch.compiler.is_compiling():
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
        c = self.condition  # (B, K, dim) from visual queries: one addition per prompt
        if c.ndim == 2:  # (B, dim) from a bind network: the same addition to every prompt, or scaled per prompt
            c = c[:, None, :] * (self.bind_scale if self.bind_scale is not None else 1)
        return self._project(attn, (self.prompt.unsqueeze(0) + c).to(dtype))

    def forward(self, attn, q: torch.Tensor) -> torch.Tensor:
        B, H, T, _ = q.shape
        k, v = self.keys_values(attn, q.dtype)
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        # every query over the K prompts only: the prompt part's own softmax
        out = attend(q, k, v)
        return self.gate_values(q.dtype).view(1, H, 1, 1) * out


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
        self.prompt = AdaptionPrompt(cfg.prompt_len, dim, n_heads, cfg.prompt_bind_scales and bool(cfg.encoder),
                                     cfg.gate_scale)
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
        self.bind = self.visual = None
        if cfg.encoder and cfg.visual_blocks:
            from core.multimodal import VisualQuery
            self.visual = VisualQuery(cfg.encoder_dim, dim, cfg.prompt_len, cfg.visual_width, cfg.visual_blocks,
                                      cfg.visual_heads)
        elif cfg.encoder:
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

    def media_condition(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output -> the addition to the prompts: (B, D) embeddings through the bind network
        to (B, dim), or (B, T, C) tokens through the visual queries to (B, K, dim)."""
        network = self.visual if self.visual is not None else self.bind
        if network is None:
            raise UserError("this adapter was trained on text only; a media input needs one trained on media records")
        p = next(network.parameters())
        return network(features.to(p.device, p.dtype))

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


def check_base(meta: dict, model: Transformer, fingerprint: list[float] | None = None):
    """Refuse an adapter whose metadata names a different base model (shape or weights).
    `fingerprint`: the model's base_fingerprint where the caller keeps it (the registry does: its
    listings run on request threads, where torch work would start an OpenMP team beside the
    engine's; see core.serving.release_openmp_workers)."""
    base = meta.get("base")
    if not base:
        return
    a = model.args
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"):
        if base.get(key) != getattr(a, key):
            raise UserError(f"adapter was made for a different base model: {key} {base.get(key)} "
                            f"vs this model's {getattr(a, key)}")
    fp, ours = base.get("fingerprint"), fingerprint or base_fingerprint(model)
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
    """Load an adapter file for `model`: this project's safetensors format, or an official release
    (.pth: V1, V2 multimodal, ImageBind-LLM); by path, by Hub id (core.hub), or a released V2 file
    by name (V2_RELEASES, cached).
    Errors are one-line UserErrors."""
    from core import hub
    if str(path) in V2_RELEASES and not Path(path).is_file():
        path = release_file(str(path))
    elif hub.is_hub_id(str(path)):
        path = hub.adapter_file(str(path))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist; accepted: a file, a Hub id OWNER/NAME[@REVISION], "
                        f"or a released name ({', '.join(V2_RELEASES)})")
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
    if isinstance(sd, dict) and "visual_query.weight" in sd:
        return _load_official_v2(path, model, sd)
    if not isinstance(sd, dict) or "adapter_query.weight" not in sd:
        raise UserError(f"{path.name} is not an official LLaMA-Adapter file (no adapter_query.weight of V1, "
                        "no visual_query.weight of V2 multimodal, no prefix_query.weight of ImageBind-LLM)")
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
    place = _Placement(sd, adapter)
    for j, i in enumerate(range(first, a.n_layers)):
        place.tensors[f"layers.{i}.prompt.prompt"] = query[j].float()[None]
        place.used.add("prefix_query.weight")
        place.llama_layer(i)
    place.take("final_norm", "llama.norm.weight")
    for part in ("weight", "bias"):
        place.take(f"bind.proj.{part}", proj.replace("weight", part))
        for b in range(blocks):
            place.take(f"bind.blocks.{b}.norm.{part}", f"image_bind_norm_{b + 1}.{part}")
            for f, w in (("f1", "w1"), ("f2", "w2"), ("f3", "w3")):
                place.take(f"bind.blocks.{b}.feed_forward.{w}.{part}", f"image_bind_{f}_{b + 1}.{part}")
    place.finish(adapter, name, "the ImageBind-LLM adapter layout")
    return adapter


class _Placement:
    """A released file's tensors moved into our adapter's state dict (what the file lacks stays at
    its identity), keeping track of which were placed, so that any left over is named."""

    def __init__(self, sd: dict, adapter: Adapter):
        self.sd, self.used = sd, set()
        self.tensors = {k: v.detach().clone() for k, v in adapter.state_dict().items()}

    def take(self, ours: str, theirs: str):
        if theirs in self.sd and ours in self.tensors:
            value = self.sd[theirs].float()
            # the releases' gates are (1, heads, 1, 1): the same numbers in our shape; a wrong size
            # stays as it is and _load_tensors refuses it naming both shapes
            self.tensors[ours] = value.reshape(self.tensors[ours].shape) if value.numel() == self.tensors[ours].numel() else value
            self.used.add(theirs)

    def llama_layer(self, i: int):
        """Layer i's gates and the V2 tuning both releases name alike under `llama.`: biases, LoRA pairs, norms."""
        self.take(f"layers.{i}.prompt.gate", f"llama.layers.{i}.attention.gate")
        self.take(f"layers.{i}.prompt.gate_scale", f"llama.layers.{i}.attention.new_gate")
        for lin in V2_LINEARS:
            key, (module, short) = lin.replace(".", "_"), lin.split(".")
            self.take(f"layers.{i}.bias.{key}", f"llama.layers.{i}.{lin}.bias")
            self.take(f"layers.{i}.lora_a.{key}", f"llama.layers.{i}.{module}.lora_{short}_l1.weight")
            self.take(f"layers.{i}.lora_b.{key}", f"llama.layers.{i}.{module}.lora_{short}_l2.weight")
        for norm in ("attention_norm", "ffn_norm"):
            self.take(f"layers.{i}.{norm}", f"llama.layers.{i}.{norm}.weight")

    def finish(self, adapter: Adapter, name: str, layout: str):
        left = sorted(set(self.sd) - self.used)
        if left:
            raise UserError(f"{name}: {len(left)} tensors this loader does not place (e.g. {left[:3]}); accepted: {layout}")
        _load_tensors(adapter, self.tensors, name)


def _load_official_v2(path: Path, model: Transformer, sd: dict) -> Adapter:
    """A released LLaMA-Adapter V2 multimodal file (BIAS-7B, LORA-BIAS-7B, CAPTION-7B, LORA-BIAS-7B-v21):
    K visual queries (visual_query) and their path (clip_proj[_norm], visual_blocks.N in timm's
    names, visual_proj[_norm]) from CLIP ViT-L/14's tokens; K prompts for each of the top L layers
    (adapter_query, L*K rows); per-head gates, and new_gate where the file has LoRA; the V2 tuning of
    the LM: biases of wq, wo, w1, w2, w3, every norm, LoRA pairs. The release tunes norms and biases
    of layers below the prompted ones too: those layers get a prompt with its gate at 0, which adds
    exactly nothing, so their tensors have a place."""
    a, name = model.args, path.name
    queries, prompts = sd["visual_query.weight"], sd.get("adapter_query.weight")
    K = queries.shape[0]
    if prompts is None or prompts.ndim != 2 or prompts.shape[1] != a.dim or prompts.shape[0] % K:
        raise UserError(f"{name}: adapter_query.weight has shape {tuple(prompts.shape) if prompts is not None else None}, "
                        f"expected (layers x {K}, {a.dim}) for this model")
    n_prompted = prompts.shape[0] // K
    tuned = {int(k.split(".")[2]) for k in sd if k.startswith("llama.layers.")}
    first = min([a.n_layers - n_prompted, *tuned])
    if n_prompted > a.n_layers or first < 0 or max(tuned, default=0) >= a.n_layers:
        raise UserError(f"{name}: {n_prompted} prompted layers (adapter_query) and tuned layers up to "
                        f"{max(tuned, default=0)} do not fit this {a.n_layers}-layer model")
    if "visual_proj.weight" not in sd or sd["visual_proj.weight"].shape[0] != a.dim:
        shape = tuple(sd["visual_proj.weight"].shape) if "visual_proj.weight" in sd else None
        raise UserError(f"{name}: visual_proj.weight has shape {shape}, expected ({a.dim}, width) for this model")
    width = queries.shape[1]
    blocks = len({k.split(".")[1] for k in sd if k.startswith("visual_blocks.")})
    lora = f"llama.layers.{a.n_layers - 1}.attention.lora_wq_l1.weight"
    cfg = AdapterConfig(
        prompt_len=K, layers=a.n_layers - first, encoder="openclip:ViT-L-14:openai",
        encoder_dim=sd["clip_proj.weight"].shape[1] if "clip_proj.weight" in sd else 0,
        visual_blocks=blocks, visual_width=width, visual_heads=16,
        bias_scale=any(k.startswith("llama.layers.") and k.endswith(".bias") for k in sd),
        norm_tuning=any(k.endswith(("attention_norm.weight", "ffn_norm.weight")) for k in sd),
        lora_rank=sd[lora].shape[0] if lora in sd else 0, final_norm="llama.norm.weight" in sd,
        gate_scale=any(k.endswith("attention.new_gate") for k in sd))
    adapter = Adapter.create(model, cfg)  # norms start as the base's: a layer the file lacks keeps them
    adapter.meta = {"source": "official LLaMA-Adapter V2 multimodal release", "file": name,
                    "training": {"prompt_format": "alpaca"}}  # the release's format_prompt
    place = _Placement(sd, adapter)
    for i in range(first, a.n_layers):
        j = i - (a.n_layers - n_prompted)
        place.llama_layer(i)
        if j >= 0:
            place.tensors[f"layers.{i}.prompt.prompt"] = prompts[j * K:(j + 1) * K].float()
        else:  # below the prompted layers the release adds nothing, so its gates there never acted: shut
            for key in (f"layers.{i}.prompt.prompt", f"layers.{i}.prompt.gate"):
                place.tensors[key] = torch.zeros_like(place.tensors[key])
    place.used.add("adapter_query.weight")
    place.take("final_norm", "llama.norm.weight")
    place.take("visual.queries", "visual_query.weight")
    renames = {"clip_proj.": "visual.clip_proj.", "clip_proj_norm.": "visual.clip_proj_norm.",
               "visual_blocks.": "visual.blocks.", "visual_proj.": "visual.proj.", "visual_proj_norm.": "visual.proj_norm."}
    for theirs in sd:
        for old, new in renames.items():
            if theirs.startswith(old):
                place.take(new + theirs[len(old):], theirs)
    place.finish(adapter, name, "the LLaMA-Adapter V2 multimodal layout")
    return adapter


# The released V2 multimodal files by name; each URL's file name starts with its SHA-256.
V2_RELEASES = {name: f"https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/{tag}/{sha}_{name}.pth"
               for name, tag, sha in (
                   ("BIAS-7B", "v.2.0.0", "7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813"),
                   ("LORA-BIAS-7B", "v.2.0.0", "1bcbffc43484332672092e0024a8699a6eb5f558161aebf98a7c6b1db67224d1"),
                   ("CAPTION-7B", "v.2.0.0", "5088aeb63a89746b90bcfd5cb819e1c7411b2771b267c6d131ce73e250a8abf0"),
                   ("LORA-BIAS-7B-v21", "v.2.1.0", "d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c"))}


def release_file(name: str, download: bool = True) -> Path:
    """A released V2 file by name: the cached copy (its digest checked), else downloaded into the
    cache and checked against the SHA-256 its URL names."""
    from core.files import cache_dir, cached_file
    url = V2_RELEASES[name]
    file = url.rsplit("/", 1)[1]

    def missing(reason: str) -> UserError:
        return UserError(f"{name} is a released LLaMA-Adapter V2 file and {reason}: download {url} and pass "
                         f"--adapter PATH (or put it at {cache_dir() / file})")
    return cached_file(file, url if download else None, missing, sha256=file.split("_")[0])


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
