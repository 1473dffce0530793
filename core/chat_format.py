"""Prompt formats: the paper's Alpaca template, ChatML, Llama-2 [INST] and Llama-3 headers.

A format renders a list of {"role": "system"|"user"|"assistant", "content": str} messages to text
in which special tokens appear literally (Tokenizer.encode maps them to their ids)."""
from __future__ import annotations

import re

from core.errors import UserError

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")

FORMATS = ("alpaca", "chatml", "llama2", "llama3")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The paper's template for one instruction (and optional input); the response follows it."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def detect_format(chat_template: str | None, special_tokens) -> str:
    """Pick the format from a checkpoint's chat template (or, lacking one, its special tokens)."""
    text = (chat_template or "") + " " + " ".join(special_tokens)
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama3"
    if "[INST]" in (chat_template or ""):
        return "llama2"
    return "alpaca"


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when none is given (SmolLM2 has one)."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template or "")
    return m.group(1) if m else None


def assistant_turn(fmt: str, content: str) -> str:
    """The text that follows the assistant header and completes its turn (end marker included;
    Alpaca has none, so a trained reply ends with the tokenizer's EOS instead)."""
    return {"chatml": f"{content}<|im_end|>", "llama3": f"{content.strip()}<|eot_id|>",
            "llama2": f" {content.strip()} </s>", "alpaca": f" {content}"}[fmt]


def render(fmt: str, messages: list[dict], system: str | None = None) -> str:
    """Text of the conversation up to the point where the assistant's next reply begins."""
    if fmt not in FORMATS:
        raise UserError(f"unknown prompt format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages or messages[-1]["role"] != "user":
        raise UserError("a conversation must end with a user message")
    if fmt == "chatml":
        out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for m in messages:
            out += f"<|im_start|>{m['role']}\n" + assistant_turn(fmt, m["content"]) + "\n"  # same end for any role
        return out + "<|im_start|>assistant\n"
    if fmt == "llama3":
        out = "<|begin_of_text|>"
        turns = ([{"role": "system", "content": system}] if system else []) + messages
        for m in turns:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n" + assistant_turn(fmt, m["content"])
        return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if fmt == "llama2":
        out = ""
        for i in range(0, len(messages), 2):
            user = messages[i]["content"].strip()
            if i == 0 and system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            out += f"<s>[INST] {user} [/INST]"
            if i + 1 < len(messages):
                out += assistant_turn(fmt, messages[i + 1]["content"])
        return out
    # alpaca: earlier turns become instruction/response pairs; the system prompt leads the first
    out = ""
    for i in range(0, len(messages), 2):
        instruction = messages[i]["content"]
        if i == 0 and system:
            instruction = f"{system}\n\n{instruction}"
        out += alpaca_prompt(instruction)
        if i + 1 < len(messages):
            out += assistant_turn(fmt, messages[i + 1]["content"]) + "\n\n"
    return out


def stop_strings(fmt: str) -> list[str]:
    """Text that ends an assistant turn in this format, besides the model's EOS token."""
    return {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"], "llama2": ["</s>"],
            "alpaca": ["### Instruction:"]}[fmt]
