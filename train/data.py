"""Instruction data for adapter fine-tuning: reading and validating files, tokenizing with a loss
mask on response tokens, and batches grouped by length.

Accepted records (a JSON array or JSON lines):
  Alpaca style  {"instruction": str, "input": str (optional), "output": str}
  chat          {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Alpaca records get the paper's template, chat records the model's own chat format.
Multimodal records (ImageBind-LLM) add one of "image", "audio" or "points": a file path, relative
to the data file's folder; a dataset uses one kind of input in every record, or none.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from core.chat_format import alpaca_prompt, assistant_turn, render
from core.encoders import KINDS
from core.errors import UserError
from core.tokenizer import Tokenizer

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
ACCEPTED = ("accepted: Alpaca records with 'instruction' and 'output' strings (and optional 'input'), "
            "or chat records with 'messages', a list of {role: system|user|assistant, content}")
ROLES = ("system", "user", "assistant")


def shipped_datasets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATASETS_DIR.glob("*.json*"))}


def load_records(source: str) -> list[dict]:
    """Records from a file, a dataset shipped in train/datasets (by name), or a skill task's
    training split ("task:arithmetic"). Every record is validated; the first bad one raises a
    UserError naming its line and field, before anything else happens."""
    if source.startswith("task:"):
        from train.tasks import task_records
        return task_records(source[5:], "train")
    path = Path(source)
    if not path.exists() and source in shipped_datasets():
        path = shipped_datasets()[source]
    if not path.is_file():
        names = ", ".join(shipped_datasets())
        raise UserError(f"{source}: no such data file; accepted: a .json/.jsonl file, a shipped dataset "
                        f"({names}) or task:NAME")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}); accepted: JSON or JSON lines") from None
    items = _json_array(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)
    if not items:
        raise UserError(f"{path}: no records; {ACCEPTED}")
    kinds = set()
    for line, record in items:
        problem = record_problem(record)
        if problem:
            raise UserError(f"{path}:{line}: {problem}; {ACCEPTED}")
        media = media_of(record)
        kind = media[0] if media else None
        kinds.add(kind)
        if None in kinds and len(kinds) > 1:  # kinds of media may mix, given an encoder that reads them all
            raise UserError(f"{path}:{line}: records mix text-only and {', '.join(sorted(k for k in kinds if k))} "
                            "records; accepted: an input (image, audio or points) in every record, or in none")
        if kind:
            file = path.parent / record[kind]
            if not file.is_file():
                raise UserError(f"{path}:{line}: field '{kind}' names {record[kind]}, which does not exist")
            record[kind] = str(file.resolve())
    return [r for _, r in items]


def write_split(out: Path, split: str, rows: list[dict], what: str = "") -> None:
    """out/<split>.jsonl, written atomically; for the test split also out/val.jsonl, its first 200
    records, which the generated datasets use for the validation loss while training."""
    from core.files import atomic_path
    for name, chunk in [(split, rows)] + ([("val", rows[:200])] if split == "test" else []):
        with atomic_path(out / f"{name}.jsonl") as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in chunk))
    print(f"{out / split}.jsonl: {len(rows)} questions{what}")


def write_generated(out: str | Path, counts: dict[str, int], item, what: str) -> None:
    """A generated dataset: for each split, item(out, split, i) writes input i's file under
    out/<split>/ and returns its records (paths relative to `out`); then write_split."""
    out = Path(out)
    for split, n in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        rows = [row for i in range(n) for row in item(out, split, i)]
        write_split(out, split, rows, f" about {n} {what}")


def generator_cli(module: str, what: str, out: str, splits: dict, write_dataset, write_examples) -> None:
    """The command line of a generated multimodal dataset: `--out DIR --train N --test N`, or
    `--examples DIR` for the app's example inputs."""
    import argparse
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=f"write the {what} QA dataset")
    ap.add_argument("--out", default=out)
    ap.add_argument("--train", type=int, default=splits["train"])
    ap.add_argument("--test", type=int, default=splits["test"])
    ap.add_argument("--examples", help="instead: write a few examples for the app into this folder")
    a = ap.parse_args()
    if a.examples:
        write_examples(a.examples)
    else:
        write_dataset(a.out, a.train, a.test)


