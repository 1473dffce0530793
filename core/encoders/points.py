"""Point clouds: reading files, normalizing and sampling to a fixed count, and the project's own
PointNet encoder (nothing pretrained for point clouds ships in any package: the weights in
assets/ are trained by `python -m train.point_encoder` on generated shapes).

Accepted inputs: N x 3 (xyz) or N x 6 (xyz + rgb, rgb in 0..1 or 0..255) from .npy, .ply,
.pcd, .xyz or .txt files, or an array.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.encoders import Encoder, media_file, register
from core.errors import UserError, first_line

FORMATS = (".npy", ".ply", ".pcd", ".xyz", ".txt")
ACCEPTED = "accepted: N x 3 (xyz) or N x 6 (xyz + rgb) points in a .npy, .ply, .pcd, .xyz or .txt file"
N_POINTS = 512  # what the encoder is trained and run on (its kNN is quadratic in it)
WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "point_encoder.safetensors"
GREY = 0.5


def read_points(path: str | Path) -> np.ndarray:
    """(N, 6) float32 xyz + rgb in 0..1 (grey where the file has no colour)."""
    path = media_file(path, FORMATS, "point-cloud", ACCEPTED)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)  # never unpickle an upload
        elif suffix == ".ply":
            arr = _read_ply(path)
        elif suffix == ".pcd":
            arr = _read_pcd(path)
        else:
            arr = np.loadtxt(path, delimiter=None, comments="#", ndmin=2)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path.name}: unreadable {suffix} file ({first_line(e)}); "
                        f"{ACCEPTED}") from None
    return as_points(arr, path.name)


def as_points(arr, name: str = "input") -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] not in (3, 6) or len(arr) < 3:
        raise UserError(f"{name}: got an array of shape {arr.shape} and type {arr.dtype}; {ACCEPTED}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise UserError(f"{name}: holds NaN or infinite values; {ACCEPTED}")
    if arr.shape[1] == 3:
        arr = np.concatenate([arr, np.full((len(arr), 3), GREY, np.float32)], 1)
    elif arr[:, 3:].max() > 1.0:  # 0..255 colours
        arr[:, 3:] /= 255.0
    return arr


def _read_ply(path: Path) -> np.ndarray:
    from plyfile import PlyData
    vertex = PlyData.read(str(path))["vertex"]
    names = vertex.data.dtype.names
    cols = [vertex[c] for c in ("x", "y", "z")]
    if all(c in names for c in ("red", "green", "blue")):
        cols += [vertex[c] for c in ("red", "green", "blue")]
    return np.stack(cols, 1).astype(np.float32)


def _read_pcd(path: Path) -> np.ndarray:
    from pypcd4 import PointCloud
    pc = PointCloud.from_path(str(path))
    fields = pc.fields
    xyz = np.stack([pc.numpy((f,))[:, 0] for f in ("x", "y", "z")], 1)
    if "rgb" in fields:  # PCL packs r, g, b into the bytes of one float
        rgb = PointCloud.decode_rgb(pc.numpy(("rgb",))[:, 0]).astype(np.float32)
        return np.concatenate([xyz, rgb], 1)
    return xyz


def normalize(points: np.ndarray, n: int = N_POINTS, seed: int = 0) -> np.ndarray:
    """Centred, scaled into the unit sphere, and sampled to exactly `n` points (random subset,
    or repeats when there are fewer): what the encoder was trained on."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(points), n, replace=len(points) < n)
    out = points[idx].copy()
    out[:, :3] -= out[:, :3].mean(0)
    out[:, :3] /= max(float(np.linalg.norm(out[:, :3], axis=1).max()), 1e-6)
    return out


