"""Point-Bind (Guo et al., 2023): a PointBERT-style point-cloud branch trained into ImageBind's
1024-d space. Written from the published architecture's facts, with the key names of the released
checkpoint (`point_encoder.*`, `pc_projection`, `bind.modality_head_point.*`, and the whole
ImageBind under `bind.`), so one Point-Bind file gives every ImageBind modality plus point clouds.

The point branch: 8192 points (xyz, centred, in the unit sphere) -> 512 centres by farthest-point
sampling -> each centre's 32 nearest points, relative to it -> a small PointNet per group (1x1
convolutions 3-128-256, max, concatenated back, 512-512-256, max) -> Linear to 384 -> CLS token +
groups, a learned position MLP (3-128-384) added before every block -> 12 pre-LayerNorm blocks (6
heads, no qkv bias) -> LayerNorm -> [CLS, max over groups] (768) -> x pc_projection (768 x 512) ->
LayerNorm(512, eps 1e-6) -> Linear(512, 1024, no bias) -> unit length. Farthest-point sampling and
kNN are plain torch (no CUDA extension), so it runs on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.encoders import register
from core.encoders.imagebind import ImageBindEncoder, find_weights, read_state_dict
from core.encoders.imagebind_model import Mlp  # the same GELU MLP (fc1, fc2) as ImageBind's blocks
from core.errors import UserError

PREFIX = "point_encoder."


@dataclass
class PointBindArgs:
    dim: int = 384
    n_blocks: int = 12
    n_heads: int = 6
    n_groups: int = 512
    group_size: int = 32
    n_points: int = 8192
    group_dim: int = 256     # the per-group PointNet's output ("encoder_dims")
    proj_dim: int = 512
    out_dim: int = 1024

    @classmethod
    def small(cls, out_dim: int = 24) -> "PointBindArgs":
        return cls(dim=32, n_blocks=2, n_heads=4, n_groups=16, group_size=8, n_points=256, group_dim=32,
                   proj_dim=16, out_dim=out_dim)


def farthest_points(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, 3) -> (B, n) indices: each next point the farthest from those chosen, from point 0."""
    B, N, _ = xyz.shape
    chosen = torch.zeros(B, n, dtype=torch.long, device=xyz.device)
    nearest = torch.full((B, N), float("inf"), device=xyz.device)
    latest = torch.zeros(B, dtype=torch.long, device=xyz.device)
    rows = torch.arange(B, device=xyz.device)
    for i in range(n):
        chosen[:, i] = latest
        nearest = torch.minimum(nearest, (xyz - xyz[rows, latest][:, None]).pow(2).sum(-1))
        latest = nearest.argmax(-1)
    return chosen


