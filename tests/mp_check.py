"""Run under `torchrun --nproc_per_node N`: a tiny random model (with a trained-looking adapter)
gives the same logits split over N processes with fairscale's layers as in one process."""
import json
import sys

import torch

from core import parallel
from core.adapter import Adapter, AdapterConfig
from core.model import ModelArgs, Transformer


def main(out_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128, tie_embeddings=True)
    model = Transformer(args).eval().requires_grad_(False)
    adapter = Adapter.create(model, AdapterConfig(prompt_len=3, layers=2)).attach(model)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        single = model(x)  # plain layers, no process group needed
        rank, world = parallel.init_model_parallel("cpu")
        parallel.apply_model_parallel(model)
        assert model.layers[0].attention.wq.weight.shape[0] == 64 // world
        split = model(x)
        model.setup_cache(2, 10)  # and with the KV cache, step by step
        steps = [model(x[:, :6])] + [model(x[:, i:i + 1], start_pos=i) for i in range(6, 10)]
    diff = max((split - single).abs().max().item(), (torch.cat(steps, 1) - single).abs().max().item())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "max_abs_diff": diff}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
