"""The two paths from a modality encoder into the gated adapter.

ImageBind-LLM's bind network: an encoder's embedding goes through a projection to the LM's width,
then residual RMSNorm + SwiGLU blocks, and is added to the adaption prompts of every adapted layer.
Its output is scaled by tanh of a zero-initialized gate, so an untrained bind network leaves the
language model's output exactly as it was; training opens the gate.

LLaMA-Adapter V2's visual queries (VisualQuery): the encoder's token features (CLIP's patch
tokens) are projected, K learnable queries are put before them, a few ViT blocks mix the two, and
the K query outputs, projected to the LM's width, are added one to each adaption prompt. The
layers' zero-initialized gates alone keep an untrained path at the base model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError, first_line
from core.model import FeedForward, RMSNorm, Transformer


STYLES = ("studio", "imagebind-llm", "imagebind-llm-legacy")


class BindBlock(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, style: str = "studio"):
        super().__init__()
        # the release's RMSNorm is Meta's (eps 1e-6); its legacy bridge used LayerNorm and biased linears
        self.norm = {"studio": lambda: RMSNorm(dim), "imagebind-llm": lambda: RMSNorm(dim, eps=1e-6),
                     "imagebind-llm-legacy": lambda: nn.LayerNorm(dim)}[style]()
        self.feed_forward = FeedForward(dim, hidden_dim)
        if style == "imagebind-llm-legacy":
            ff = self.feed_forward
            ff.w1, ff.w2, ff.w3 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim), nn.Linear(dim, hidden_dim)

    def forward(self, x):
        return x + self.feed_forward(self.norm(x))


class BindNetwork(nn.Module):
    """style "studio": unit-length input, and a zero-initialized per-channel gate on the output.
    "imagebind-llm" / "imagebind-llm-legacy": the official release's layout, to load its file: the
    encoder's output as it is, no gate (its zero-initialized layer gates start it at the base model).

    question_dim > 0: question-aware, as InstructBLIP gives its Q-Former the instruction. The input
    is the encoder's embedding followed by the question's (question_embedding), each unit length, so
    the network can pass what is asked about ("the cube's colour") rather than the whole scene:
    added to the prompts, one fixed addition cannot be read differently by different questions.
    The two meet by a product, tanh(proj x) * tanh(question_proj q), the low-rank bilinear fusion of
    VQA models (Kim et al., 2017): "the colour of the cube" is a row of the shape-by-colour readings
    picked by the question, which a product gives at once and a projection of the two concatenated
    learned only slowly (a bind network + classifier on the points readings, 1,500 steps: 88% against
    36% on which-object questions; README)."""

    def __init__(self, in_dim: int, dim: int, n_blocks: int = 2, hidden_dim: int | None = None, style: str = "studio",
                 question_dim: int = 0):
        super().__init__()
        if style not in STYLES:
            raise UserError(f"unknown bind network style {style!r}; accepted: {', '.join(STYLES)}")
        self.in_dim, self.dim, self.style, self.question_dim = in_dim, dim, style, question_dim
        self.proj = nn.Linear(in_dim, dim)
        self.question_proj = nn.Linear(question_dim, dim) if question_dim else None
        self.blocks = nn.ModuleList(BindBlock(dim, hidden_dim or dim, style) for _ in range(n_blocks))
        # zero: the untrained path adds nothing. One gate per channel, not one for all: a single
        # scalar's gradient sums many random-signed terms while the bind network is still random,
        # and stayed near zero for hundreds of steps (0.001 after 300 steps at lr 5e-3, measured)
        self.gate = nn.Parameter(torch.zeros(dim)) if style == "studio" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim [+ question_dim]) encoder [and question] embeddings -> (B, dim) additions to
        the adaption prompts."""
        width = self.in_dim + self.question_dim
        if features.ndim != 2 or features.shape[1] != width:
            what = f"{self.in_dim} + {self.question_dim} (embedding + question)" if self.question_dim else self.in_dim
            raise UserError(f"bind network expects embeddings of shape (batch, {what}), got {tuple(features.shape)}")
        parts = features.split([self.in_dim, self.question_dim], -1) if self.question_dim else [features]
        # unit length, as ImageBind's vision embeddings are: the projection sees one scale for any encoder
        if self.style == "studio":
            parts = [F.normalize(part.float(), dim=-1) for part in parts]
        embedding, *question = (part.to(self.proj.weight.dtype) for part in parts)
        if self.question_proj is None:
            x = self.proj(embedding)
        else:
            x = torch.tanh(self.proj(embedding)) * torch.tanh(self.question_proj(question[0]))
        for block in self.blocks:
            x = block(x)
        return torch.tanh(self.gate) * x if self.gate is not None else x