def group(xyz: torch.Tensor, n_groups: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3) -> neighbourhoods (B, G, size, 3) relative to their centres, and centres (B, G, 3)."""
    rows = torch.arange(len(xyz), device=xyz.device)[:, None]
    centres = xyz[rows, farthest_points(xyz, n_groups)]
    near = torch.cdist(centres, xyz).topk(size, largest=False).indices  # (B, G, size), nearest first
    return xyz[rows[:, :, None], near] - centres[:, :, None], centres


class GroupEncoder(nn.Module):
    """A PointNet per group: shared 1x1 convolutions, max-pooled twice (key names: first_conv, second_conv)."""
    def __init__(self, out_dim: int):
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(), nn.Conv1d(512, out_dim, 1))

    def forward(self, groups):  # (B, G, S, 3) -> (B, G, out_dim)
        B, G, S, _ = groups.shape
        x = self.first_conv(groups.reshape(B * G, S, 3).transpose(1, 2))
        x = torch.cat([x.max(-1, keepdim=True).values.expand(-1, -1, S), x], dim=1)
        return self.second_conv(x).max(-1).values.view(B, G, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, n_heads), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """The released key names nest the list one level deeper: blocks.blocks.N."""
    def __init__(self, a: PointBindArgs):
        super().__init__()
        self.blocks = nn.ModuleList(Block(a.dim, a.n_heads) for _ in range(a.n_blocks))

    def forward(self, x, pos):
        for block in self.blocks:
            x = block(x + pos)  # positions enter before every block
        return x


class PointBERT(nn.Module):
    def __init__(self, a: PointBindArgs):
        super().__init__()
        self.args = a
        self.encoder = GroupEncoder(a.group_dim)
        self.reduce_dim = nn.Linear(a.group_dim, a.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, a.dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, a.dim))
        self.blocks = Blocks(a)
        self.norm = nn.LayerNorm(a.dim)

    def forward(self, xyz):  # (B, n_points, 3) -> (B, 2 * dim)
        groups, centres = group(xyz, self.args.n_groups, self.args.group_size)
        tokens = self.reduce_dim(self.encoder(groups))
        B = len(tokens)
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(centres)], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].max(1).values], dim=-1)


class PointBind(nn.Module):
    """The point branch into ImageBind's space; its state dict keys are the released file's
    point keys (with `bind.modality_head_point` as `modality_head_point`)."""
    def __init__(self, a: PointBindArgs):
        super().__init__()
        self.args = a
        self.point_encoder = PointBERT(a)
        self.pc_projection = nn.Parameter(torch.empty(2 * a.dim, a.proj_dim))
        self.modality_head_point = nn.Sequential(nn.LayerNorm(a.proj_dim, eps=1e-6), nn.Dropout(0.5),
                                                 nn.Linear(a.proj_dim, a.out_dim, bias=False))

    def forward(self, xyz):
        return F.normalize(self.modality_head_point(self.point_encoder(xyz) @ self.pc_projection), dim=-1)


def split_checkpoint(state: dict) -> tuple[dict, dict]:
    """A Point-Bind file's state dict -> (ImageBind's keys, the point branch's keys)."""
    image_bind, points = {}, {}
    for k, v in state.items():
        if k.startswith(PREFIX) or k == "pc_projection":
            points[k] = v
        elif k.startswith("bind.modality_head_point."):
            points[k[len("bind."):]] = v
        elif k.startswith("bind.") and not k.startswith("bind.modality_postprocessor_point."):
            image_bind[k[len("bind."):]] = v
        elif k not in ("logit_scale", "bind.modality_postprocessor_point.1.log_logit_scale"):
            raise UserError(f"not a Point-Bind checkpoint: unexpected tensor {k}")
    return image_bind, points


def build_point_branch(points: dict, args: PointBindArgs | None = None, dtype=None) -> PointBind:
    model = PointBind(args or PointBindArgs())
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(points)), sorted(set(points) - set(expected))
    if missing or extra:
        raise UserError(f"not a Point-Bind (PointBERT) checkpoint of this size: {len(missing)} point keys missing "
                        f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    try:
        model.load_state_dict(points, strict=True)
    except RuntimeError as e:
        raise UserError(f"Point-Bind checkpoint does not fit: {str(e).splitlines()[-1].strip()[:200]}") from None
    return model.to(dtype).eval() if dtype else model.eval()


def point_tensor(points: np.ndarray, n: int, seed: int = 0) -> torch.Tensor:
    """(N, 3+) points -> (n, 3): xyz centred, scaled into the unit sphere, sampled (or repeated) to n."""
    xyz = np.asarray(points, dtype=np.float32)[:, :3]
    xyz = xyz - xyz.mean(0)
    xyz = xyz / max(float(np.linalg.norm(xyz, axis=1).max()), 1e-8)
    rng = np.random.default_rng(seed)  # the same cloud gives the same sample
    pick = rng.choice(len(xyz), n, replace=len(xyz) < n)
    return torch.from_numpy(xyz[pick])


@register("pointbind")
class PointBindEncoder(ImageBindEncoder):
    """ImageBind's seven kinds plus point clouds, from one Point-Bind checkpoint (which holds both)."""
    name = "pointbind"
    kinds = ImageBindEncoder.kinds + ("points",)

    def __init__(self, weights: str | None = None, dtype: str | None = None, model=None, points: PointBind | None = None):
        from core.encoders.imagebind_model import build
        if model is None:
            path = find_weights(weights, url=None, file="pointbind_pointbert.pt", what="Point-Bind")
            image_bind, point_keys = split_checkpoint(read_state_dict(path))
            torch_dtype = getattr(torch, dtype) if dtype else None
            model, points = build(state_dict=image_bind, dtype=torch_dtype), build_point_branch(point_keys, dtype=torch_dtype)
        super().__init__(model=model)
        self.points = points

    def load(self, source, kind: str | None = None):
        if kind != "points":
            return super().load(source, kind)
        from core.encoders.points import as_points, read_points
        cloud = read_points(source) if isinstance(source, (str, Path)) else as_points(source)
        return "points", point_tensor(cloud, self.points.args.n_points)

    def encode(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        if modality == "points":
            return self.points(batch.to(next(self.points.parameters()).dtype))
        return super().encode(modality, batch)

