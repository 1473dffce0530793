"""LLaMA-Adapter V2's visual queries: encoder tokens -> K learnable queries through ViT blocks ->
one addition per adaption prompt. Exact at init; its blocks equal timm's; the released file
layout loads (at a tiny size) and is refused with one line when it does not fit; records train
it end to end through train.finetune."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from core.adapter import V2_RELEASES, Adapter, AdapterConfig, load_adapter, release_file
from core.errors import UserError
from core.multimodal import ViTBlock, VisualQuery, conditioned
from tests.test_adapter import tiny_random_model, trained_copy, x_tokens

K, WIDTH, HEADS, TOKEN_DIM = 3, 32, 4, 24


def visual_cfg(**kw) -> AdapterConfig:
    return AdapterConfig(prompt_len=K, layers=2, encoder="efficientnet-lite0", encoder_dim=TOKEN_DIM,
                         visual_blocks=2, visual_width=WIDTH, visual_heads=HEADS, **kw)


def test_tiny_random_visual_query_adapter_at_init_leaves_logits_exactly_equal_then_conditions_each_row():
    model = tiny_random_model()
    adapter = Adapter.create(model, visual_cfg(gate_scale=True)).attach(model)
    assert adapter.bind is None and isinstance(adapter.visual, VisualQuery)
    tokens = torch.randn(2, 7, TOKEN_DIM)
    x = x_tokens()
    with torch.no_grad():
        base = model(x)
        condition = adapter.media_condition(tokens)
        assert condition.shape == (2, K, model.args.dim)
        with conditioned(model, condition):
            assert torch.equal(model(x), base)  # gates at zero: exactly the base model
        trained_copy(adapter)
        with conditioned(model, adapter.media_condition(tokens)):
            both = model(x)
        with conditioned(model, adapter.media_condition(tokens[:1])):
            first = model(x[:1])
    assert (both - base).abs().amax() > 1e-2
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)  # each row reads its own image
    with pytest.raises(UserError, match=r"encoder tokens of shape \(batch, tokens, 24\), got \(2, 24\)"):
        adapter.media_condition(torch.randn(2, TOKEN_DIM))


def test_tiny_random_visual_block_equals_timms_vit_block():
    from timm.models.vision_transformer import Block
    torch.manual_seed(0)
    theirs = Block(WIDTH, HEADS, 4.0, qkv_bias=True).eval()
    ours = ViTBlock(WIDTH, HEADS)
    ours.load_state_dict(theirs.state_dict())  # the same names, so the release's weights load as they are
    x = torch.randn(2, 13, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def release_layout(model, n_prompted=3, lora=True) -> dict:
    """A V2 multimodal state dict in the release's names, at the tiny model's size: visual path,
    adapter_query for the top n_prompted layers, and gates, biases, norms, LoRA on every layer."""
    from timm.models.vision_transformer import Block
    a, g = model.args, torch.Generator().manual_seed(5)
    kv = a.n_kv_heads * a.head_dim

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {"visual_query.weight": r(K, WIDTH), "clip_proj.weight": r(WIDTH, TOKEN_DIM), "clip_proj.bias": r(WIDTH),
          "clip_proj_norm.weight": 1 + r(WIDTH), "clip_proj_norm.bias": r(WIDTH),
          "visual_proj.weight": r(a.dim, WIDTH), "visual_proj.bias": r(a.dim),
          "visual_proj_norm.weight": 1 + r(a.dim), "visual_proj_norm.bias": r(a.dim),
          "adapter_query.weight": r(n_prompted * K, a.dim), "llama.norm.weight": 1 + r(a.dim)}
    for b in range(2):
        torch.manual_seed(b)
        for k, v in Block(WIDTH, HEADS, 4.0, qkv_bias=True).state_dict().items():
            sd[f"visual_blocks.{b}.{k}"] = v + r(*v.shape)
    outs = {"attention.wq": a.dim, "attention.wk": kv, "attention.wv": kv, "attention.wo": a.dim,
            "feed_forward.w1": a.hidden_dim, "feed_forward.w2": a.dim, "feed_forward.w3": a.hidden_dim}
    ins = {"feed_forward.w2": a.hidden_dim, "attention.wo": a.dim}
    for i in range(a.n_layers):
        p = f"llama.layers.{i}."
        sd[p + "attention.gate"] = r(1, a.n_heads, 1, 1)
        sd[p + "attention_norm.weight"], sd[p + "ffn_norm.weight"] = 1 + r(a.dim), 1 + r(a.dim)
        for lin in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            sd[p + lin + ".bias"] = r(outs[lin])  # the release: no bias on wk, wv
        if lora:
            sd[p + "attention.new_gate"] = 1 + r(1, 1, 1, 1)
            for lin, out in outs.items():
                module, short = lin.split(".")
                sd[p + f"{module}.lora_{short}_l1.weight"] = r(4, ins.get(lin, a.dim))
                sd[p + f"{module}.lora_{short}_l2.weight"] = r(out, 4)
    return sd


def save_release(path, sd, config=None):
    torch.save({"model": sd, "config": config or {"w_bias": True, "w_lora": True, "lora_rank": 4}}, path)
    return path


def test_tiny_release_layout_loads_every_tensor_in_its_place(tmp_path):
    from timm.models.vision_transformer import Block
    model = tiny_random_model()
    sd = release_layout(model)
    adapter = load_adapter(save_release(tmp_path / "LORA-BIAS-tiny.pth", sd), model)
    cfg, n = adapter.cfg, model.args.n_layers
    assert (cfg.prompt_len, cfg.layers, cfg.visual_blocks, cfg.visual_width, cfg.lora_rank) == (K, n, 2, WIDTH, 4)
    assert cfg.visual_heads == 16
    assert cfg.bias_scale and cfg.norm_tuning and cfg.final_norm and cfg.gate_scale
    assert cfg.encoder == "openclip:ViT-L-14:openai" and cfg.encoder_dim == TOKEN_DIM
    assert adapter.meta["training"]["prompt_format"] == "alpaca"
    layers = adapter.layers
    # the top 3 layers take adapter_query's rows in order; layer 0 (tuned, not prompted) adds nothing
    for j, i in enumerate(range(1, n)):
        assert torch.equal(layers[str(i)].prompt.prompt, sd["adapter_query.weight"][j * K:(j + 1) * K])
        assert torch.equal(layers[str(i)].prompt.gate, sd[f"llama.layers.{i}.attention.gate"].flatten())
    assert not layers["0"].prompt.gate.any() and not layers["0"].prompt.prompt.any()
    assert torch.equal(layers["0"].bias["feed_forward_w2"], sd["llama.layers.0.feed_forward.w2.bias"])
    assert torch.equal(layers["0"].attention_norm, sd["llama.layers.0.attention_norm.weight"])
    assert not layers["2"].bias["attention_wk"].any()  # absent in the release: identity
    assert torch.equal(layers["2"].lora_b["attention_wv"], sd["llama.layers.2.attention.lora_wv_l2.weight"])
    gate = layers["3"].prompt
    torch.testing.assert_close(gate.gate_values(torch.float32),
                               torch.tanh(sd["llama.layers.3.attention.gate"].flatten()) * sd["llama.layers.3.attention.new_gate"].flatten())
    # the visual path against timm's blocks, written out as the release computes it
    tokens = torch.randn(2, 5, TOKEN_DIM)
    with torch.no_grad():
        x = torch.nn.functional.layer_norm(tokens @ sd["clip_proj.weight"].T + sd["clip_proj.bias"], (WIDTH,),
                                           sd["clip_proj_norm.weight"], sd["clip_proj_norm.bias"])
        x = torch.cat([sd["visual_query.weight"].expand(2, -1, -1), x], 1)
        for b in range(2):
            block = Block(WIDTH, 16, 4.0, qkv_bias=True).eval()  # the release's 16 heads, which its file cannot tell
            block.load_state_dict({k[len(f"visual_blocks.{b}."):]: v for k, v in sd.items()
                                   if k.startswith(f"visual_blocks.{b}.")})
            x = block(x)
        want = torch.nn.functional.layer_norm(x[:, :K] @ sd["visual_proj.weight"].T + sd["visual_proj.bias"],
                                              (model.args.dim,), sd["visual_proj_norm.weight"], sd["visual_proj_norm.bias"])
        # float32 rounding through two blocks of large random weights (outputs up to ~4): 1.5e-4 measured
        torch.testing.assert_close(adapter.media_condition(tokens), want, rtol=1e-4, atol=1e-3)
        with conditioned(model, want):
            assert torch.isfinite(model(x_tokens())).all()


def test_tiny_release_layout_that_does_not_fit_is_refused_in_one_line(tmp_path):
    model = tiny_random_model()
    cases = {
        "width": ({"adapter_query.weight": torch.randn(3 * K, model.args.dim + 8)},
                  r"adapter_query.weight has shape \(9, 72\), expected \(layers x 3, 64\)"),
        "proj": ({"visual_proj.weight": torch.randn(model.args.dim + 8, WIDTH)},
                 r"visual_proj.weight has shape \(72, 32\), expected \(64, width\)"),
        "unknown": ({"llama.layers.1.attention.mystery": torch.zeros(3)},
                    r"1 tensors this loader does not place \(e.g. \['llama.layers.1.attention.mystery'\]\)"),
        "depth": ({"adapter_query.weight": torch.randn(5 * K, model.args.dim)}, "5 prompted layers"),
    }
    for name, (change, message) in cases.items():
        sd = {**release_layout(model, lora=False), **change}
        with pytest.raises(UserError, match=message) as e:
            load_adapter(save_release(tmp_path / f"{name}.pth", sd), model)
        assert "\n" not in str(e.value)


def test_released_names_resolve_through_the_digest_checked_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    assert set(V2_RELEASES) == {"BIAS-7B", "LORA-BIAS-7B", "CAPTION-7B", "LORA-BIAS-7B-v21"}
    assert all(url.startswith("https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/")
               for url in V2_RELEASES.values())
    with pytest.raises(UserError, match=r"BIAS-7B is a released LLaMA-Adapter V2 file and none were found: "
                                        r"download https://github.com/.*_BIAS-7B.pth and pass --adapter PATH"):
        release_file("BIAS-7B", download=False)
    # a file at the cached name whose digest is not the one the URL names is refused
    cached = tmp_path / "cache" / V2_RELEASES["BIAS-7B"].rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the release")
    with pytest.raises(UserError, match="SHA-256 differs from the one published"):
        load_adapter("BIAS-7B", tiny_random_model())
    # the download path, from a file:// URL named like the release's (SHA-256 first)
    model = tiny_random_model()
    source = save_release(tmp_path / "tiny.pth", release_layout(model))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    served = source.rename(tmp_path / f"{digest}_TINY-V2.pth")
    monkeypatch.setitem(V2_RELEASES, "TINY-V2", served.as_uri())
    adapter = load_adapter("TINY-V2", model)
    assert adapter.cfg.visual_blocks == 2 and (tmp_path / "cache" / served.name).is_file()
    monkeypatch.setitem(V2_RELEASES, "TINY-V2", served.with_name("0" * 64 + "_TINY-V2.pth").as_uri())
    served.rename(served.with_name("0" * 64 + "_TINY-V2.pth"))
    with pytest.raises(UserError, match="the download's SHA-256 is .*, not the published 000000000000"):
        release_file("TINY-V2")
    assert not (tmp_path / "cache" / ("0" * 64 + "_TINY-V2.pth")).exists()  # nothing half-trusted is kept


def test_tiny_random_image_records_train_visual_queries_on_efficientnet_tokens(tmp_path):
    from core.loading import load_model
    from core.multimodal import embed_inputs
    from tests.helpers import hf_llama
    from train.finetune import parse_args, run
    images = {"red-triangle": "triangle", "yellow-circle": "circle", "yellow-rectangle": "rectangle"}
    examples = Path(__file__).resolve().parents[1] / "assets" / "examples" / "image"
    records = [{"image": str(examples / f"{name}.png"), "instruction": "What shape is it?", "output": shape}
               for name, shape in images.items()] * 4
    data = tmp_path / "shapes.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    hf_llama(tmp_path / "model")
    lm = load_model(str(tmp_path / "model"))
    flags = ["--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "run"),
             "--prompt-len", "4", "--layers", "2", "--batch-size", "6", "--lr", "0.05", "--epochs", "8",
             "--warmup-epochs", "0", "--precision", "fp32", "--visual-blocks", "1", "--visual-width", "32", "--visual-heads", "4"]
    with pytest.raises(UserError, match="--visual-blocks needs image records and goes without --bind-question"):
        run(parse_args(flags[:5] + [str(tmp_path / "refused")] + flags[6:] + ["--bind-question"]), lm)
    adapter = run(parse_args(flags + ["--fusion", "early"]), lm)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # that it learns the task is the embedded model's test below
    assert all(layer.prompt.gate.abs().amax() > 0 for layer in adapter.layers.values())
    loaded = load_adapter(tmp_path / "run" / "adapter.safetensors", lm.model)
    assert loaded.cfg.visual_blocks == 1 and loaded.cfg.encoder_dim == 1280 and loaded.cfg.fusion_layers == 1
    assert adapter.visual is not None
    condition = embed_inputs(loaded, [examples / f"{n}.png" for n in images], "image")
    assert condition.shape == (3, 4, lm.model.args.dim)
    mixed = embed_inputs(loaded, [examples / f"{n}.png" for n in list(images)[:2]], "image", weights=[3, 1])
    torch.testing.assert_close(mixed[0], 0.75 * condition[0] + 0.25 * condition[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["late", "early"])
def test_embedded_model_learns_easy_vqa_shapes_through_visual_queries_in_a_short_run(smollm2_bf16, fusion, tmp_path):
    """400 easy-VQA shape questions, 20 steps of 8 over EfficientNet-Lite0's 7 x 7 tokens (one visual
    block of width 128, K=10, the top 8 layers): held-out shape questions well above the 1/3 of
    chance (measured on the fp32 base: 93-100% late, 95-100% early, at 20-40 steps; the test takes
    the bf16 base train.finetune loads by default)."""
    import random

    from train.easyvqa import records
    from train.evaluate import accuracy
    from train.finetune import parse_args, run
    rng = random.Random(0)
    train, test = ([r for r in records(split) if r["instruction"].startswith("What shape")] for split in ("train", "test"))
    train, test = rng.sample(train, 400), rng.sample(test, 60)
    data = tmp_path / "shapes.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in train))
    flags = ["--data", str(data), "--out", str(tmp_path / "run"), "--layers", "8", "--batch-size", "8", "--lr", "5e-3",
             "--max-steps", "20", "--warmup-epochs", "0.05", "--visual-blocks", "1", "--visual-width", "128",
             "--visual-heads", "4", "--fusion", fusion]
    adapter = run(parse_args(flags), smollm2_bf16)
    try:
        assert adapter.cfg.fusion_layers == (4 if fusion == "early" else 0)
        score, pairs = accuracy(smollm2_bf16, test, "alpaca", max_new_tokens=4)
    finally:
        adapter.detach()
    most_common = max(sum(r["output"] == a for r in test) for a in ("circle", "rectangle", "triangle")) / len(test)
    assert score > max(0.6, most_common + 0.2), pairs[:10]
