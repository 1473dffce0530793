"""The training loss: cross-entropy at response positions, with the output head fused in.

A 49k-word head over a batch of 1024 positions makes 200 MB of fp32 logits, and autograd keeps
them, their log-softmax and a zero-filled gradient of the same size. Since the head is frozen,
its only gradient is the one for the hidden states, which can be computed chunk by chunk during
the forward: (softmax - onehot) @ W. Nothing vocabulary-wide outlives a chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.multimodal import conditioned
from train.data import Example, batch_features, collate, rank_share

CHUNK = 256  # positions per chunk: 256 x 49152 fp32 logits = 48 MB


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, weight frozen."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], CHUNK):
            h, t = hidden[start:start + CHUNK], targets[start:start + CHUNK]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device), t] -= 1
            grad[start:start + CHUNK] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def response_loss(model, inputs: torch.Tensor, targets: torch.Tensor,
                  features: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the response tokens, their number); targets are -100 elsewhere.
    `features`: (B, D) encoder embeddings (or (B, T, C) tokens) that the adapter's bind network (or
    visual queries) adds to its prompts."""
    if features is not None:
        with conditioned(model, model.adapter.media_condition(features)):
            return response_loss(model, inputs, targets)
    select = targets != -100
    head = getattr(model.output, "weight", None)  # a quantized head has none: it runs its own kernel below
    if torch.is_grad_enabled() and head is not None and not head.requires_grad and type(head) is torch.nn.Parameter:
        hidden = model(inputs, select=select, return_hidden=True)
        return FrozenHeadCrossEntropy.apply(hidden, head, targets[select]), int(select.sum())
    # no gradient wanted, a trainable, quantized or sharded head (FSDP gathers it only inside forward)
    logits = model(inputs, select=select)
    return F.cross_entropy(logits.float(), targets[select], reduction="sum"), int(select.sum())


@torch.no_grad()
def summed_loss(model, examples: list[Example], batch_size: int, device, rank: int = 0,
                world: int = 1) -> torch.Tensor:
    """[summed loss, number of targets] over this rank's share of `examples` (all of them in one
    process); ranks add theirs up."""
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(examples), world * batch_size):
        weight, part = rank_share(examples, i + rank * batch_size, batch_size)
        inputs, targets = collate(part)
        loss, count = response_loss(model, inputs.to(device), targets.to(device), batch_features(part))
        total += weight * torch.tensor([loss.item(), count], dtype=torch.float64)
    return total