class ViTBlock(nn.Module):
    """A pre-norm ViT block (timm's layout and names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2; LayerNorm eps 1e-5, exact GELU, biased qkv), as V2's visual blocks are."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % n_heads:
            raise UserError(f"the visual blocks' width {width} must divide into {n_heads} heads")
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, int(width * mlp_ratio)), nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class VisualQuery(nn.Module):
    """LLaMA-Adapter V2's visual path: (B, T, in_dim) encoder tokens -> (B, K, dim), one addition
    per adaption prompt. Tokens are projected to `width` and LayerNorm-ed; K learnable queries go in
    front; `n_blocks` ViT blocks run over all; the K query outputs are projected to the LM's width and
    LayerNorm-ed (the release: width 768, 8 blocks of 16 heads, K 10, over CLIP ViT-L/14's 257 tokens)."""

    def __init__(self, in_dim: int, dim: int, n_queries: int, width: int = 768, n_blocks: int = 8, n_heads: int = 16):
        super().__init__()
        self.in_dim = in_dim
        self.clip_proj, self.clip_proj_norm = nn.Linear(in_dim, width), nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(n_queries, width))  # nn.Embedding's N(0, 1)
        self.blocks = nn.ModuleList(ViTBlock(width, n_heads) for _ in range(n_blocks))
        self.proj, self.proj_norm = nn.Linear(width, dim), nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise UserError(f"the visual queries read encoder tokens of shape (batch, tokens, {self.in_dim}), "
                            f"got {tuple(tokens.shape)}")
        x = self.clip_proj_norm(self.clip_proj(tokens.to(self.clip_proj.weight.dtype)))
        x = torch.cat([self.queries.expand(len(x), -1, -1).to(x.dtype), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.proj_norm(self.proj(x[:, :len(self.queries)]))


def checked_weights(weights: list[float] | None, n: int) -> list[float]:
    """`weights` for n inputs (ones when None), or a one-line error."""
    if not n:
        raise UserError("no inputs to combine")
    weights = weights or [1.0] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}")
    return weights


def combine(features: list[torch.Tensor], weights: list[float] | None = None, unit: bool = True) -> torch.Tensor:
    """Several inputs (two images, image + audio...) as one: the weighted average of the
    unit-normalized embeddings, normalized again. Each is (B, D). unit=False: the average of the
    embeddings as they are, weights scaled to sum to 1 (the official ImageBind-LLM release's mixing)."""
    weights = checked_weights(weights, len(features))
    if not unit:
        return sum(w / sum(weights) * f.float() for w, f in zip(weights, features))
    mixed = sum(w * F.normalize(f.float(), dim=-1) for w, f in zip(weights, features))
    return F.normalize(mixed, dim=-1)


class FeatureCache:
    """ImageBind-LLM's cache model: an input's embedding is pulled toward its k nearest neighbours
    (by cosine) in a bank of features, e.g. the embeddings of a training set, which helps when the
    input is far from what the bind network saw: the neighbours' mean, weighted by softmax(t x
    similarity), is mixed in at `weight`. faiss searches the bank where it is installed, else torch."""

    def __init__(self, bank: torch.Tensor, k: int = 10, temperature: float = 20.0, weight: float = 0.5):
        if bank.ndim != 2 or len(bank) == 0 or not torch.isfinite(bank).all():
            raise UserError(f"a feature bank must be a finite (N, dim) array with N >= 1, got {tuple(bank.shape)}")
        if not 0 <= weight <= 1 or k < 1:
            raise UserError(f"cache weight must be in [0, 1] and k at least 1, got {weight} and {k}")
        self.bank = F.normalize(bank.float(), dim=-1)
        self.k, self.temperature, self.weight = min(k, len(bank)), temperature, weight
        try:
            import faiss
            self.index = faiss.IndexFlatIP(self.bank.shape[1])
            self.index.add(self.bank.numpy())
        except ImportError:
            self.index = None

    @classmethod
    def from_file(cls, path, **options) -> "FeatureCache":
        """A bank from .npy (never unpickled) or .safetensors (its one tensor)."""
        import numpy as np
        from pathlib import Path
        path = Path(path)
        try:
            if path.suffix == ".npy":
                bank = torch.from_numpy(np.load(path, allow_pickle=False))
            elif path.suffix == ".safetensors":
                from safetensors.torch import load_file
                bank = next(iter(load_file(str(path)).values()))
            else:
                raise UserError(f"{path.name}: unknown feature-bank format; accepted: .npy or .safetensors of (N, dim)")
        except UserError:
            raise
        except Exception as e:  # numpy's and safetensors' many ways to say a file is damaged
            raise UserError(f"{path.name}: unreadable feature bank ({first_line(e)})") from None
        return cls(bank, **options)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim) unit queries -> similarities and indices of their k nearest, (B, k) each."""
        if self.index is not None:
            sims, idx = self.index.search(queries.float().contiguous().numpy(), self.k)
            return torch.from_numpy(sims), torch.from_numpy(idx)
        return (queries.float() @ self.bank.T).topk(self.k, dim=-1)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.bank.shape[1]:
            raise UserError(f"the feature bank is {self.bank.shape[1]}-d, the encoder's embeddings {features.shape[-1]}-d")
        sims, idx = self.search(F.normalize(features.float(), dim=-1))
        near = F.normalize(((sims * self.temperature).softmax(-1)[..., None] * self.bank[idx]).sum(1), dim=-1)
        return F.normalize((1 - self.weight) * features.float() + self.weight * near, dim=-1)


@contextlib.contextmanager
def conditioned(model: Transformer, condition: torch.Tensor | None):
    """Run `model` with `condition` added to its adapter's prompts: (B, dim) to every prompt of a
    layer (bind network), or (B, K, dim) one row per prompt (visual queries); cleared on exit. With
    early fusion (`fusion_layers` N) only the lowest N adapted layers take it; the others keep their
    prompts alone."""
    adapter = getattr(model, "adapter", None)
    if condition is not None and adapter is None:
        raise UserError("a multimodal input needs an adapter attached to the model")
    layers = sorted(int(i) for i in adapter.layers) if adapter is not None else []
    if adapter is not None and adapter.cfg.fusion_layers:
        layers = layers[:adapter.cfg.fusion_layers]
    prompts = [model.layers[i].attention.prompt for i in layers]
    for prompt in prompts:
        prompt.condition = condition
    try:
        yield model
    finally:
        for prompt in prompts:
            prompt.condition = None


@torch.no_grad()
def question_embedding(model: Transformer, tokenizer, questions: list[str]) -> torch.Tensor:
    """(B, dim): each question as the mean of the LM's own frozen token embeddings over its tokens,
    what a question-aware bind network reads beside the encoder's embedding (zeros if empty)."""
    table = model.tok_embeddings
    full = table.weight.full_tensor() if hasattr(table.weight, "full_tensor") else None  # FSDP shards it
    rows = []
    for question in questions:
        ids = torch.tensor(tokenizer.encode(question, bos=False), dtype=torch.long, device=table.weight.device)
        vectors = F.embedding(ids, full) if full is not None else table(ids)  # model parallel: its own gather
        rows.append(vectors.float().mean(0) if len(ids) else vectors.new_zeros(model.args.dim, dtype=torch.float32))
    return torch.stack(rows)


