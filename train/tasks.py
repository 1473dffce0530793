"""Skill tasks with checkable answers, generated procedurally (no dataset hub is reachable here).

Each task makes Alpaca-style records {"instruction", "input", "output"} whose output is the one
exact answer. A record goes to the test split when a hash of its prompt says so, so the splits
are deterministic and disjoint whatever their sizes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import random

from core.errors import UserError

WORDS = """apple river garden planet window silver orange pencil market castle bridge forest
rocket candle dragon pirate summer winter basket yellow guitar jacket kitten lemon mirror
napkin ocean pepper rabbit saddle tomato violin wallet anchor button carpet dinner engine
feather harbor island jungle ladder meadow needle parrot puzzle quiet ribbon shadow ticket
velvet wizard zipper beacon cactus dollar falcon goblin helmet insect jigsaw kettle lizard
magnet nickel oyster poodle quartz radish salmon tunnel unicorn walnut yogurt bamboo cobalt
dentist eclipse fossil glacier hammock iceberg lantern mammoth nectar orchid pelican quiver
sandal thunder umpire vacuum whistle""".split()
NAMES = "Alice Bruno Chen Dara Emil Fatima Goran Hana Ivan Julia Kofi Lena Mateo Nadia Omar Priya".split()
CITIES = "Paris Lagos Lima Oslo Tokyo Cairo Quito Delhi Perth Seoul Rome Dakar Hanoi Bern".split()
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("L", "mL", 1000), ("days", "hours", 24), ("cm", "mm", 10)]


def arithmetic(rng: random.Random):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-*")
    if op == "*":
        b = rng.randint(2, 9)
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}? Answer with the number only.", "", str(answer)


def unit_conversion(rng: random.Random):
    src, dst, factor = rng.choice(UNITS)
    value = rng.randint(1, 300) if rng.random() < 0.7 else rng.randint(1, 99) + rng.choice((0.5, 0.25))
    answer = value * factor
    value_text = f"{value:g}"
    return f"Convert {value_text} {src} to {dst}. Answer with the number only.", "", f"{answer:g}"


def string_edit(rng: random.Random):
    word = rng.choice(WORDS)
    kind = rng.choice(["reverse", "upper", "vowels", "first_last", "sort", "length"])
    if kind == "sort":
        return "Write the letters of the word in alphabetical order.", word, "".join(sorted(word))
    if kind == "length":
        return "How many letters does the word have? Answer with the number only.", word, str(len(word))
    if kind == "reverse":
        return "Reverse the letters of the word.", word, word[::-1]
    if kind == "upper":
        return "Write the word in capital letters.", word, word.upper()
    if kind == "vowels":
        return "Remove every vowel from the word.", word, "".join(c for c in word if c not in "aeiou")
    return "Swap the first and last letters of the word.", word, word[-1] + word[1:-1] + word[0]


def date_arithmetic(rng: random.Random):
    start = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 2000))
    days = rng.randint(1, 60)
    if rng.random() < 0.5:
        return (f"What is the date {days} days after {start.isoformat()}? Answer as YYYY-MM-DD.", "",
                (start + datetime.timedelta(days=days)).isoformat())
    return (f"What is the date {days} days before {start.isoformat()}? Answer as YYYY-MM-DD.", "",
            (start - datetime.timedelta(days=days)).isoformat())


def json_format(rng: random.Random):
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    fields = [("name", name), ("age", age), ("city", city)]
    rng.shuffle(fields)
    text = "; ".join(f"{k.capitalize()}: {v}" for k, v in fields)
    keys = sorted(k for k, _ in fields)
    return (f"Format the record as one line of JSON with the keys {', '.join(keys)}.", text,
            json.dumps({k: dict(fields)[k] for k in keys}))


TASKS = {"arithmetic": arithmetic, "unit_conversion": unit_conversion, "string_edit": string_edit,
         "date_arithmetic": date_arithmetic, "json_format": json_format}
SIZES = {"train": 2000, "test": 200}


def _in_test_split(record: dict) -> bool:
    key = (record["instruction"] + "\n" + record["input"]).encode()
    return hashlib.sha256(key).digest()[0] < 26  # about 10% of distinct prompts


def task_records(task: str, split: str, n: int | None = None) -> list[dict]:
    """The first n distinct records of a task's split (deterministic)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    if split not in SIZES:
        raise UserError(f"unknown split {split!r}; accepted: train, test")
    n = n or SIZES[split]
    rng, seen, out = random.Random(f"{task}-v1"), set(), []
    for _ in range(200 * n):
        instruction, input_, output = TASKS[task](rng)
        record = {"instruction": instruction, "input": input_, "output": output}
        key = (instruction, input_)
        if key in seen:
            continue
        seen.add(key)
        if _in_test_split(record) == (split == "test"):
            out.append(record)
            if len(out) == n:
                return out
    return out  # the task has fewer distinct prompts than asked for


def answer_of(text: str) -> str:
    """The answer in a generated response: its first non-empty line, without a trailing period."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].rstrip(".").strip() if lines else ""