def _json_lines(text: str, path: Path) -> list[tuple[int, object]]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                                "accepted: one JSON object per line, or a JSON array") from None
    return items


def _json_array(text: str, path: Path) -> list[tuple[int, object]]:
    """The array's elements with the line each starts on, so errors can point at it."""
    decoder, items = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        items.append((text.count("\n", 0, i) + 1, obj))
        i = end
    if i >= len(text):
        raise UserError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON (the array is not closed)")
    return items


def record_problem(record) -> str | None:
    """What is wrong with one record, or None."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, not {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "field 'messages' must be a non-empty list"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                return f"field 'messages[{j}].role' must be one of {', '.join(ROLES)}"
            if not isinstance(m.get("content"), str):
                return f"field 'messages[{j}].content' must be a string"
        if not any(m["role"] == "assistant" for m in msgs):
            return "field 'messages' has no assistant message to learn from"
        turns = [m["role"] for m in msgs if m["role"] != "system"]
        if any(r != ("user", "assistant")[k % 2] for k, r in enumerate(turns)):
            return "field 'messages' must alternate user and assistant, starting with user"
        return None
    for field in ("instruction", "output"):
        if field not in record:
            return f"field '{field}' is missing"
        if not isinstance(record[field], str) or not record[field].strip():
            return f"field '{field}' must be a non-empty string"
    if not isinstance(record.get("input", ""), str):
        return "field 'input' must be a string"
    media = [m for m in KINDS if m in record]
    if len(media) > 1:
        return f"fields {', '.join(media)}: one input per record"
    if media and (not isinstance(record[media[0]], str) or not record[media[0]].strip()):
        return f"field '{media[0]}' must be a file path"
    return None


def media_of(record: dict) -> tuple[str, str] | None:
    """(kind, path) of a multimodal record's input, or None for a text record."""
    kind = next((k for k in KINDS if k in record), None)
    return (kind, record[kind]) if kind else None


def question_of(record: dict) -> str:
    """What a record asks about its input: the instruction (and its input), or the last user message."""
    if "messages" in record:
        return next((m["content"] for m in reversed(record["messages"]) if m["role"] == "user"), "")
    return "\n\n".join(t for t in (record["instruction"], record.get("input", "")) if t)  # as the chat turn


@dataclass
class Example:
    tokens: list[int]
    loss_mask: list[bool]  # True where the token is part of a response (a training target)
    media: tuple[str, str] | None = None  # (kind, path) of a multimodal record's input
    features: torch.Tensor | None = None  # its encoder embedding, computed once (embed_media), then
                                          # for a question-aware bind network its question's (add_questions)
    question: str = ""  # question_of(record)


def tokenize_record(record: dict, tokenizer: Tokenizer, chat_format: str, system: str | None = None,
                    max_seq_len: int | None = None) -> Example:
    """Prompt segments are masked out; each response (with its end-of-turn marker, or EOS where
    the format has none) is a target. Segments are tokenized one by one, as generation sees them."""
    if "messages" in record:
        segments, done = [], ""
        msgs = record["messages"]
        for a, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = render(chat_format, msgs[:a], system)
            assert prompt.startswith(done), "the chat format must render turns incrementally"
            segments += [(prompt[len(done):], False), (assistant_turn(chat_format, m["content"]), True)]
            done = prompt + segments[-1][0]
        fmt = chat_format
    else:
        segments = [(alpaca_prompt(record["instruction"], record.get("input", "")), False),
                    (assistant_turn("alpaca", record["output"]), True)]
        fmt = "alpaca"
    tokens, mask = [], []
    for k, (text, is_target) in enumerate(segments):
        ids = tokenizer.encode(text, bos=None if k == 0 else False)
        tokens += ids
        mask += [is_target] * len(ids)
    if fmt == "alpaca" and tokenizer.eos_id is not None:
        tokens.append(tokenizer.eos_id)
        mask.append(True)
    if max_seq_len:
        tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
    return Example(tokens, mask, media_of(record), question=question_of(record))


