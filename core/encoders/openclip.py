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
        pretrained = weights or pretrained  # --encoder-weights PATH: a local copy of the named weights, offline
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

    @torch.no_grad()
    def tokens(self, inputs: list) -> torch.Tensor:
        """(N, T, C): the last block's feature map as tokens, any tower with open_clip's
        forward_intermediates. A ViT gives every token as V2 reads CLIP's (ViT-L/14: 257 x 768): the
        class token first, all through the final LayerNorm and the projection; a ResNet or timm tower
        its last stage's grid, row by row, in the trunk's width."""
        from open_clip.transformer import VisionTransformer
        visual = self.model.visual
        if not hasattr(visual, "forward_intermediates"):
            return super().tokens(inputs)
        if any(kind != "image" for kind, _ in inputs):
            raise UserError("the visual queries read images only")
        out = visual.forward_intermediates(torch.stack([x for _, x in inputs]), indices=1, intermediates_only=True,
                                           normalize_intermediates=True, output_extra_tokens=True)
        x = out["image_intermediates"][-1].flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, H*W, C)
        if out.get("image_intermediates_prefix"):
            x = torch.cat([out["image_intermediates_prefix"][-1], x], 1)
        if isinstance(visual, VisionTransformer) and visual.proj is not None:
            x = x @ visual.proj
        return x.float()
