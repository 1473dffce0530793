"""The paper's claims reproduced at small scale on the embedded model; each module is a script
that trains, evaluates on a skill task's held-out split and writes a markdown table and a PNG:

    python -m train.claims.zero_init    # zero-initialized vs randomly initialized gates
    python -m train.claims.layers       # number of adapted layers vs held-out accuracy
    python -m train.claims.vs_lora      # this adapter vs LoRA (peft) vs no tuning

Shared here: one training run plus its evaluation, and the table/plot writers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from core.loading import LoadedModel
from train.evaluate import accuracy, validation_loss
from train.finetune import parse_args, run
from train.tasks import task_records

OUT = Path("artifacts/claims")
TASK = "unit_conversion"   # hard enough for a 135M model that results spread out
STEPS, BATCH, LR, TEST = 40, 8, 1e-2, 100


def train_and_evaluate(lm: LoadedModel, name: str, *flags: str) -> dict:
    """Fine-tune an adapter on TASK with `flags`, then score it on the held-out split."""
    out = OUT / "runs" / name
    args = parse_args(["--data", f"task:{TASK}", "--out", str(out), "--max-steps", str(STEPS),
                       "--batch-size", str(BATCH), "--lr", str(LR), "--warmup-epochs", "0.01",
                       "--precision", "fp32", *flags])  # as the LoRA side (train.peers) computes
    for stale in ("metrics.jsonl", "train.log"):
        (out / stale).unlink(missing_ok=True)
    started = time.time()
    adapter = run(args, lm)
    wall = time.time() - started
    held_out = task_records(TASK, "test", TEST)
    try:
        acc, _ = accuracy(lm, held_out, "alpaca")
        loss = validation_loss(lm, held_out, "alpaca")
    finally:
        adapter.detach()
    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    file = out / "adapter.safetensors"
    return {"name": name, "accuracy": acc, "val_loss": loss, "curve": curve, "wall_s": wall,
            "trainable": sum(p.numel() for p in adapter.parameters()), "file_bytes": file.stat().st_size}


def untuned(lm: LoadedModel) -> dict:
    held_out = task_records(TASK, "test", TEST)
    # the untuned model gets its own chat format: its best shot
    return {"name": "no tuning", "accuracy": accuracy(lm, held_out, lm.chat_format)[0],
            "val_loss": validation_loss(lm, held_out, lm.chat_format), "trainable": 0, "file_bytes": 0,
            "wall_s": 0.0, "curve": []}


def write_table(name: str, title: str, headers: list[str], rows: list[list], note: str = "") -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [f"### {title}", "", f"Task `{TASK}`, {STEPS} steps x batch {BATCH}, lr {LR}, "
             f"held-out exact match on {TEST} test records (`python -m train.claims.{name}`).", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if note:
        lines += ["", note]
    path = OUT / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def plot_curves(name: str, title: str, results: list[dict], bars: str | None = None) -> Path:
    """Training-loss curves (left) and held-out accuracy bars (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if r["curve"]:
            left.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["name"])
    left.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    left.legend()
    right.bar([r["name"] for r in results], [100 * r["accuracy"] for r in results], color="tab:blue")
    right.set(ylabel="held-out exact match (%)", title=bars or "accuracy", ylim=(0, 100))
    right.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=110)
    return path
