"""Exact-match accuracy and validation loss of a model (with or without an adapter) on a skill
task's held-out split, or on a file of records (multimodal ones included).

    python -m train.evaluate --model smollm2 --task arithmetic [--adapter runs/a/adapter.safetensors]
    python -m train.evaluate --data data/points/test.jsonl --adapter runs/p/adapter.safetensors

Prompts use the format the adapter was trained with (its metadata says), or, with no adapter, the
model's own chat format: each side gets the prompt it knows best. `--prompt-format` overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from core.adapter import load_adapter
from core.chat_format import FORMATS, alpaca_prompt, render
from core.errors import UserError
from core.generation import Generator, SamplingParams
from core.loading import LoadedModel, load_model
from core.encoders import KINDS
from core.multimodal import conditioned, embed_inputs, questions_for
from train.data import add_questions, embed_media, load_records, media_of, question_of, tokenize_records
from train.loss import summed_loss
from train.tasks import TASKS, answer_of, task_records


def as_chat(record: dict) -> dict:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}],
            **{k: record[k] for k in KINDS if k in record}}


def prompt_text(record: dict, fmt: str, system: str | None) -> str:
    if fmt == "alpaca":
        return alpaca_prompt(record["instruction"], record.get("input", ""))
    return render(fmt, as_chat(record)["messages"][:1], system)


@torch.no_grad()
def validation_loss(lm: LoadedModel, records: list[dict], fmt: str, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token, prompts in format `fmt`."""
    if fmt != "alpaca":
        records = [as_chat(r) for r in records]
    examples = tokenize_records(records, lm.tokenizer, fmt, lm.system_prompt)
    adapter = getattr(lm.model, "adapter", None)
    embed_media(examples, adapter.cfg.encoder if adapter is not None else None,
                tokens=adapter is not None and adapter.visual is not None)
    if adapter is not None and adapter.cfg.bind_question:
        add_questions(examples, lm.model, lm.tokenizer)
    total, count = summed_loss(lm.model, examples, batch_size, lm.model.tok_embeddings.weight.device)
    return (total / count).item()


@torch.no_grad()
def accuracy(lm: LoadedModel, records: list[dict], fmt: str, batch_size: int = 16,
             max_new_tokens: int = 32) -> tuple[float, list[tuple[str, str]]]:
    """Greedy exact match of the first line of each reply; returns (accuracy, [(answer, expected)])."""
    lm = dataclasses.replace(lm, chat_format=fmt)  # stop tokens and strings follow the prompt format
    gen = Generator(lm.model, lm.tokenizer, lm.stop_ids)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=lm.stop_texts)
    pairs, adapter = [], getattr(lm.model, "adapter", None)
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        media = [media_of(r) for r in chunk]
        condition = embed_inputs(adapter, [m[1] for m in media], [m[0] for m in media], questions=questions_for(
            adapter, lm.model, lm.tokenizer, [question_of(r) for r in chunk])) if media[0] else None
        with conditioned(lm.model, condition):
            replies = gen.generate([prompt_text(r, fmt, lm.system_prompt) for r in chunk], params)
        pairs += [(answer_of(reply), r["output"]) for reply, r in zip(replies, chunk)]
    return sum(a == b for a, b in pairs) / len(pairs), pairs


def breakdown(records: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Exact match per kind of question ("How many ...", "Is there ...": its first two words)."""
    groups: dict[str, list[bool]] = {}
    for r, (answer, expected) in zip(records, pairs):
        question = r.get("instruction") or next(m["content"] for m in r["messages"] if m["role"] == "user")
        groups.setdefault(" ".join(question.split()[:2]) + " ...", []).append(answer == expected)
    rows = ["| question | exact match | count |", "|---|---|---|"]
    rows += [f"| {q} | {sum(hits) / len(hits):.1%} | {len(hits)} |" for q, hits in sorted(groups.items(), key=lambda g: -len(g[1]))]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a Hub id OWNER/NAME[@REVISION], a .gguf file, or a HF/Meta folder")
    p.add_argument("--adapter")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=sorted(TASKS))
    what.add_argument("--data", help="a .jsonl/.json file of records (image/audio/points ones too)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--limit", type=int, default=0, help="the first N records only")
    p.add_argument("--prompt-format", choices=FORMATS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--show", type=int, default=5, help="print this many answers")
    p.add_argument("--breakdown", action="store_true", help="also a markdown table by the questions' first two words")
    p.add_argument("--dtype")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], help="weight-only quantization of the frozen base (core.quantize; default: int4 for the embedded model on CPU when no --dtype is given, else none)")
    p.add_argument("--device")
    args = p.parse_args(argv)
    lm = load_model(args.model, args.dtype, args.device, quantize=args.quantize)
    fmt = args.prompt_format or lm.chat_format
    if args.adapter:
        adapter = load_adapter(args.adapter, lm.model)
        fmt = args.prompt_format or adapter.meta.get("training", {}).get("prompt_format", fmt)
    if args.task:
        records = task_records(args.task, args.split, args.limit or None)
    else:
        records = load_records(args.data)[:args.limit or None]
    acc, pairs = accuracy(lm, records, fmt, args.batch_size, args.max_new_tokens)
    loss = validation_loss(lm, records, fmt, args.batch_size)
    for answer, expected in pairs[:args.show]:
        print(f"  {'ok ' if answer == expected else 'bad'} {answer!r} (expected {expected!r})")
    if args.breakdown:
        print(breakdown(records, pairs))
    source = f"task {args.task} ({args.split}, " if args.task else f"{args.data} ("
    print(f"{source}{len(records)} records, prompt format {fmt}): "
          f"exact match {acc:.1%}, validation loss {loss:.4f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
