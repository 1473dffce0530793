"""The easy-VQA dataset (PyPI `easy-vqa`, MIT) as multimodal instruction records.

    python -m train.easyvqa [--out data/easy-vqa] [--examples assets/examples/image]

64 x 64 images of one shape (circle, rectangle, triangle) in one of eight colours, with
questions about its shape and colour and yes/no questions: 38,575 train / 9,673 test
questions about 4,000 / 1,000 images, 13 answers. The package's own split is kept; val.jsonl
is the first 200 test questions, for the validation loss while training. Image paths point into
the installed package, so nothing is copied.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from core.errors import UserError
from train.data import write_split


def package_data() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise UserError("the easy-VQA data needs `pip install easy-vqa==1.0`")
    return Path(spec.submodule_search_locations[0]) / "data"


def records(split: str) -> list[dict]:
    """{"image": absolute path, "instruction": question, "output": answer} for every question."""
    data = package_data() / split
    questions = json.loads((data / "questions.json").read_text())
    return [{"image": str(data / "images" / f"{image_id}.png"), "instruction": q[0].upper() + q[1:], "output": answer}
            for q, answer, image_id in questions]


def write_dataset(out: str | Path = "data/easy-vqa") -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        write_split(out, split, records(split))


def write_examples(out: str | Path, n: int = 3) -> None:
    """A few test images for the app, named after what they show."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown: dict[str, str] = {}  # image -> "<colour>-<shape>", from "What color is the circle?" -> "red"
    for r in records("test"):
        shape = r["instruction"].lower().rstrip("?").split()[-1]
        if r["instruction"].lower().startswith(("what color is the", "what is the color of the")) and shape != "shape":
            shown.setdefault(r["image"], f"{r['output']}-{shape}")
    done = set()
    for image, name in shown.items():
        shape = name.partition("-")[2]
        if shape and shape not in done:
            shutil.copyfile(image, out / f"{name}.png")
            done.add(shape)
        if len(done) == n:
            break


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m train.easyvqa", description="write the easy-VQA records")
    ap.add_argument("--out", default="data/easy-vqa")
    ap.add_argument("--examples", help="instead: copy a few test images for the app into this folder")
    a = ap.parse_args()
    if a.examples:
        write_examples(a.examples)
    else:
        write_dataset(a.out)