def edge_features(feats: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """EdgeConv input: each point's own features beside its neighbours' offsets from it.
    feats (B, N, C), near (B, N, k) neighbour indices -> (B, N, k, 2C)."""
    B, N, C = feats.shape
    rows = near + N * torch.arange(B, device=near.device)[:, None, None]  # indices into (B*N) points
    neighbours = feats.reshape(B * N, C)[rows]
    own = feats.unsqueeze(2).expand_as(neighbours)
    return torch.cat([own, neighbours - own], -1)


class PointNet(nn.Module):
    """A small DGCNN: three EdgeConv layers (each point sees its k nearest neighbours' offsets,
    which tells a flat face from an edge or a curve under any rotation; layers 2 and 3 look at
    the neighbours' learned features too), then a shared per-point MLP, max- and mean-pooled so
    the result does not depend on point order. Small enough to run on a CPU per upload."""

    def __init__(self, in_dim: int = 6, width: int = 256, k: int = 16, local: int = 64):
        super().__init__()
        self.k, self.width = k, width
        self.edge1 = nn.Sequential(nn.Linear(2 * in_dim, local), nn.GELU(), nn.Linear(local, local), nn.GELU())
        self.edge2 = nn.Sequential(nn.Linear(2 * local, local), nn.GELU())
        self.edge3 = nn.Sequential(nn.Linear(2 * local, 2 * local), nn.GELU())
        self.point = nn.Sequential(nn.Linear(4 * local, width), nn.GELU())
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 6) -> (B, width)."""
        xyz = points[..., :3]
        near = torch.cdist(xyz, xyz).topk(self.k + 1, largest=False).indices[..., 1:]  # (B, N, k), self excluded
        f1 = self.edge1(edge_features(points, near)).max(dim=2).values
        f2 = self.edge2(edge_features(f1, near)).max(dim=2).values
        f3 = self.edge3(edge_features(f2, near)).max(dim=2).values
        per_point = self.point(torch.cat([f1, f2, f3], -1))
        return self.out(torch.cat([per_point.max(dim=1).values, per_point.mean(dim=1)], -1))


class PointHeads(nn.Module):
    """What the encoder is trained to tell (train.point_encoder): the object count, and which
    shapes, colours and shape-colour pairs are present. Shown as labels beside an answer."""

    def __init__(self, width: int, n_shapes: int, n_colors: int):
        super().__init__()
        self.count = nn.Linear(width, 3)
        self.multi = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                   nn.Linear(width, n_shapes + n_colors + n_shapes * n_colors))

    def forward(self, z):
        return self.count(z), self.multi(z)


@register("pointnet")
class PointNetEncoder(Encoder):
    name, modality = "pointnet", "points"

    def __init__(self, weights: str | Path = WEIGHTS):
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file
        weights = Path(weights)
        if not weights.is_file():
            raise UserError(f"{weights} is missing; make it with `python -m train.point_encoder`")
        state = load_file(str(weights))
        with safe_open(str(weights), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("point_encoder", "{}"))
        width = state["out.2.weight"].shape[0]
        self.net = PointNet(width=width).eval().requires_grad_(False)
        self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
        self.dim = width
        self.shapes, self.colors = meta.get("shapes"), meta.get("colors")
        self.heads = None
        if self.shapes and any(k.startswith("head.") for k in state):
            self.heads = PointHeads(width, len(self.shapes), len(self.colors)).eval().requires_grad_(False)
            self.heads.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    def load(self, source, kind=None) -> np.ndarray:
        points = read_points(source) if isinstance(source, (str, Path)) else as_points(source)
        return normalize(points)

    @torch.no_grad()
    def embed(self, inputs: list) -> torch.Tensor:
        return self.net(torch.from_numpy(np.stack(inputs)).float())

    @torch.no_grad()
    def readings(self, inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' probabilities: (B, 3) of 1, 2 or 3 objects, and (B, shapes + colours +
        shapes x colours) of each being present."""
        count, multi = self.heads(self.net(torch.from_numpy(np.stack(inputs)).float()))
        return count.softmax(-1), multi.sigmoid()

    @torch.no_grad()
    def labels(self, inputs: list, k: int = 5):
        """The heads' reading of each cloud: its object count, then the shapes and colours they
        find present, with probabilities."""
        if self.heads is None:
            return None
        count, multi = self.readings(inputs)
        out = []
        for c, m in zip(count, multi):
            n = int(c.argmax())
            found = [(f"{n + 1} object{'s' if n else ''}", float(c[n]))]
            names = self.shapes + self.colors
            found += sorted(((names[j], float(m[j])) for j in range(len(names)) if m[j] > 0.5), key=lambda t: -t[1])
            out.append(found[:k + 1])
        return out


@register("pointnet-readings")
class PointReadingsEncoder(PointNetEncoder):
    """The point encoder's heads' reading of the scene as its embedding: the count's and every
    shape's, colour's and shape-colour pair's probability. Which shape has which colour is a
    plain number here, where the 384-d embedding holds it only for a nonlinear head to find."""
    name = "pointnet-readings"

    def __init__(self, weights: str | Path = WEIGHTS):
        super().__init__(weights)
        if self.heads is None:
            raise UserError(f"{Path(weights).name} has no heads to read; make it with `python -m train.point_encoder`")
        self.dim = 3 + self.heads.multi[-1].out_features

    @torch.no_grad()
    def embed(self, inputs: list) -> torch.Tensor:
        return torch.cat(self.readings(inputs), -1)