def questions_for(adapter, model: Transformer, tokenizer, questions: list[str]) -> torch.Tensor | None:
    """question_embedding rows where `adapter`'s bind network reads the question, else None."""
    bind = getattr(adapter, "bind", None)
    reads = bind is not None and bind.question_dim
    return question_embedding(model, tokenizer, questions) if reads else None


def embed_inputs(adapter, sources: list, kind: str | list[str] | None = None,
                 weights: list[float] | None = None, cache: FeatureCache | None = None,
                 questions: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt additions for inputs (files or arrays), through the encoder the adapter was trained
    with and its bind network: (B, dim), one row per input; with `weights`, all the inputs mixed
    into one row (combine) first, e.g. two images at 0.7 and 0.3. A visual-query adapter reads the
    encoder's tokens and gives (B, K, dim); its `weights` average the inputs' additions. `kind`: of every input, or a
    list with one kind per input (an image and a clip, with an encoder that reads both: imagebind).
    `cache`: the embeddings go through the cache model before the bind network. `questions`: (B, dim)
    or (1, dim) question_embedding rows, which a question-aware bind network reads too."""
    from core.encoders import get_encoder
    name = adapter.cfg.encoder if adapter is not None else None
    if not name:
        raise UserError("this adapter has no bind network (it was trained on text only); "
                        "accepted: an adapter trained on image, audio or points records")
    kinds = list(kind) if isinstance(kind, (list, tuple)) else [kind] * len(sources)
    encoder = get_encoder(name, kinds)  # refuses a kind it cannot read
    loaded = [encoder.load(s, k) for s, k in zip(sources, kinds)]
    if adapter.visual is not None:
        if cache is not None:
            raise UserError("the cache model works on pooled embeddings; this adapter reads the encoder's tokens")
        rows = adapter.media_condition(encoder.tokens(loaded))
        if weights is not None:
            weights = checked_weights(weights, len(rows))
            rows = sum(w / sum(weights) * r for w, r in zip(weights, rows.float()))[None].to(rows.dtype)
        return rows
    features = encoder.embed(loaded)
    if weights is not None:
        features = combine(list(features.split(1)), weights, unit=adapter.bind.style == "studio")
    if cache is not None:
        features = cache(features)
    if adapter.bind.question_dim:
        if questions is None:
            raise UserError("this adapter's bind network reads the question too: ask one with the input")
        features = torch.cat([features.float(), questions.float().to(features.device).expand(len(features), -1)], -1)
    return adapter.media_condition(features)
