"""Modality encoders behind one interface, picked by name.

An encoder reads its modality's input (`load`: a file path or an in-memory object, validated
with one-line errors) and turns a batch of loaded inputs into embeddings (`embed`: (N, dim)).
The app, the CLI and training look encoders up by name in ENCODERS.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import UserError


class Encoder(ABC):
    name: str
    modality: str   # one of KINDS
    dim: int        # embedding width

    @abstractmethod
    def load(self, source: Any) -> Any:
        """A file path or an in-memory input -> what `embed` takes (raises UserError if unusable)."""

    @abstractmethod
    def embed(self, inputs: list) -> torch.Tensor:
        """Loaded inputs -> (N, dim) float32 embeddings."""

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


KINDS = ("image", "audio", "points")  # the kinds of input an encoder reads (Encoder.modality)
ENCODERS: dict[str, Callable[[], Encoder]] = {}
DEFAULT_ENCODERS = {"image": "efficientnet-lite0", "audio": "whisper-tiny", "points": "pointnet"}  # per kind of input, what needs no download
_built: dict[str, Encoder] = {}


def register(name: str):
    def wrap(factory: Callable[[], Encoder]):
        ENCODERS[name] = factory
        return factory
    return wrap


def get_encoder(name: str, kind: str | None = None) -> Encoder:
    """The encoder called `name`, built once per process; refused if it does not read `kind`."""
    _import_builtin()
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; accepted: {', '.join(sorted(ENCODERS))}")
    if name not in _built:
        _built[name] = ENCODERS[name]()
    encoder = _built[name]
    if kind and encoder.modality != kind:
        raise UserError(f"encoder {name} reads {encoder.modality}, not {kind}")
    return encoder


def _import_builtin():
    from core.encoders import audio, image, points  # noqa: F401  (they register their encoders)
