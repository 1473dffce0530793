"""ImageBind (Girdhar et al., CVPR 2023): six modality encoders into one 1024-d space, in plain
PyTorch. Written from the architecture's published facts; its `state_dict` has exactly the keys
and shapes of the released `imagebind_huge.pth` (the manifest in ../shared/data), so the real
file loads with strict=True.

Each modality is tokens -> a pre-LayerNorm transformer trunk -> a head -> a postprocessor:
- vision: a still image repeated to 2 frames, Conv3d patches (2 x 14 x 14), CLS + learned positions;
  the trunk starts with a LayerNorm; head LayerNorm -> CLS -> Linear; output unit length.
- text: CLIP BPE ids (77), token + position embedding, causal mask; head takes the end-of-text
  position (the largest id); output unit length times a learned logit scale (at most 100).
- audio, depth, thermal: a 1-channel "image" (128 mel x 204 frames; 224 x 224), Conv2d patches
  (audio 16 px at stride 10) + LayerNorm; the trunk's attention has learned bias_k/bias_v.
- IMU: 6 x 2000 samples cut into 250 windows of 8, flattened to 48 -> Linear + LayerNorm.
Audio, depth, thermal and IMU outputs are scaled by 20, 5, 10 and 5. Blocks: x + attn(LN(x)),
x + MLP(LN(x)), LayerNorm eps 1e-6, GELU MLP of 4x width, `nn.MultiheadAttention`.
Inputs with 5 or more dimensions are several clips per item (audio: B x 3 x 1 x 128 x 204;
video: B x 15 x 3 x 2 x 224 x 224): each clip is embedded, scaled, and the clips averaged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")


@dataclass
class TrunkArgs:
    dim: int
    n_blocks: int
    n_heads: int


@dataclass
class ImageBindArgs:
    out_dim: int = 1024
    vision: TrunkArgs = field(default_factory=lambda: TrunkArgs(1280, 32, 16))
    text: TrunkArgs = field(default_factory=lambda: TrunkArgs(1024, 24, 16))
    audio: TrunkArgs = field(default_factory=lambda: TrunkArgs(768, 12, 12))
    depth: TrunkArgs = field(default_factory=lambda: TrunkArgs(384, 12, 8))
    thermal: TrunkArgs = field(default_factory=lambda: TrunkArgs(768, 12, 12))
    imu: TrunkArgs = field(default_factory=lambda: TrunkArgs(512, 6, 8))
    # the input sizes the released weights' position embeddings were made for
    image_size: int = 224
    frames: int = 2
    patch: int = 14
    mel_bins: int = 128
    audio_frames: int = 204
    audio_patch: int = 16
    audio_stride: int = 10
    depth_patch: int = 16
    imu_channels: int = 6
    imu_length: int = 2000
    imu_window: int = 8
    context: int = 77
    vocab: int = 49408

    @classmethod
    def small(cls, width: int = 32, n_blocks: int = 2, n_heads: int = 4, out_dim: int = 24) -> "ImageBindArgs":
        """The same layout at a width and depth that build and run in moments (tests)."""
        trunk = lambda: TrunkArgs(width, n_blocks, n_heads)  # noqa: E731
        return cls(out_dim, trunk(), trunk(), trunk(), trunk(), trunk(), trunk())


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, bias_kv: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, n_heads, bias=True, add_bias_kv=bias_kv, batch_first=True)
        self.norm_1, self.norm_2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)

    def forward(self, x, mask=None):
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, a: TrunkArgs, bias_kv: bool, first_norm: bool = False):
        super().__init__()
        if first_norm:  # vision only: a LayerNorm before the first block
            self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(a.dim, eps=1e-6))
        self.blocks = nn.ModuleList(Block(a.dim, a.n_heads, bias_kv) for _ in range(a.n_blocks))

    def forward(self, x, mask=None):
        if hasattr(self, "pre_transformer_layer"):
            x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x, mask)
        return x


class RepeatFrames(nn.Module):
    """An image (B, C, H, W) as a video of `frames` equal frames (B, C, T, H, W); videos pass."""
    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames

    def forward(self, x):
        if x.ndim == 4:
            x = x.unsqueeze(2)
        return x.repeat(1, 1, self.frames, 1, 1) if x.shape[2] == 1 else x


class Stem(nn.Module):
    """Patches -> (B, N, dim) tokens, with an optional LayerNorm (key names: proj, norm_layer)."""
    def __init__(self, proj: nn.Module, dim: int | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = nn.LayerNorm(dim) if dim else None

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2) if x.ndim > 3 else x
        return self.norm_layer(x) if self.norm_layer is not None else x


class PositionTable(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, n, dim))


class PatchTokens(nn.Module):
    """CLS token + patch tokens + learned positions. `stem_name` is the released key's name for
    the stem (rgbt_stem for vision, audio and thermal; depth_stem for depth)."""
    def __init__(self, stem_name: str, stem: Stem, dim: int, n_patches: int):
        super().__init__()
        self.stem_name = stem_name
        setattr(self, stem_name, stem)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding_helper = PositionTable(n_patches + 1, dim)

    def forward(self, x):
        tokens = getattr(self, self.stem_name)(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] != pos.shape[1]:
            raise UserError(f"input gives {tokens.shape[1] - 1} patches, the position table holds "
                            f"{pos.shape[1] - 1}: inputs must have the size the weights were trained at")
        return tokens + pos


class TextTokens(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.empty(1, context, dim))
        # additive causal mask; a saved buffer in the released file, so kept in the state dict
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, ids):
        return self.token_embedding(ids) + self.pos_embed


class ImuTokens(nn.Module):
    def __init__(self, a: ImageBindArgs):
        super().__init__()
        dim, self.window = a.imu.dim, a.imu_window
        self.imu_stem = Stem(nn.Linear(a.imu_channels * a.imu_window, dim, bias=False), dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, a.imu_length // a.imu_window + 1, dim))

    def forward(self, x):  # (B, 6, 2000) -> windows of 8 samples of all 6 channels: (B, 250, 48)
        windows = x.unfold(-1, self.window, self.window).permute(0, 2, 1, 3).flatten(2)
        tokens = self.imu_stem(windows)
        return torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed


class FirstToken(nn.Module):
    def forward(self, x):
        return x[:, 0]


class TextHead(nn.Module):
    """The end-of-text position's features (its id is the largest in the row) -> proj."""
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x, ids):
        return self.proj(x[torch.arange(len(x)), ids.argmax(dim=-1)])


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """x times exp(log_logit_scale), capped at 100: learned for text, a fixed buffer elsewhere."""
    def __init__(self, scale: float, learned: bool):
        super().__init__()
        value = torch.tensor(math.log(scale))
        if learned:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x):
        return self.log_logit_scale.exp().clamp(max=100) * x


