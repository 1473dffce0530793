"""OpenCLIP vision towers (LLaMA-Adapter V2 used CLIP's) as an image encoder, any architecture
`open_clip_torch` knows: `openclip:ARCH[:PRETRAINED_OR_PATH]`, e.g. openclip:ViT-L-14:openai
(downloaded and cached by open_clip where the network allows) or openclip:ViT-B-32:/models/b32.pt
(a local checkpoint, offline). Its text tower embeds text into the same space."""
from __future__ import annotations

from pathlib import Path

import torch

from core.encoders import Encoder, embed_by_group, register
from core.errors import UserError, first_line


@register("openclip")
class OpenClipEncoder(Encoder):
    modality = "image"
    kinds = ("image", "text")

    def __init__(self, spec: str = "", weights: str | None = None):
        import open_clip
        arch, _, pretrained = spec.partition(":")
        pretrained = pretrained or weights
        self.name = f"openclip:{spec}"
        if arch not in open_clip.list_models():
            raise UserError(f"unknown OpenCLIP architecture {arch!r}; use openclip:ARCH[:PRETRAINED_OR_PATH] "
                            f"with ARCH one of open_clip.list_models(), e.g. ViT-B-32")
        if not pretrained:
            raise UserError(f"openclip:{arch} needs weights: openclip:{arch}:TAG (a tag from "
                            f"open_clip.list_pretrained(), downloaded) or openclip:{arch}:PATH (a local checkpoint)")
        if not open_clip.get_pretrained_cfg(arch, pretrained) and not Path(pretrained).is_file():
            raise UserError(f"{pretrained}: neither a pretrained tag of {arch} nor a checkpoint file")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as e:  # a download refused, a checkpoint of another shape
            raise UserError(f"openclip:{arch}: could not load {pretrained} ({first_line(e, 160)})") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = self.model.visual.output_dim

    def load(self, source, kind: str | None = None):
        kind = kind or self.modality
        if kind == "text":
            if not isinstance(source, str) or not source.strip():
                raise UserError("text for OpenCLIP must be a non-empty string")
            return "text", self.tokenizer([source])[0]
        if kind != "image":
            raise UserError(f"OpenCLIP reads images and text, not {kind}")
        from core.encoders.image import read_image
        return "image", self.preprocess(read_image(source))

    @torch.no_grad()
    def embed(self, inputs: list) -> torch.Tensor:
        encode = {"image": self.model.encode_image, "text": self.model.encode_text}
        return embed_by_group(inputs, lambda kind, batch: encode[kind](batch, normalize=True))
