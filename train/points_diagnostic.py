"""Is it the point encoder or the adapter that misses "What color is the cube?" in a scene of
several objects? Train and evaluate the points adapter with its bind network handed the ground
truth instead of the point embedding: the scene's count, shapes, colours and shape-colour pairs
(train.point_encoder.targets), and with --question also the question, one-hot (its kind and the
shape or colour it names). Prints exact match by kind of question and number of objects.

    python -m train.points_diagnostic --out runs/diag [--question] [--prompt-bind-scales]
        [--scenes 4000] [--test 400] [--steps 300] [--batch-size 16] [--lr 2e-3]

The records are train.pointclouds' own questions (the same as `--out data/points` writes), each
with a small .npy of the numbers the bind network gets in place of the cloud.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from core.encoders import Encoder, register
from train.pointclouds import COLORS, SHAPES, scene, scene_questions
from train.point_encoder import targets

KINDS = ("How many", "What color", "What shape", "Is there")
SUBJECTS = (*SHAPES, *COLORS, "object", "none")  # what a question names


def question_kind(question: str) -> str:
    return next(k for k in KINDS if question.startswith(k))


def question_one_hot(question: str) -> np.ndarray:
    kind = question_kind(question)
    named = re.search(r"(?:the|is|a) (\w+)\?$", question)
    subject = named.group(1) if named and named.group(1) in SUBJECTS else "none"
    out = np.zeros(len(KINDS) + len(SUBJECTS), np.float32)
    out[KINDS.index(kind)] = out[len(KINDS) + SUBJECTS.index(subject)] = 1
    return out


def write_records(out: Path, split: str, n_scenes: int, with_question: bool, limit: int | None = None) -> Path:
    """out/SPLIT.jsonl: scene i's questions (as train.pointclouds writes them), each pointing to
    out/SPLIT/N.npy, the 1-D vector of ground truth the bind network gets."""
    (out / split).mkdir(parents=True, exist_ok=True)
    asked = []  # (the scene's objects, (question, answer))
    for i in range(n_scenes):
        objects = scene(split, i)[1]
        asked += [(objects, qa) for qa in scene_questions(split, i, objects)]
        if limit and len(asked) >= limit:
            break
    asked = asked[:limit]
    rows = []
    for n, (objects, (question, answer)) in enumerate(asked):
        vector = targets(objects)
        if with_question:
            vector = np.concatenate([vector, question_one_hot(question)])
        np.save(out / f"{split}/{n:06d}.npy", vector)
        rows.append({"points": f"{split}/{n:06d}.npy", "instruction": question, "output": answer,
                     "objects": len(objects)})
    path = out / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@register("scene-truth")
class SceneTruth(Encoder):
    """A 1-D .npy of numbers, passed through as the embedding (this diagnostic's stand-in encoder)."""
    name, modality, dim = "scene-truth", "points", 0

    def load(self, source, kind=None):
        return torch.from_numpy(np.load(source, allow_pickle=False)).float()

    def embed(self, inputs):
        return torch.stack(inputs)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.points_diagnostic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--question", action="store_true", help="also give the bind network the question, one-hot")
    p.add_argument("--prompt-bind-scales", action="store_true")
    p.add_argument("--scenes", type=int, default=4000, help="training scenes (4 questions each)")
    p.add_argument("--test", type=int, default=400, help="the first N test questions")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device")
    args = p.parse_args(argv)
    from train import finetune
    from train.evaluate import accuracy
    from core.adapter import load_adapter
    from core.loading import load_model
    from train.data import load_records
    out = Path(args.out)
    train = write_records(out / "data", "train", args.scenes, args.question)
    test = write_records(out / "data", "test", args.test, args.question, limit=args.test)
    finetune.main(["--model", "smollm2", "--data", str(train), "--out", str(out), "--encoder", "scene-truth",
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--epochs", "1",
                   "--max-steps", str(args.steps), "--warmup-epochs", "0.03", "--save-every", "0",
                   "--eval-every", "0", "--seed", "0"] + ["--prompt-bind-scales"] * args.prompt_bind_scales
                  + (["--device", args.device] if args.device else []))
    lm = load_model("smollm2", None, args.device)
    load_adapter(out / "adapter.safetensors", lm.model)
    records = load_records(str(test))
    acc, pairs = accuracy(lm, records, "alpaca", 64, 6)
    table: dict[tuple[str, int], list[bool]] = {}
    for r, (answer, expected) in zip(records, pairs):
        table.setdefault((question_kind(r["instruction"]), r["objects"]), []).append(answer == expected)
    print(f"\nground truth{' + question' if args.question else ''}, {args.steps} steps of batch {args.batch_size} "
          f"on {args.scenes} scenes: exact match {acc:.1%} on the first {len(records)} test questions\n")
    print("| question | 1 object | 2 objects | 3 objects |\n|---|---|---|---|")
    for kind in KINDS:
        cells = [f"{sum(h) / len(h):.0%} ({len(h)})" if (h := table.get((kind, n))) else "-" for n in (1, 2, 3)]
        print(f"| {kind} ... | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    main()
