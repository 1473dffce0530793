"""The adapter: exactness at init, parameter count, gradients, caching, files and their errors."""
import pickle

import pytest
import torch

from core.adapter import Adapter, AdapterConfig, load_adapter, read_adapter_metadata, save_adapter
from core.errors import UserError
from core.model import ModelArgs, Transformer, count_parameters


def tiny_random_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=128, **kw)
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def x_tokens(batch=2, n=12, seed=1):
    return torch.randint(0, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def trained_copy(adapter: Adapter, seed=3):
    """Give every adapter tensor non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


@pytest.mark.parametrize("v2", [False, True])
def test_tiny_random_adapter_at_init_leaves_logits_exactly_equal(v2):
    model = tiny_random_model()
    x = x_tokens()
    with torch.no_grad():
        base = model(x)
    Adapter.create(model, AdapterConfig(prompt_len=5, layers=3, bias_scale=v2, norm_tuning=v2)).attach(model)
    with torch.no_grad():
        adapted = model(x)
    assert torch.equal(base, adapted)
    with torch.enable_grad():  # the training path too: same math, bit for bit
        assert torch.equal(base, model(x).detach())


def test_llama_7b_shape_trainable_parameter_count_on_meta_device():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008)
    with torch.device("meta"):
        model = Transformer(args)
        adapter = Adapter.create(model, AdapterConfig(prompt_len=10, layers=30))
    assert count_parameters(adapter) == 30 * 10 * 4096 + 30 * 32 == 1_229_760


def test_layers_clamped_to_model_depth():
    model = tiny_random_model()
    adapter = Adapter.create(model, AdapterConfig(prompt_len=4, layers=30))
    assert sorted(map(int, adapter.layers)) == [0, 1, 2, 3]


def test_tiny_random_trained_adapter_changes_output_and_detach_restores_base():
    model = tiny_random_model()
    x = x_tokens()
    with torch.no_grad():
        base = model(x)
    adapter = trained_copy(Adapter.create(model, AdapterConfig(4, 2, bias_scale=True, norm_tuning=True)))
    adapter.attach(model)
    with torch.no_grad():
        assert (model(x) - base).abs().max() > 1e-3
    adapter.detach()
    with torch.no_grad():
        assert torch.equal(model(x), base)
    assert all(layer.attention.prompt is None for layer in model.layers)


def test_tiny_random_only_adapter_gets_gradients_and_lower_layers_skip_autograd():
    model = tiny_random_model()
    adapter = Adapter.create(model, AdapterConfig(prompt_len=4, layers=2)).attach(model)
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out.requires_grad))
    logits = model(x_tokens())
    assert seen == {0: False, 1: False, 2: True, 3: True}
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in adapter.parameters()))
    # zero gates: the prompts get no gradient yet, the gates do (that is what opens them)
    for layer in adapter.layers.values():
        assert layer.prompt.gate.grad.abs().sum() > 0


def test_tiny_random_prompt_kv_cached_only_without_grad_and_never_stale():
    model = tiny_random_model()
    adapter = trained_copy(Adapter.create(model, AdapterConfig(4, 2))).attach(model)
    x = x_tokens()
    prompt = adapter.layers["3"].prompt
    with torch.no_grad():
        first = model(x)
        assert prompt._kv_cache is not None
        cached = model(x)
    assert torch.equal(first, cached)
    model(x)  # with grad: recomputed, the cache dropped
    assert prompt._kv_cache is None
    with torch.no_grad():
        model(x)
        prompt.prompt.mul_(2.0)  # an in-place update must invalidate the cached keys/values
        changed = model(x)
        prompt.prompt.div_(2.0)
    assert not torch.equal(changed, first)


def test_tiny_random_adapter_file_round_trip(tmp_path):
    model = tiny_random_model()
    adapter = trained_copy(Adapter.create(model, AdapterConfig(5, 3, bias_scale=True, norm_tuning=True))).attach(model)
    x = x_tokens()
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path, model, training={"steps": 7, "final_loss": 1.25})
    assert not list(tmp_path.glob("*.tmp"))
    adapter.detach()
    meta = read_adapter_metadata(path)
    assert meta["config"] == {"prompt_len": 5, "layers": 3, "bias_scale": True, "norm_tuning": True,
                              "encoder": None, "encoder_dim": 0, "bind_blocks": 2, "bind_hidden": 0,
                              "bind_style": "studio", "lora_rank": 0, "final_norm": False,
                              "prompt_bind_scales": False, "bind_question": False, "fusion_layers": 0,
                              "visual_blocks": 0, "visual_width": 768, "visual_heads": 16, "gate_scale": False}
    assert meta["base"]["dim"] == 64 and len(meta["base"]["fingerprint"]) == 6
    assert meta["training"]["steps"] == 7 and meta["format_version"] == 1
    load_adapter(path, model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_adapter_fingerprint_survives_dtype_change(tmp_path):
    model = tiny_random_model()
    adapter = Adapter.create(model, AdapterConfig(4, 2))
    save_adapter(adapter, tmp_path / "a.safetensors", model)
    load_adapter(tmp_path / "a.safetensors", model.to(torch.bfloat16))


@pytest.fixture
def saved(tmp_path):
    model = tiny_random_model()
    adapter = Adapter.create(model, AdapterConfig(4, 2))
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path, model)
    return model, path


def test_adapter_for_a_different_base_is_refused(saved, tmp_path):
    _, path = saved
    with pytest.raises(UserError, match="different base model: dim 64 vs this model's 32"):
        load_adapter(path, Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=128)))
    with pytest.raises(UserError, match="same shape, different weights"):
        load_adapter(path, tiny_random_model(seed=5))


def test_adapter_with_wrong_shapes_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    model, path = saved
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["layers.3.prompt.prompt"] = torch.zeros(4, 63)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(UserError, match=r"layers.3.prompt.prompt has shape \(4, 63\), expected \(4, 64\)"):
        load_adapter(tmp_path / "bad.safetensors", model)


def test_truncated_corrupt_pickled_and_foreign_files_are_refused(saved, tmp_path):
    model, path = saved
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="truncated"):
        load_adapter(tmp_path / "trunc.safetensors", model)
    (tmp_path / "cut.safetensors").write_bytes(data[:40])
    with pytest.raises(UserError, match="truncated"):
        load_adapter(tmp_path / "cut.safetensors", model)
    corrupt = bytearray(data)
    corrupt[10:30] = b"\x00" * 20  # inside the JSON header
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match="corrupt|not a safetensors"):
        load_adapter(tmp_path / "corrupt.safetensors", model)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="raw Python pickle, which is never loaded"):
        load_adapter(tmp_path / "evil.pkl", model)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="not an adapter made by this project"):
        load_adapter(tmp_path / "plain.safetensors", model)
    (tmp_path / "text.safetensors").write_text("hello world, not weights")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_adapter(tmp_path / "text.safetensors", model)
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors", model)


def test_tiny_random_official_v1_release_layout_loads(tmp_path):
    model = tiny_random_model()
    L, K, dim, heads = 3, 5, 64, 4
    g = torch.Generator().manual_seed(0)
    sd = {"adapter_query.weight": torch.randn(L * K, dim, generator=g)}
    for i in range(4 - L, 4):
        sd[f"layers.{i}.attention.gate"] = torch.randn(1, heads, 1, 1, generator=g)
    torch.save(sd, tmp_path / "llama_adapter_len10_layer30_release.pth")
    adapter = load_adapter(tmp_path / "llama_adapter_len10_layer30_release.pth", model)
    assert adapter.cfg.prompt_len == K and adapter.cfg.layers == L
    assert torch.equal(adapter.layers["1"].prompt.prompt, sd["adapter_query.weight"][:K])
    assert torch.equal(adapter.layers["3"].prompt.gate, sd["layers.3.attention.gate"].flatten())
    # a release made for another model is refused
    sd["adapter_query.weight"] = torch.randn(L * K, 4096)
    torch.save(sd, tmp_path / "big.pth")
    with pytest.raises(UserError, match=r"expected \(layers\*K, 64\)"):
        load_adapter(tmp_path / "big.pth", model)
    # a torch checkpoint holding arbitrary objects is refused by weights_only loading
    torch.save({"model": object.__new__(Evil)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights-only"):
        load_adapter(tmp_path / "evil.pth", model)


class Evil:
    pass


def test_tiny_random_cpu_decode_layout_fuses_and_falls_back_when_v2_wraps_linears():
    from core.model import cpu_decode_layout, still_fused
    model = tiny_random_model()
    x = x_tokens()
    with torch.no_grad():
        base = model(x)
        cpu_decode_layout(model)
        attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
        assert still_fused((attn.wq, attn.wk, attn.wv), attn.wqkv)
        assert still_fused((ffn.w1, ffn.w3), ffn.w13)
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-5)
    adapter = trained_copy(Adapter.create(model, AdapterConfig(prompt_len=3, layers=4, bias_scale=True)))
    adapter.attach(model)
    assert not still_fused((attn.wq, attn.wk, attn.wv), attn.wqkv)  # wrapped: separate matmuls
    with torch.no_grad():
        adapted = model(x)
    adapter.detach()
    assert still_fused((attn.wq, attn.wk, attn.wv), attn.wqkv)
    plain = tiny_random_model()  # the same adapter on an unfused copy gives the same logits
    adapter.attach(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, rtol=0, atol=1e-5)
    # unfreezing a fused weight for training turns fusion off, so its gradient is not lost
    attn.wq.weight.requires_grad_(True)
    assert not still_fused((attn.wq, attn.wk, attn.wv), attn.wqkv)


def test_tiny_random_adapter_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors file begins with its header's length: 128 + 256 k bytes begins with 0x80, as a pickle does."""
    model = tiny_random_model()
    adapter = Adapter.create(model, AdapterConfig(2, 1))
    path = tmp_path / "a.safetensors"
    for pad in range(256):  # the header grows with the metadata: find a length whose low byte is 0x80
        adapter.meta = {"note": "x" * pad}
        save_adapter(adapter, path, model)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_adapter(path, model).meta["note"] == adapter.meta["note"]
