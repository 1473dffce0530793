"""The bind network and its injection into the adaption prompts (ImageBind-LLM), on tiny random
models: zero-gated so an untrained bind network changes nothing, then trainable end to end."""
import pytest
import torch

from core.adapter import Adapter, AdapterConfig
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
