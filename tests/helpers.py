"""Builders of small real checkpoints for tests: Hugging Face folders saved by transformers,
GGUF files written the way llama.cpp's converter writes them, Meta consolidated shards, and a
SentencePiece model trained here. All tiny and random: for math, shapes and formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.loading import hf_to_core_name, permute_rope

CORPUS_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum jazz "
                "tunes near bright rivers under pale moons and every clever robot counts numbers "
                "like 12 34 567 8901 before dinner").split()


def corpus_lines(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(CORPUS_WORDS, size=rng.integers(4, 14))) for _ in range(n)]


def tiny_bpe_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    return tok


def hf_llama(path: Path, vocab_size=None, seed=0, **overrides):
    """A random LlamaForCausalLM saved with save_pretrained, plus a tokenizer.json; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    cfg = dict(vocab_size=vocab_size or tok.get_vocab_size(), hidden_size=64, intermediate_size=160,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # make norms non-trivial so a mistake in them shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return model


def core_state_from_hf(model) -> dict:
    state = {}
    for name, t in model.state_dict().items():
        core = hf_to_core_name(name)
        if core is not None:
            state[core] = t.detach().clone().float()
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


GGUF_FROM_CORE = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
                  "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                  "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                  "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def write_gguf(path: Path, hf_model, tokenizer_meta: dict, qtype: str = "F32", tie=False):
    """A GGUF of `hf_model` as llama.cpp's converter lays it out: Q/K rows permuted to the
    interleaved RoPE layout, 2-D weights in `qtype`, norms in F32."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_context_length(c.max_position_embeddings)
    w.add_vocab_size(c.vocab_size)
    for key, value in tokenizer_meta.items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    for name, t in core_state_from_hf(hf_model).items():
        if tie and name == "output.weight":
            continue
        t = t.numpy()
        if name.endswith("attention.wq.weight"):
            t = permute_rope(torch.from_numpy(t), c.num_attention_heads).numpy()
        if name.endswith("attention.wk.weight"):
            t = permute_rope(torch.from_numpy(t), c.num_key_value_heads).numpy()
        parts = name.split(".")
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{GGUF_FROM_CORE['.'.join(parts[2:-1])]}.weight"
        else:
            gname = f"{GGUF_FROM_CORE[parts[0]]}.weight"
        if t.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, t.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(t.astype(np.float32), Q[qtype]), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gpt2_tokenizer_meta(tok) -> dict:
    """tokenizer.ggml.* fields for a byte-level BPE `tokenizers.Tokenizer`."""
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": [t for t, _ in vocab], "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t in specials else 1 for t, _ in vocab],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}


def train_sentencepiece(path_prefix: Path, vocab_size=320) -> Path:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, identity normalizer) trained here."""
    import sentencepiece as spm
    text = path_prefix.with_suffix(".txt")
    text.write_text("\n".join(corpus_lines(2000)) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path_prefix), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    return path_prefix.with_suffix(".model")


def spm_tokenizer_meta(model_file: Path) -> dict:
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [float(p.score) for p in proto.pieces],
            "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}


def write_meta_folder(path: Path, hf_model, spm_model: Path, shards=2):
    """Meta's original layout: params.json, consolidated.NN.pth (model-parallel shards,
    interleaved-RoPE Q/K), tokenizer.model."""
    import shutil
    c = hf_model.config
    path.mkdir(parents=True, exist_ok=True)
    state = core_state_from_hf(hf_model)
    for i in range(c.num_hidden_layers):
        for key, heads in (("wq", c.num_attention_heads), ("wk", c.num_key_value_heads)):
            k = f"layers.{i}.attention.{key}.weight"
            state[k] = permute_rope(state[k], heads)
    for r in range(shards):
        part = {}
        for name, t in state.items():
            dim = META_SPLIT.get(name.split(".")[-2])
            part[name] = t.chunk(shards, dim)[r].clone() if dim is not None else t.clone()
        part["rope.freqs"] = torch.zeros(8)  # present in Meta's files, unused
        torch.save(part, path / f"consolidated.{r:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
              "norm_eps": c.rms_norm_eps, "rope_theta": 10000.0}
    (path / "params.json").write_text(json.dumps(params))
    shutil.copy(spm_model, path / "tokenizer.model")


def persona_adapter(lm, path: Path, seed: int, scale: float = 1.5) -> Path:
    """An adapter with open gates and random prompts: it visibly changes greedy replies."""
    from core.adapter import Adapter, AdapterConfig, save_adapter
    torch.manual_seed(seed)
    adapter = Adapter.create(lm.model, AdapterConfig(prompt_len=4, layers=6))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.prompt.prompt.normal_(0, scale)
            layer.prompt.gate.fill_(0.8)
    save_adapter(adapter, path, lm.model, training={"dataset": "random", "steps": 0, "final_loss": 1.0})
    return path


def wait_for(predicate, timeout=120, every=0.2):
    import time
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def write_data(path: Path, n=64) -> Path:
    """n instruction records ("say fox" -> "fox", ...)."""
    words = "fox dog robot moon river jazz wizard dinner".split()
    path.write_text("".join(json.dumps({"instruction": f"say {words[i % 8]}", "output": words[i % 8]}) + "\n"
                            for i in range(n)))
    return path


def open_adapter(lm, seed, **cfg):
    """A random adapter with open gates (and V2 parts away from identity): it changes the logits."""
    from core.adapter import Adapter, AdapterConfig
    torch.manual_seed(seed)
    adapter = Adapter.create(lm.model, AdapterConfig(**cfg))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.7)
            elif "bias" in name or "lora_b" in name:
                p.normal_(0, 0.05)
            elif "scale" in name or "norm" in name:
                p.uniform_(0.8, 1.2)
    return adapter
