"""Modality encoders behind one interface, picked by name.

An encoder reads its modality's input (`load`: a file path or an in-memory object, validated
with one-line errors) and turns a batch of loaded inputs into embeddings (`embed`: (N, dim)).
Some read several kinds into one space (`kinds`; ImageBind, Point-Bind, OpenCLIP): their `load`
takes the kind and tags what it returns, so `embed` can batch each kind apart (embed_by_group).
The app, the CLI and training look encoders up by name in ENCODERS; a name may carry an argument
(openclip:ARCH:WEIGHTS) and configure_encoder passes options such as a weights path.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from core.errors import UserError


class Encoder(ABC):
    name: str
    modality: str   # the kind of input it reads (one of KINDS), or the default of several
    dim: int        # embedding width

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind of input it reads into its one embedding space (ImageBind: seven)."""
        return (self.modality,)

    @abstractmethod
    def load(self, source: Any, kind: str | None = None) -> Any:
        """A file path or an in-memory input of `kind` (default: `modality`) -> what `embed`
        takes (raises UserError if unusable)."""

    @abstractmethod
    def embed(self, inputs: list) -> torch.Tensor:
        """Loaded inputs -> (N, dim) float32 embeddings."""

    def tokens(self, inputs: list) -> torch.Tensor:
        """Loaded inputs -> (N, T, C) token features (patches, grid cells), what V2's visual
        queries read; encoders that give one embedding per input only say so."""
        raise UserError(f"encoder {self.name} gives one embedding per input, no token features; the visual "
                        "queries read tokens of: efficientnet-lite0, openclip:ARCH:WEIGHTS")

    def labels(self, inputs: list, k: int = 5) -> list[list[tuple[str, float]]] | None:
        """Top-k class labels where the encoder has a classifier head; None where it has none."""
        return None


def media_file(source, formats: tuple[str, ...], what: str, accepted: str) -> Path:
    """`source` as the path of an existing file in one of `formats`, or a one-line UserError
    naming the problem (`what`: "image", "audio", "point-cloud")."""
    path = Path(source)
    if path.suffix.lower() not in formats:
        raise UserError(f"{path.name}: unknown {what} format {path.suffix or '(none)'}; {accepted}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


def embed_by_group(inputs: list[tuple[str, torch.Tensor]], encode: Callable) -> torch.Tensor:
    """Tagged inputs (kind, tensor) -> (N, dim) float32 rows in input order, for encoders that read
    several kinds: the items of one kind and shape go through `encode(kind, batch)` as one batch."""
    out: list = [None] * len(inputs)
    for kind, shape in dict.fromkeys((k, t.shape) for k, t in inputs):
        rows = [i for i, (k, t) in enumerate(inputs) if k == kind and t.shape == shape]
        for i, row in zip(rows, encode(kind, torch.stack([inputs[i][1] for i in rows])).float()):
            out[i] = row
    return torch.stack(out)


KINDS = ("image", "audio", "points", "video")  # the kinds of input records and the CLI name (Encoder.modality)
ENCODERS: dict[str, Callable[[], Encoder]] = {}
DEFAULT_ENCODERS = {"image": "efficientnet-lite0", "audio": "whisper-tiny", "points": "pointnet"}  # per kind of input, what needs no download
_built: dict[str, Encoder] = {}
_options: dict[str, dict] = {}  # per encoder: what its constructor takes besides the name (weights=...)


def register(name: str):
    def wrap(factory: Callable[[], Encoder]):
        ENCODERS[name] = factory
        return factory
    return wrap


def configure_encoder(name: str, **options):
    """Options for an encoder's next build, e.g. configure_encoder("imagebind", weights=PATH)."""
    base = name.partition(":")[0]
    _options[base] = {k: v for k, v in options.items() if v is not None}
    for built in [n for n in _built if n.partition(":")[0] == base]:
        del _built[built]


def get_encoder(name: str, kind: str | Iterable[str] | None = None) -> Encoder:
    """The encoder called `name`, built once per process; refused if it does not read `kind`
    (or each of several kinds). A name may carry an argument after a colon:
    openclip:ARCH[:PRETRAINED_OR_PATH]."""
    reads = encoder_kinds(name)  # checked before building: a build may read gigabytes
    for wanted in [kind] if isinstance(kind, str) else kind or []:
        if wanted and wanted not in reads:
            raise UserError(f"encoder {name} reads {' and '.join(reads)}, not {wanted}")
    return _build(name)


def encoder_kinds(name: str) -> tuple[str, ...]:
    """The kinds of input the encoder called `name` reads, known without building it where its
    factory is an Encoder class."""
    _import_builtin()
    factory = ENCODERS.get(name.partition(":")[0])
    if factory is None:
        raise UserError(f"unknown encoder {name!r}; accepted: {', '.join(sorted(ENCODERS))}")
    if isinstance(getattr(factory, "kinds", None), tuple):
        return factory.kinds
    if isinstance(getattr(factory, "modality", None), str):
        return (factory.modality,)
    return _build(name).kinds  # a plain function: what it builds tells


def _build(name: str) -> Encoder:
    base, _, arg = name.partition(":")
    if name not in _built:
        options = _options.get(base, {})
        _built[name] = ENCODERS[base](arg, **options) if arg else ENCODERS[base](**options)
    return _built[name]


def _import_builtin():
    from core.encoders import audio, image, imagebind, openclip, pointbind, points  # noqa: F401  (they register their encoders)
