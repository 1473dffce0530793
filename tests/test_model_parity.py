"""Our model against transformers' LlamaForCausalLM on tiny random checkpoints, through every
loader (Hugging Face folder, GGUF file, Meta shards)."""
import numpy as np
import pytest
import torch

from core.errors import UserError
from core.loading import load_model, read_checkpoint
from tests.helpers import (gpt2_tokenizer_meta, hf_llama, tiny_bpe_tokenizer,
                           train_sentencepiece, write_gguf, write_meta_folder)

CONFIGS = {
    "multi_head": {},
    "grouped_query": {"num_attention_heads": 8, "num_key_value_heads": 2},
    "tied_embeddings": {"tie_word_embeddings": True, "num_key_value_heads": 2},
    "llama3_rope_scaling": {"num_key_value_heads": 2, "rope_theta": 500000.0,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    "linear_rope_scaling": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


def tokens(vocab, n=48, batch=2, seed=1):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def reference_logits(hf, x):
    with torch.no_grad():
        return hf(x).logits.float()


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_random_hf_folder_logits_match_transformers(tmp_path, name):
    hf = hf_llama(tmp_path / "hf", **CONFIGS[name])
    lm = load_model(str(tmp_path / "hf"), "float32", "cpu")
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        ours = lm.model(x)
    torch.testing.assert_close(ours, reference_logits(hf, x), atol=1e-4, rtol=0)


def test_tiny_random_left_padded_batch_matches_unpadded(tmp_path):
    hf = hf_llama(tmp_path / "hf", num_key_value_heads=2)
    model = load_model(str(tmp_path / "hf"), "float32", "cpu").model
    x = tokens(hf.config.vocab_size, n=20, batch=1)
    pad = 7
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
    key_mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, key_mask=key_mask)[:, pad:], model(x), atol=1e-5, rtol=0)


def test_tiny_random_kv_cache_decode_matches_full_forward(tmp_path):
    hf = hf_llama(tmp_path / "hf", num_key_value_heads=2)
    model = load_model(str(tmp_path / "hf"), "float32", "cpu").model
    x = tokens(hf.config.vocab_size, n=16, batch=2)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 16)
        steps = [model(x[:, :10])]
        steps.append(model(x[:, 10:13], start_pos=10))  # a chunk continuing the cache
        steps += [model(x[:, i:i + 1], start_pos=i) for i in range(13, 16)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_random_gguf_f32_round_trip_matches_transformers(tmp_path, tie):
    hf = hf_llama(tmp_path / "hf", num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tie)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, gpt2_tokenizer_meta(tiny_bpe_tokenizer()), "F32", tie=tie)
    lm = load_model(str(path), "float32", "cpu")
    assert lm.model.args.tie_embeddings == tie
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), reference_logits(hf, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype,tol", [("F16", 2e-2), ("BF16", 5e-2), ("Q8_0", 5e-2), ("Q5_1", 0.3),
                                       ("Q5_0", 0.3), ("Q4_1", 0.6), ("Q4_0", 0.6)])
def test_tiny_random_gguf_quantized_weights_load_close_to_original(tmp_path, qtype, tol):
    hf = hf_llama(tmp_path / "hf", hidden_size=128, intermediate_size=256, num_key_value_heads=2)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, gpt2_tokenizer_meta(tiny_bpe_tokenizer()), qtype)
    _, state, _, _ = read_checkpoint(path)
    # the Q/K un-permutation must line up with transformers' layout even after quantization
    ref = hf.model.layers[1].self_attn.k_proj.weight
    ours = state["layers.1.attention.wk.weight"]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < tol * ref.abs().max()
    assert torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1] > 0.95


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quant_blocks_dequantize_to_the_right_shape(tmp_path, qtype):
    """gguf-py cannot quantize to K types, so write valid raw blocks and check the reader
    dequantizes them into the tensor's (rows, cols) orientation."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES
    block, nbytes = GGML_QUANT_SIZES[Q[qtype]]
    rows, cols = 4, 512
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, size=(rows, cols // block * nbytes), dtype=np.uint8)
    raw_blocks = raw.reshape(rows, cols // block, nbytes)
    # keep the fp16 super-block scales finite: d (and dmin) sit at the end for Q6_K, the start otherwise
    scale_at = [nbytes - 2] if qtype == "Q6_K" else [0, 2]
    for at in scale_at:
        raw_blocks[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    hf = hf_llama(tmp_path / "hf", hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=8)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, gpt2_tokenizer_meta(tiny_bpe_tokenizer()), "F32")
    r = gguf.GGUFReader(str(path))
    # rewrite as a file whose ffn_gate is the raw K-quant tensor of shape (4, 512)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        w.add_key_value(k, v, f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name == "blk.0.ffn_gate.weight":
            w.add_tensor(t.name, raw, raw_dtype=Q[qtype])
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _, state, _, _ = read_checkpoint(tmp_path / "k.gguf")
    got = state["layers.0.feed_forward.w1.weight"]
    assert got.shape == (rows, cols)
    expected = gguf.quants.dequantize(raw, Q[qtype])
    assert np.allclose(got.numpy(), expected) and np.isfinite(expected).all()


def test_tiny_random_meta_sharded_folder_matches_transformers(tmp_path):
    hf = hf_llama(tmp_path / "hf", intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    spm_model = train_sentencepiece(tmp_path / "spm")
    write_meta_folder(tmp_path / "meta", hf, spm_model, shards=2)
    lm = load_model(str(tmp_path / "meta"), "float32", "cpu")
    assert lm.tokenizer.kind == "spm" and lm.chat_format == "alpaca"
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), reference_logits(hf, x), atol=1e-4, rtol=0)


def test_bad_model_paths_get_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown model 'nope'"):
        load_model("nope")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(UserError, match="not a model folder"):
        load_model(str(tmp_path))
    hf_llama(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer found"):
        load_model(str(tmp_path / "hf"))
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("smollm2", dtype="int3")


def test_gguf_with_unsupported_tensor_type_is_refused(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as Q
    hf = hf_llama(tmp_path / "hf", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, gpt2_tokenizer_meta(tiny_bpe_tokenizer()), "F32")
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for k, f in r.fields.items():
        if not (k.startswith("GGUF.") or k == "general.architecture"):
            w.add_key_value(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    block, nbytes = gguf.constants.GGML_QUANT_SIZES[Q.IQ4_NL]
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            w.add_tensor(t.name, np.zeros((256, 256 // block * nbytes), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="type IQ4_NL, which is not supported"):
        load_model(str(tmp_path / "iq.gguf"), "float32", "cpu")
