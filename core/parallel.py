"""Model parallelism as a transform of a built Transformer, with fairscale's layers as in Meta's
LLaMA code: wq/wk/wv/w1/w3 and the output head split by output rows (ColumnParallelLinear),
wo/w2 by input columns (RowParallelLinear), the embedding by its width (ParallelEmbedding).
Each rank keeps its share of the heads. Launch with `torchrun --nproc_per_node N`; gloo on CPU,
nccl on GPU. Single-process runs never touch this module."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from core.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_model_parallel(device: str) -> tuple[int, int]:
    """Join the torchrun process group and make all ranks one model-parallel group."""
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not model_parallel_is_initialized():
        initialize_model_parallel(dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def _keep(w):  # fairscale would random-initialize a full master weight; we copy real weights in
    return w


def _shard(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return full.chunk(world, dim=dim)[rank].clone()


def apply_model_parallel(model: nn.Module) -> nn.Module:
    """Replace the model's layers with fairscale's parallel ones, each holding this rank's slice."""
    from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
    rank, world = get_model_parallel_rank(), get_model_parallel_world_size()
    a = model.args
    if a.n_kv_heads % world or a.dim % world or a.hidden_dim % world or a.vocab_size % world:
        raise UserError(f"cannot split this model over {world} processes: heads ({a.n_kv_heads} kv), dim, "
                        "FFN width and vocabulary must all divide evenly")
    adapter = getattr(model, "adapter", None)
    if adapter is not None and adapter.cfg.bias_scale:
        raise UserError("V2 bias/scale adapters cannot be split over processes yet; "
                        "run them in one process, or use a prompt-only adapter")
    device = model.tok_embeddings.weight.device

    def column(linear: nn.Linear, gather: bool) -> nn.Module:
        out, inp = linear.weight.shape
        layer = ColumnParallelLinear(inp, out, bias=False, gather_output=gather, init_method=_keep)
        layer.weight = nn.Parameter(_shard(linear.weight.data, 0, rank, world), requires_grad=False)
        return layer.to(device)

    def row(linear: nn.Linear) -> nn.Module:
        out, inp = linear.weight.shape
        layer = RowParallelLinear(inp, out, bias=False, input_is_parallel=True, init_method=_keep)
        layer.weight = nn.Parameter(_shard(linear.weight.data, 1, rank, world), requires_grad=False)
        return layer.to(device)

    with torch.no_grad():
        emb = model.tok_embeddings.weight.data
        model.output = column(model.output, gather=True)  # before the embedding: they may be tied
        parallel_emb = ParallelEmbedding(emb.shape[0], emb.shape[1], init_method=_keep)
        parallel_emb.weight = nn.Parameter(_shard(emb, 1, rank, world), requires_grad=False)
        model.tok_embeddings = parallel_emb.to(device)
        for layer in model.layers:
            attn, ffn = layer.attention, layer.feed_forward
            attn.wq, attn.wk, attn.wv = (column(m, False) for m in (attn.wq, attn.wk, attn.wv))
            attn.wo = row(attn.wo)
            attn.n_kv_heads //= world
            ffn.w1, ffn.w3 = column(ffn.w1, False), column(ffn.w3, False)
            ffn.w2 = row(ffn.w2)
            if attn.prompt is not None:  # an attached adapter: keep this rank's heads' gates
                attn.prompt.gate = nn.Parameter(_shard(attn.prompt.gate.data, 0, rank, world))
    return model


def apply_fsdp(model: nn.Module, device: str) -> nn.Module:
    """Shard the frozen base across the data-parallel ranks (PyTorch's FSDP2 `fully_shard`): each
    block's weights are gathered just for its forward (and backward) and freed after, so a rank
    holds 1/world of the base between uses. Attach adapters after this: their parameters stay
    whole on every rank (they are small and their gradients are all-reduced by the trainer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # undo the CPU decode layout (core.model.cpu_decode_layout): FSDP shards contiguous rows only,
    # and the fused copies would stay whole
    for module in model.modules():
        for fused in ("wqkv", "w13"):
            if getattr(module, fused, None) is not None:
                setattr(module, fused, None)
    for p in model.parameters():
        p.data = p.data.contiguous()
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