def _head(dim: int, out_dim: int, dropout: bool = False) -> nn.Sequential:
    # IMU's head has a Dropout before its Linear (so its Linear is key .3); inactive at inference
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), FirstToken(), *([nn.Dropout(0.5)] if dropout else []),
                         nn.Linear(dim, out_dim, bias=False))


class ImageBind(nn.Module):
    def __init__(self, a: ImageBindArgs):
        super().__init__()
        self.args = a
        grid = (a.image_size // a.patch) ** 2
        audio_grid = ((a.mel_bins - a.audio_patch) // a.audio_stride + 1) * \
                     ((a.audio_frames - a.audio_patch) // a.audio_stride + 1)
        depth_grid = (a.image_size // a.depth_patch) ** 2

        def conv2d(dim, kernel, stride):
            return nn.Conv2d(1, dim, kernel, stride, bias=False)

        vision_stem = Stem(nn.Sequential(RepeatFrames(a.frames), nn.Conv3d(3, a.vision.dim, (a.frames, a.patch, a.patch),
                                                                            (a.frames, a.patch, a.patch), bias=False)))
        self.modality_preprocessors = nn.ModuleDict({
            "vision": PatchTokens("rgbt_stem", vision_stem, a.vision.dim, grid),
            "text": TextTokens(a.vocab, a.context, a.text.dim),
            "audio": PatchTokens("rgbt_stem", Stem(conv2d(a.audio.dim, a.audio_patch, a.audio_stride), a.audio.dim),
                                 a.audio.dim, audio_grid),
            "depth": PatchTokens("depth_stem", Stem(conv2d(a.depth.dim, a.depth_patch, a.depth_patch), a.depth.dim),
                                 a.depth.dim, depth_grid),
            "thermal": PatchTokens("rgbt_stem", Stem(conv2d(a.thermal.dim, a.depth_patch, a.depth_patch),
                                                     a.thermal.dim), a.thermal.dim, depth_grid),
            "imu": ImuTokens(a),
        })
        self.modality_trunks = nn.ModuleDict({
            "vision": Trunk(a.vision, bias_kv=False, first_norm=True),
            "text": Trunk(a.text, bias_kv=False),
            **{m: Trunk(getattr(a, m), bias_kv=True) for m in ("audio", "depth", "thermal", "imu")},
        })
        self.modality_heads = nn.ModuleDict({
            "vision": _head(a.vision.dim, a.out_dim),
            "text": TextHead(a.text.dim, a.out_dim),
            **{m: _head(getattr(a, m).dim, a.out_dim, dropout=m == "imu") for m in ("audio", "depth", "thermal", "imu")},
        })
        self.modality_postprocessors = nn.ModuleDict({
            "vision": Normalize(),
            "text": nn.Sequential(Normalize(), LogitScale(1 / 0.07, learned=True)),
            "audio": nn.Sequential(Normalize(), LogitScale(20.0, learned=False)),
            "depth": nn.Sequential(Normalize(), LogitScale(5.0, learned=False)),
            "thermal": nn.Sequential(Normalize(), LogitScale(10.0, learned=False)),
            "imu": nn.Sequential(Normalize(), LogitScale(5.0, learned=False)),
        })

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's input batch -> (B, out_dim) embeddings (several clips per item averaged)."""
        if modality not in MODALITIES:
            raise UserError(f"unknown ImageBind modality {modality!r}; accepted: {', '.join(MODALITIES)}")
        clips = x.ndim >= 5
        if clips:
            batch, n_clips = x.shape[:2]
            x = x.flatten(0, 1)
        tokens = self.modality_preprocessors[modality](x)
        mask = self.modality_preprocessors["text"].mask if modality == "text" else None
        features = self.modality_trunks[modality](tokens, mask)
        head = self.modality_heads[modality]
        out = head(features, x) if modality == "text" else head(features)
        out = self.modality_postprocessors[modality](out)
        return out.view(batch, n_clips, -1).mean(1) if clips else out

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.embed(m, x) for m, x in inputs.items()}


def build(args: ImageBindArgs | None = None, state_dict: dict | None = None,
          dtype: torch.dtype | None = None) -> ImageBind:
    """ImageBind with `state_dict` loaded strictly (built on the meta device, so no time goes to a
    random init that loading overwrites); without a state dict, randomly initialized (tests)."""
    args = args or ImageBindArgs()
    if state_dict is None:
        model = ImageBind(args)
        _init(model)
        return model.to(dtype) if dtype else model.eval()
    with torch.device("meta"):
        model = ImageBind(args)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = _key_mismatch(model, state_dict)
    if missing or unexpected:
        raise UserError(f"not an ImageBind checkpoint of this size: {len(missing)} keys missing "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"ImageBind checkpoint does not fit: {str(e).splitlines()[-1].strip()[:200]}") from None
    return model.eval()


def _key_mismatch(model: nn.Module, state_dict: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)


@torch.no_grad()
def _init(model: ImageBind):
    """Small random values for the tables nn's defaults leave empty (tests train nothing)."""
    for name, p in model.named_parameters():
        if name.endswith(("cls_token", "pos_embed")):
            nn.init.normal_(p, std=0.02)
