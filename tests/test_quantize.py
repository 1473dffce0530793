"""Weight-only quantization (core/quantize.py): the kernels against a dequantized reference, GGUF
Q4_0/Q4_1/Q8_0 taken natively (tiny random GGUFs written as llama.cpp's converter writes them),
adapters over a quantized base, and the embedded model at int8 and int4."""
import gguf
import numpy as np
import pytest
import torch

from core.adapter import Adapter, AdapterConfig
from core.loading import load_model
from core.quantize import Int4Linear, Int8Linear, gguf_blocks
from tests.helpers import gpt2_tokenizer_meta, hf_llama, tiny_bpe_tokenizer, write_gguf

BF16_EPS = 2 ** -8  # bf16's relative rounding


@pytest.mark.parametrize("kind,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_tiny_random_quantized_linear_equals_its_dequantized_product(kind, group):
    torch.manual_seed(0)
    w, x = torch.randn(256, 512), torch.randn(5, 512, requires_grad=True)
    lin = Int8Linear.from_float(w) if kind == "int8" else Int4Linear.from_float(w, group)
    deq = lin.dequantize()
    y = lin(x)
    ref = x.detach() @ deq.t()
    assert ((y.detach().float() - ref).norm() / ref.norm()) < 2 * BF16_EPS  # bf16 activations and output
    assert ((deq - w).norm() / w.norm()) < (0.01 if kind == "int8" else 0.1)  # the quantization itself
    y.sum().backward()  # gradients reach the input through the dequantized product (in bf16)
    expected = torch.ones(5, 256) @ deq
    assert ((x.grad - expected).norm() / expected.norm()) < 2 * BF16_EPS


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qgguf")
    hf = hf_llama(root / "hf", num_hidden_layers=2)
    meta = gpt2_tokenizer_meta(tiny_bpe_tokenizer())
    paths = {}
    for qtype in ("Q4_0", "Q4_1", "Q8_0"):
        paths[qtype] = root / f"tiny-{qtype}.gguf"
        write_gguf(paths[qtype], hf, meta, qtype=qtype)
    return paths


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_tiny_random_gguf_q4_becomes_int4_keeping_its_codes(tiny_ggufs, qtype):
    """The file's 4-bit codes are kept exactly; only d and m round from fp16 to bf16."""
    path = tiny_ggufs[qtype]
    exact = load_model(str(path), "float32", "cpu", quantize="none")  # every tensor dequantized by gguf
    quant = load_model(str(path), device="cpu", quantize="int4")
    reader = gguf.GGUFReader(path)
    raw = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight").data
    blocks = gguf_blocks(raw, qtype)
    d = blocks["d"].to(torch.bfloat16).float()
    zero = (blocks["m"] + 8 * blocks["d"]).to(torch.bfloat16).float() if qtype == "Q4_1" else torch.zeros_like(d)
    expected = (blocks["codes"].float() - 8) * d.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    got = quant.model.layers[1].feed_forward.w2
    assert isinstance(got, Int4Linear)
    assert torch.allclose(got.dequantize(), expected, rtol=BF16_EPS, atol=1e-6)  # the kernel's own bf16 output
    file_values = exact.model.layers[1].feed_forward.w2.weight
    assert ((expected - file_values).norm() / file_values.norm()) < 0.01  # bf16 scales against fp16 ones
    # the whole model: logits close to the dequantized file's (bf16 activations throughout)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250]])
    a, b = exact.model(tokens)[0], quant.model(tokens)[0].float()
    assert ((a - b).norm() / a.norm()) < 0.05 and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_tiny_random_gguf_q8_0_becomes_int8_with_a_scale_per_row(tiny_ggufs):
    exact = load_model(str(tiny_ggufs["Q8_0"]), "float32", "cpu", quantize="none")
    quant = load_model(str(tiny_ggufs["Q8_0"]), device="cpu", quantize="int8")
    w = exact.model.layers[0].attention.wq.weight
    got = quant.model.layers[0].attention.wq
    assert isinstance(got, Int8Linear)
    assert ((got.dequantize() - w).norm() / w.norm()) < 0.01  # per-block scales requantized per row
    assert torch.equal(quant.model.tok_embeddings.weight.float(), exact.model.tok_embeddings.weight.to(torch.bfloat16).float())


def test_tiny_random_adapter_at_init_leaves_quantized_logits_exactly_equal(tiny_dir):
    for mode in ("int8", "int4"):
        lm = load_model(str(tiny_dir), device="cpu", quantize=mode)
        tokens = torch.tensor([[5, 17, 42, 99, 3]])
        base = lm.model(tokens)
        adapter = Adapter.create(lm.model, AdapterConfig(prompt_len=4, layers=2, bias_scale=True)).attach(lm.model)
        assert torch.equal(lm.model(tokens), base)  # zero gates, bias 0, scale 1: exactly the base
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.prompt.gate.fill_(0.5)
        assert not torch.equal(lm.model(tokens), base)  # the prompts' keys and values came through wk/wv
        adapter.detach()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_embedded_model_says_paris_quantized(mode):
    from core.chat_format import render
    from core.generation import Generator, SamplingParams
    lm = load_model("smollm2", device="cpu", quantize=mode)
    ids = lm.tokenizer.encode(render(lm.chat_format, [{"role": "user", "content": "What is the capital of France?"}],
                                     lm.system_prompt))
    assert "Paris" in Generator(lm.model, lm.tokenizer, lm.stop_ids).generate([ids], SamplingParams(max_new_tokens=16))[0]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_embedded_model_fused_projections_equal_the_separate_calls_exactly(mode):
    """q|k|v and gate|up run as one quantized call each, over codes the separate linears still view."""
    lm = load_model("smollm2", device="cpu", quantize=mode)
    model, tokens = lm.model, torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert attn.wqkv.holds((attn.wq, attn.wk, attn.wv)) and ffn.w13.holds((ffn.w1, ffn.w3))
    codes = "codes" if mode == "int8" else "packed"
    assert getattr(attn.wk, codes).untyped_storage().data_ptr() == getattr(attn.wqkv.kernel, codes).untyped_storage().data_ptr()
    with torch.no_grad():
        fused = model(tokens)
        saved = [(layer.attention.wqkv, layer.feed_forward.w13) for layer in model.layers]
        for layer in model.layers:
            layer.attention.wqkv = layer.feed_forward.w13 = None
        assert torch.equal(model(tokens), fused)
        for layer, (qkv, w13) in zip(model.layers, saved):
            layer.attention.wqkv, layer.feed_forward.w13 = qkv, w13
        adapter = Adapter.create(model, AdapterConfig(prompt_len=4, layers=2, bias_scale=True)).attach(model)
        top = model.layers[-1].attention
        assert not top.wqkv.holds((top.wq, top.wk, top.wv))  # wrapped by V2: separate calls again
        assert torch.equal(model(tokens), fused)
        adapter.detach()


def test_embedded_model_default_on_cpu_is_its_own_q4_1_codes_at_int4():
    lm = load_model("smollm2", device="cpu")
    assert lm.model.quantization == "int4" and isinstance(lm.model.layers[0].attention.wq, Int4Linear)
    assert isinstance(lm.model.output, Int8Linear) and lm.model.tok_embeddings.weight.dtype == torch.bfloat16
    exact = load_model("smollm2", "float32", "cpu")  # one flag away: the exact path
    assert exact.model.layers[0].attention.wq.weight.dtype == torch.float32
    assert not hasattr(exact.model, "quantization")
    np.testing.assert_allclose(exact.model.norm.weight.numpy(), lm.model.norm.weight.float().numpy(), rtol=BF16_EPS)


def test_tiny_random_training_over_an_int4_base_lowers_the_loss_and_leaves_the_base(tmp_path, tiny_dir):
    import json

    from tests.helpers import write_data
    from train.finetune import parse_args, run
    data = write_data(tmp_path / "say.jsonl", 64)
    lm = load_model(str(tiny_dir), device="cpu", quantize="int4")
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out = tmp_path / "run"
    args = parse_args(["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--layers", "2",
                       "--prompt-len", "4", "--batch-size", "4", "--lr", "0.05", "--warmup-epochs", "0",
                       "--epochs", "6", "--quantize", "int4"])
    adapter = run(args, lm)
    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(curve[-16:]) / 16 < sum(curve[:16]) / 16 - 0.1
    adapter.detach()
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in base.items())  # codes and scales untouched
    assert "frozen base int4" in (out / "train.log").read_text()
