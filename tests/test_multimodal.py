"""The bind network and its injection into the adaption prompts (ImageBind-LLM), on tiny random
models: zero-gated so an untrained bind network changes nothing, then trainable end to end, from
point-cloud records through train.finetune to an adapter file that answers about a cloud."""
import json

import pytest
import torch
from safetensors.torch import save_file

from core.adapter import Adapter, AdapterConfig
from core.encoders import ENCODERS
from core.encoders.points import PointNet, PointNetEncoder
from core.errors import UserError
from core.multimodal import BindNetwork, combine, conditioned
from tests.test_adapter import tiny_random_model, trained_copy, x_tokens


def adapted_tiny_model():
    model = tiny_random_model()
    adapter = trained_copy(Adapter.create(model, AdapterConfig(prompt_len=3, layers=2)))  # gates open
    adapter.attach(model)
    return model, adapter


def test_tiny_random_untrained_bind_network_leaves_the_output_unchanged():
    model, _ = adapted_tiny_model()
    bind = BindNetwork(in_dim=32, dim=model.args.dim)
    tokens = x_tokens(batch=2)
    with torch.no_grad():
        plain = model(tokens)
        with conditioned(model, bind(torch.randn(2, 32))):
            with_input = model(tokens)
    torch.testing.assert_close(with_input, plain, rtol=0, atol=1e-6)


def test_tiny_random_open_bind_gate_changes_each_sequence_and_trains_only_the_bind_path():
    model, adapter = adapted_tiny_model()
    bind = BindNetwork(in_dim=32, dim=model.args.dim)
    with torch.no_grad():
        bind.gate.fill_(0.5)
    tokens = x_tokens(batch=2)
    feats = torch.randn(2, 32)
    with torch.no_grad():
        plain = model(tokens)
        with conditioned(model, bind(feats)):
            mixed = model(tokens)
        with conditioned(model, bind(feats[[1, 0]])):
            swapped = model(tokens)
    assert not torch.allclose(mixed, plain, atol=1e-4)
    assert not torch.allclose(mixed[0], swapped[0], atol=1e-4)  # each sequence sees its own input
    # stage one of ImageBind-LLM: bind network (+ prompts and gates) train, the base does not
    adapter.requires_grad_(False)
    with conditioned(model, bind(feats)):
        model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bind.parameters())
    assert all(p.grad is None for p in model.parameters())
    # outside the context the prompts are text-only again
    assert all(model.layers[int(i)].attention.prompt.condition is None for i in adapter.layers)


