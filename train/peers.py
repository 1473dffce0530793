"""The peers we measure against, on the same weights and data: transformers' LlamaForCausalLM
holding our model's weights, and a training loop for peft models (LoRA, AdaptionPrompt) that
follows train.finetune step for step (same batches, optimizer, schedule and clipping).
transformers and peft are dev/bench dependencies (requirements-dev.txt), imported here only."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from core.loading import LoadedModel, build_model, hf_to_core_name
from train.data import Example, collate, length_grouped_batches
from train.finetune import lr_at, paper_optimizer


def hf_twin(model):
    """transformers' LlamaForCausalLM with our model's weights (names mapped by core.loading)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = model.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                      max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings,
                      rope_scaling=a.rope_scaling)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    ours = model.state_dict()
    # contiguous row-major copies, as transformers' own loader would give them (ours may be laid
    # out for CPU decoding: core.model.cpu_decode_layout)
    state = {k: ours[hf_to_core_name(k)].contiguous().clone() for k in hf.state_dict()
             if hf_to_core_name(k) in ours}
    hf.load_state_dict(state, strict=False, assign=True)
    if a.tie_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb.inv_freq = model.inv_freq.clone()
    return hf.eval().requires_grad_(False)


def ours_from_hf(hf, lm: LoadedModel) -> LoadedModel:
    """Our model holding an HF model's (e.g. LoRA-merged) weights, to score it with our code."""
    state = {hf_to_core_name(k): v.detach().clone() for k, v in hf.state_dict().items()
             if hf_to_core_name(k) is not None}
    model = build_model(lm.model.args, state, torch.float32, "cpu")
    return LoadedModel(model, lm.tokenizer, lm.chat_format, lm.system_prompt, lm.name + "+merged")


def train_peft(model, examples: list[Example], steps: int, batch_size: int, lr: float, seed: int = 0,
               warmup: int = 0, weight_decay: float = 0.02, clip: float = 1.0) -> dict:
    """Train a peft model's trainable parameters as train.finetune would train an adapter (one
    process, no accumulation). Returns the loss curve, wall time and tokens/s."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = paper_optimizer(params, lr, weight_decay)
    lengths = [len(e.tokens) for e in examples]
    per_epoch = len(length_grouped_batches(lengths, batch_size, seed, 0))
    model.train()
    curve, tokens, started = [], 0, time.time()
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        batch = [examples[i] for i in length_grouped_batches(lengths, batch_size, seed, epoch)[index]]
        inputs, targets = collate(batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, 0.0, warmup, steps)
        logits = model(input_ids=inputs).logits
        select = targets != -100
        loss = F.cross_entropy(logits[select].float(), targets[select])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
        tokens += sum(len(e.tokens) for e in batch)
    wall = time.time() - started
    return {"curve": curve, "wall_s": wall, "tokens_per_s": tokens / wall}
