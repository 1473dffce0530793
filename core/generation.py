"""Generation: greedy or sampled (temperature, top-k, top-p, repetition penalty, a repetition
guard), stop tokens and stop strings, batches of unequal-length prompts, and a streaming iterator
of text deltas."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from core.errors import UserError
from core.model import Transformer
from core.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ngram_guard: int = 0          # n >= 2: no n-gram of a reply occurs a third time (0: off)
    ignore_eos: bool = False      # run to max_new_tokens whatever the model says (benchmarks: equal work)

    def validate(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise UserError("top_k must be >= 0 and repetition_penalty > 0")
        if self.ngram_guard < 0 or self.ngram_guard == 1:
            raise UserError(f"ngram_guard must be 0 (off) or at least 2, got {self.ngram_guard}")


class RepeatGuard:
    """The repetition guard of one reply: the tokens that would make one of its n-grams occur a
    third time are banned (a loop is cut at its third turn; a phrase may come back once). Kept as
    a table from each (n-1)-gram to the tokens that followed it, so a step costs O(1)."""

    def __init__(self, n: int):
        self.n, self.ids = n, []
        self.followers: dict[tuple, dict[int, int]] = {}

    def push(self, token: int):
        self.ids.append(token)
        if len(self.ids) >= self.n:
            after = self.followers.setdefault(tuple(self.ids[-self.n:-1]), {})
            after[token] = after.get(token, 0) + 1

    def banned(self) -> list[int]:
        if len(self.ids) < self.n - 1:
            return []
        after = self.followers.get(tuple(self.ids[len(self.ids) - self.n + 1:]), {})
        return [t for t, count in after.items() if count >= 2]


def guarded(logits: torch.Tensor, guards: list[RepeatGuard | None]) -> torch.Tensor:
    """logits (B, V) with each row's banned tokens at -inf (a copy only when something is banned)."""
    bans = [(i, g.banned()) for i, g in enumerate(guards) if g is not None]
    if not any(b for _, b in bans):
        return logits
    logits = logits.clone()
    for i, banned in bans:
        if banned:
            logits[i, banned] = float("-inf")
    return logits


# The model's card gives these for the embedded SmolLM2-135M-Instruct; other checkpoints give
# theirs in generation_config.json (core.loading reads it), else GENERIC applies.
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
GENERIC_SAMPLING = {"temperature": 0.7, "top_p": 0.9}
# ours, for every model: the CTRL penalty mild enough to keep names from the question, and the guard
REPETITION_GUARD = {"repetition_penalty": 1.1, "ngram_guard": 6}


def model_sampling(lm, **asked) -> SamplingParams:
    """SamplingParams from the model's defaults and the repetition guard, with what the caller
    `asked` (None values left to the defaults). Greedy is one setting away: temperature=0."""
    defaults = {**REPETITION_GUARD, **(getattr(lm, "sampling", None) or GENERIC_SAMPLING)}
    given = {k: v for k, v in asked.items() if v is not None}
    return SamplingParams(**{**defaults, **given})


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 -> next ids (B,). `seen` (B, S) ids for the repetition penalty (-1: none)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        # CTRL's penalty: make every token already in the context less likely
        idx = seen.clamp(min=0)
        picked = logits.gather(1, idx)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits = logits.scatter(1, idx, torch.where(seen >= 0, picked, logits.gather(1, idx)))
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # the nucleus (the smallest set of most likely tokens reaching top_p) is a prefix of the sorted
        # order: when the top k reach top_p it lies among them, so a small top-k replaces sorting all
        # V logits (6 ms a row at V=49,152 here), grown until it covers top_p
        probs = logits.softmax(-1)
        k = 64
        while True:
            top, order = probs.topk(min(k, probs.shape[-1]), dim=-1)
            cum = top.cumsum(-1)
            if k >= probs.shape[-1] or bool((cum[:, -1] >= params.top_p).all()):
                break
            k *= 4
        top = torch.where(cum - top < params.top_p, top, torch.zeros_like(top))  # keep up to reaching top_p
        return order.gather(1, torch.multinomial(top, 1, generator=generator)).squeeze(1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_tokens(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                    stop_ids: set[int]) -> Iterator[list[int | None]]:
    """Yield, each step, the next id of every sequence (None once a sequence has stopped).
    Prompts of unequal length are left-padded; a key mask keeps the pads out of attention."""
    params.validate()
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: give at least one token of text")
    B, longest = len(prompts), max(len(p) for p in prompts)
    ctx = model.args.max_seq_len
    if longest >= ctx:
        raise UserError(f"prompt is {longest} tokens; this model's context is {ctx}")
    total = min(ctx, longest + params.max_new_tokens)
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(B, longest, dtype=torch.long, device=device)
    key_mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
        key_mask[i, longest - len(p):] = True
    key_mask[:, longest:] = True
    padded = any(len(p) != longest for p in prompts)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = torch.where(key_mask[:, :longest], tokens, -1) if params.repetition_penalty != 1.0 else None
    guards = [RepeatGuard(params.ngram_guard) if params.ngram_guard else None for _ in range(B)]
    done = [False] * B
    model.setup_cache(B, total)
    step = model.decode_step or model
    try:
        logits = model(tokens, 0, key_mask[:, :longest] if padded else None, last_only=True)
        for pos in range(longest, total):
            nxt = sample(guarded(logits[:, -1], guards), params, seen, generator)
            out = []
            for i, t in enumerate(nxt.tolist()):
                if done[i] or t in stop_ids:
                    done[i] = True
                    out.append(None)
                else:
                    out.append(t)
                    if guards[i] is not None:
                        guards[i].push(t)
            yield out
            if all(done) or pos + 1 == total:
                return
            if seen is not None:
                seen = torch.cat([seen, nxt[:, None]], 1)
            logits = step(nxt[:, None], pos, key_mask[:, :pos + 1] if padded else None)
    finally:
        model.clear_cache()


class TextStream:
    """Token ids in, text deltas out. Holds back bytes of an unfinished UTF-8 character and text
    that may be the start of a stop string; decodes the whole output so SentencePiece's leading
    spaces come out right."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        return text

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if not self.stopped:
            if text.endswith("\ufffd"):  # an unfinished multi-byte character
                return ""
            # hold back a tail that could still grow into a stop string
            hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[:len(text) - hold]
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta

    def finish(self) -> str:
        text = self.text()
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


class Generator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, stop_ids: set[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = stop_ids if stop_ids is not None else ({tokenizer.eos_id} - {None})

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
        """Text deltas of one completion, as they are generated."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        text = TextStream(self.tokenizer, params.stop)
        self.last_token_count = 0
        for step in generate_tokens(self.model, [ids], params, self.stop_ids):
            if step[0] is None:
                break
            self.last_token_count += 1
            delta = text.push(step[0])
            if delta:
                yield delta
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail

    def generate(self, prompts: list[str | list[int]], params: SamplingParams) -> list[str]:
        """Completions of a batch of prompts (of any lengths), decoded once at the end."""
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        outs: list[list[int]] = [[] for _ in ids]
        live = [True] * len(ids)
        for step in generate_tokens(self.model, ids, params, self.stop_ids):
            for i, t in enumerate(step):
                live[i] = live[i] and t is not None
                if live[i]:
                    outs[i].append(t)
        results = []
        for o in outs:
            text = self.tokenizer.decode(o)
            for s in params.stop:
                if s and s in text:
                    text = text[:text.find(s)]
            results.append(text)
        return results