def tokenize_records(records, tokenizer, chat_format, system=None, max_seq_len=None) -> list[Example]:
    """All records that keep at least one target token after truncation."""
    examples = [tokenize_record(r, tokenizer, chat_format, system, max_seq_len) for r in records]
    kept = [e for e in examples if any(e.loss_mask[1:])]
    if not kept:
        raise UserError(f"no record keeps a response token within --max-seq-len {max_seq_len}; raise it")
    return kept


def embed_media(examples: list[Example], encoder_name: str | None = None, tokens: bool = False) -> str | None:
    """Give every multimodal example its encoder embedding (`tokens`: its (T, C) token features,
    for V2's visual queries), each file encoded once, so epochs never re-run the frozen encoder.
    Returns the encoder's name (None for text-only data)."""
    from core.encoders import DEFAULT_ENCODERS, get_encoder
    kinds = sorted({e.media[0] for e in examples if e.media})
    if not kinds:
        return None
    if len(kinds) > 1 and not encoder_name:
        raise UserError(f"these records mix {' and '.join(kinds)}: name one --encoder that reads them all "
                        "(imagebind), or train one adapter per kind")
    if not encoder_name and kinds[0] not in DEFAULT_ENCODERS:
        raise UserError(f"{kinds[0]} records need an encoder that reads {kinds[0]}: --encoder imagebind")
    name = encoder_name or DEFAULT_ENCODERS[kinds[0]]
    encoder = get_encoder(name, kinds)  # refuses a kind it cannot read
    cache: dict[tuple[str, str], torch.Tensor] = {}
    media = sorted({tuple(e.media) for e in examples})
    for i in range(0, len(media), 64):
        chunk = media[i:i + 64]
        loaded = [encoder.load(path, kind) for kind, path in chunk]
        cache.update(zip(chunk, encoder.tokens(loaded) if tokens else encoder.embed(loaded)))
    for e in examples:
        e.features = cache[tuple(e.media)]
    return name


def add_questions(examples: list[Example], model, tokenizer):
    """For a question-aware bind network: each multimodal example's embedding followed by its
    question's (core.multimodal.question_embedding), each distinct question embedded once."""
    from core.multimodal import question_embedding
    texts = sorted({e.question for e in examples})
    table = dict(zip(texts, question_embedding(model, tokenizer, texts).cpu()))
    for e in examples:
        e.features = torch.cat([e.features.float(), table[e.question]])


def batch_features(examples: list[Example]) -> torch.Tensor | None:
    """(B, encoder width) embeddings (or (B, T, C) tokens) of a batch, or None for text-only examples."""
    return torch.stack([e.features for e in examples]) if examples[0].features is not None else None


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group: int = 32) -> list[list[int]]:
    """One epoch's batches of example indices. Indices are shuffled, then sorted by length within
    windows of `group` batches so a batch holds similar lengths (little padding) while the order
    stays random; the batches themselves are shuffled too. Deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def rank_share(items: list, first: int, size: int) -> tuple[float, list]:
    """(weight, items[first:first+size]), this rank's share of a batch. A rank left without data
    (a short last batch) gets the first item with weight 0 instead: it still runs a forward and
    backward, because FSDP's weight gathers need every rank, and the sums stay right."""
    part = items[first:first + size]
    return (1.0, part) if part else (0.0, items[:1])


def collate(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T-1), right-padded; targets are -100 except at response tokens.
    Right padding keeps every real token's causal context free of pads, so no mask is needed."""
    T = max(len(e.tokens) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.tokens)
        tokens[i, :n] = torch.tensor(e.tokens)
        targets[i, :n] = torch.where(torch.tensor(e.loss_mask), tokens[i, :n], -100)
    return tokens[:, :-1], targets[:, 1:]