def test_tiny_random_prompt_bind_scales_let_each_query_read_its_own_part_of_the_input(tmp_path):
    from core.adapter import load_adapter, save_adapter
    model = tiny_random_model()
    cfg = AdapterConfig(prompt_len=4, layers=2, encoder="pointnet", encoder_dim=32, prompt_bind_scales=True)
    adapter = trained_copy(Adapter.create(model, cfg)).attach(model)
    top = model.layers[-1].attention
    prompt, dim = top.prompt, model.args.dim
    q = torch.randn(1, model.args.n_heads, 5, dim // model.args.n_heads)  # five queries
    c = torch.randn(1, dim)

    def input_effect():  # what the input changes in the prompt attention's output, per query
        with torch.no_grad():
            prompt.condition = c
            with_input = prompt(top, q)
            prompt.condition = torch.zeros_like(c)
            return with_input - prompt(top, q)
    # one addition for every prompt (the scales' start, and ImageBind-LLM's design): its keys add
    # the same score to every prompt, which the softmax cancels; every query gets the same offset
    with torch.no_grad():
        prompt.bind_scale.fill_(1.0)
    shared = input_effect()
    torch.testing.assert_close(shared, shared[:, :, :1].expand_as(shared), rtol=0, atol=1e-5)
    with torch.no_grad():
        prompt.bind_scale.uniform_(0, 2)
    scaled = input_effect()
    assert (scaled - scaled[:, :, :1]).abs().amax() > 1e-2  # now each query reads differently
    prompt.condition = None
    # the scales travel in the adapter file
    save_adapter(adapter, tmp_path / "a.safetensors", model)
    loaded = load_adapter(tmp_path / "a.safetensors", tiny_random_model(), attach=False)
    assert loaded.cfg.prompt_bind_scales
    torch.testing.assert_close(loaded.layers[str(model.args.n_layers - 1)].prompt.bind_scale, prompt.bind_scale)


def test_combine_is_a_normalized_weighted_average_and_refuses_bad_weights():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    torch.testing.assert_close(combine([a, b]), torch.tensor([[2 ** -0.5, 2 ** -0.5]]))
    torch.testing.assert_close(combine([a, b], [1.0, 0.0]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(UserError, match="non-negative"):
        combine([a, b], [1.0])
    with pytest.raises(UserError, match="shape"):
        BindNetwork(in_dim=8, dim=16)(torch.randn(2, 9))
    with pytest.raises(UserError, match="needs an adapter"):
        with conditioned(tiny_random_model(), torch.zeros(1, 64)):
            pass


# -- training and generation with point-cloud records, on a tiny random model and encoder ----------


class CountingEncoder(PointNetEncoder):
    """The real PointNet encoder with random weights, counting the inputs it embeds."""
    embedded = 0

    def embed(self, inputs):
        CountingEncoder.embedded += len(inputs)
        return super().embed(inputs)


def tiny_points_setup(tmp_path, encoder_name: str, n_train: int, n_test: int):
    """A 2-layer random HF llama, a width-32 random PointNet registered as `encoder_name`, and a
    generated point-cloud dataset in tmp_path/points; returns the loaded model."""
    from core.loading import load_model
    from tests.helpers import hf_llama
    from train.pointclouds import write_dataset
    torch.manual_seed(0)
    weights = tmp_path / "pointnet.safetensors"
    save_file(PointNet(width=32).state_dict(), weights)
    ENCODERS[encoder_name] = lambda: CountingEncoder(weights)
    CountingEncoder.embedded = 0
    write_dataset(tmp_path / "points", n_train=n_train, n_test=n_test)
    hf_llama(tmp_path / "hf", num_hidden_layers=2)
    return load_model(str(tmp_path / "hf"), "float32", "cpu")


def test_tiny_random_points_records_train_the_bind_network_with_features_computed_once(tmp_path):
    from core.adapter import load_adapter
    from train.evaluate import accuracy
    from train.finetune import parse_args, run
    lm = tiny_points_setup(tmp_path, "tiny-random-points", n_train=12, n_test=4)
    out = tmp_path / "run"
    adapter = run(parse_args(["--model", str(tmp_path / "hf"), "--data", str(tmp_path / "points" / "train.jsonl"),
                              "--val-data", str(tmp_path / "points" / "test.jsonl"), "--out", str(out),
                              "--encoder", "tiny-random-points", "--layers", "2", "--prompt-len", "4",
                              "--batch-size", "8", "--lr", "0.05", "--epochs", "8", "--warmup-epochs", "0",
                              "--precision", "fp32"]), lm)
    assert CountingEncoder.embedded == 16  # 12 + 4 scenes, each embedded once for all epochs
    assert adapter.cfg.encoder == "tiny-random-points" and adapter.cfg.encoder_dim == 32
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert torch.tanh(adapter.bind.gate).abs().max() > 0  # training opened the bind gate
    # the file carries the bind network; loaded, it answers about a cloud
    adapter.detach()
    loaded = load_adapter(out / "adapter.safetensors", lm.model)
    torch.testing.assert_close(loaded.bind.proj.weight, adapter.bind.proj.weight)
    records = [json.loads(line) for line in (tmp_path / "points" / "test.jsonl").read_text().splitlines()]
    for r in records:
        r["points"] = str(tmp_path / "points" / r["points"])
    acc, pairs = accuracy(lm, records, "alpaca", max_new_tokens=4)
    assert len(pairs) == len(records) and 0 <= acc <= 1


def test_tiny_random_stage_two_starts_from_stage_one_and_adds_v2_tuning(tmp_path):
    """ImageBind-LLM's second stage: --init loads the first stage's prompts, gates and bind
    network; the V2 bias/scale and norms it adds start at identity, so the model's first loss
    is the first stage's last state, and then they train."""
    from train.finetune import parse_args, run
    lm = tiny_points_setup(tmp_path, "tiny-random-points-2", n_train=8, n_test=2)
    common = ["--model", str(tmp_path / "hf"), "--data", str(tmp_path / "points" / "train.jsonl"),
              "--encoder", "tiny-random-points-2", "--batch-size", "8", "--lr", "0.05", "--warmup-epochs", "0",
              "--precision", "fp32"]
    one = run(parse_args([*common, "--out", str(tmp_path / "one"), "--layers", "2", "--prompt-len", "4", "--epochs", "4"]), lm)
    one.detach()
    two = run(parse_args([*common, "--out", str(tmp_path / "two"), "--init", str(tmp_path / "one" / "adapter.safetensors"),
                          "--bias-scale", "--norm-tuning", "--epochs", "2"]), lm)
    assert two.cfg.bias_scale and two.cfg.norm_tuning and two.cfg.prompt_len == 4 and two.cfg.encoder == "tiny-random-points-2"
    # one batch holds all 8 records, so stage two's first loss is stage one's model on the same
    # batch: identical up to stage one's last (tiny) step, had the new V2 tensors changed anything
    first_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    losses_one = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert abs(first_two - losses_one[-1]) < 0.01 and abs(first_two - losses_one[0]) > 0.1
    biases = [p for n, p in two.named_parameters() if ".bias." in n and not n.startswith("bind")]
    assert biases and any(b.abs().max() > 0 for b in biases)  # the V2 biases trained
    two.detach()


def test_tiny_random_question_aware_bind_network_reads_each_question_with_the_input(tmp_path, capsys):
    """--bind-question: the bind network's input is the encoder's embedding and the question's
    (the mean of the LM's token embeddings), so two questions about one cloud get two conditions;
    it trains through train.finetune, travels in the file and answers in evaluate and the CLI."""
    from core import generate
    from core.adapter import load_adapter
    from core.multimodal import embed_inputs, question_embedding
    from train.evaluate import accuracy
    from train.finetune import parse_args, run
    lm = tiny_points_setup(tmp_path, "tiny-random-points-q", n_train=8, n_test=2)
    questions = ["What color is the cube?", "What shape is red?"]
    ids = lm.tokenizer.encode(questions[0], bos=False)
    torch.testing.assert_close(question_embedding(lm.model, lm.tokenizer, questions)[0],
                               lm.model.tok_embeddings.weight[ids].float().mean(0))
    out = tmp_path / "run"
    common = ["--model", str(tmp_path / "hf"), "--data", str(tmp_path / "points" / "train.jsonl"),
              "--encoder", "tiny-random-points-q", "--layers", "2", "--prompt-len", "4", "--batch-size", "8",
              "--lr", "0.05", "--epochs", "2", "--warmup-epochs", "0", "--precision", "fp32", "--bind-question"]
    adapter = run(parse_args([*common, "--out", str(out)]), lm)
    assert adapter.cfg.bind_question and adapter.bind.question_proj.in_features == lm.model.args.dim
    adapter.detach()
    loaded = load_adapter(out / "adapter.safetensors", lm.model)
    assert loaded.cfg.bind_question
    torch.testing.assert_close(loaded.bind.question_proj.weight, adapter.bind.question_proj.weight)
    cloud = str(tmp_path / "points" / json.loads((tmp_path / "points" / "test.jsonl").read_text().splitlines()[0])["points"])
    with torch.no_grad():
        loaded.bind.gate.fill_(1.0)
        a, b = (embed_inputs(loaded, [cloud], "points", questions=question_embedding(lm.model, lm.tokenizer, [q]))
                for q in questions)
        again = embed_inputs(loaded, [cloud], "points", questions=question_embedding(lm.model, lm.tokenizer, questions[:1]))
    assert not torch.allclose(a, b, atol=1e-4) and torch.equal(a, again)
    with pytest.raises(UserError, match="reads the question"):
        embed_inputs(loaded, [cloud], "points")
    records = [json.loads(line) for line in (tmp_path / "points" / "test.jsonl").read_text().splitlines()]
    for r in records:
        r["points"] = str(tmp_path / "points" / r["points"])
    acc, pairs = accuracy(lm, records, "alpaca", max_new_tokens=4)
    assert len(pairs) == len(records)
    loaded.detach()
    assert generate.main(["--model", str(tmp_path / "hf"), "--adapter", str(out / "adapter.safetensors"),
                          "--points", cloud, "--prompt", questions[0], "--max-new-tokens", "3"]) == 0
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    with pytest.raises(UserError, match="--bind-question needs image, audio or points records"):
        run(parse_args([*common[:3], str(text), *common[4:], "--out", str(tmp_path / "text")]), lm)


def test_tiny_random_early_fusion_conditions_only_the_lowest_adapted_layers():
    model = tiny_random_model()
    early = trained_copy(Adapter.create(model, AdapterConfig(prompt_len=3, layers=2, fusion_layers=1)))
    late = Adapter.create(model, AdapterConfig(prompt_len=3, layers=2))
    late.load_state_dict(early.state_dict())
    tokens, condition = x_tokens(batch=2), torch.randn(2, model.args.dim)
    outputs = {}
    with torch.no_grad():
        for name, adapter in (("early", early), ("late", late)):
            adapter.attach(model)
            with conditioned(model, condition):
                taken = [model.layers[int(i)].attention.prompt.condition is not None for i in sorted(adapter.layers, key=int)]
                outputs[name] = model(tokens)
            outputs[name + " text"] = model(tokens)
            adapter.detach()
    assert taken == [True, True] and early.cfg.fusion_layers == 1
    early.attach(model)
    with conditioned(model, condition):
        assert [model.layers[int(i)].attention.prompt.condition is not None
                for i in sorted(early.layers, key=int)] == [True, False]  # only the lower of the two
    early.detach()
    assert torch.equal(outputs["early text"], outputs["late text"])  # without media the two are one adapter
    assert not torch.allclose(outputs["early"], outputs["late"], atol=1e-5)


def test_tiny_random_points_records_train_with_early_fusion_and_the_file_keeps_it(tmp_path):
    from core.adapter import load_adapter
    from train.finetune import parse_args, run
    lm = tiny_points_setup(tmp_path, "tiny-random-points", n_train=12, n_test=4)
    out = tmp_path / "run"
    flags = ["--model", str(tmp_path / "hf"), "--data", str(tmp_path / "points" / "train.jsonl"), "--out", str(out),
             "--encoder", "tiny-random-points", "--layers", "2", "--prompt-len", "4", "--batch-size", "8", "--lr", "0.05",
             "--epochs", "6", "--warmup-epochs", "0", "--precision", "fp32"]
    with pytest.raises(UserError, match="--fusion-layers must be 1..1"):
        run(parse_args(flags + ["--fusion", "early", "--fusion-layers", "2"]), lm)
    with pytest.raises(UserError, match="goes with --fusion early"):
        run(parse_args(flags + ["--fusion-layers", "1"]), lm)
    adapter = run(parse_args(flags + ["--fusion", "early"]), lm)
    assert adapter.cfg.fusion_layers == 1  # half of the two adapted layers
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    adapter.detach()
    assert load_adapter(out / "adapter.safetensors", lm.model).cfg.fusion_layers == 1
