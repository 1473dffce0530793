"""What the app's pages do, apart from how they look: chat turns, adapter switching and the
registry, training jobs. Handlers take and return plain values, so tests call them directly;
`app.ui` wires them to Gradio components."""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from core.chat_format import render
from core.errors import UserError
from core.generation import SamplingParams
from core.loading import LoadedModel
from core.multimodal import embed_inputs, questions_for
from core.registry import AdapterRegistry
from core.serving import ChatEngine, Reply, chat_setup
from train.jobs import JobRunner

NONE = "(none)"
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "adapters"
FOOTER = re.compile(r"\n\n<sub>(?:\d+|no) tokens · [^\n]*</sub>$")  # the stats line under each reply; not sent to the model


def message_text(message: dict) -> str:
    """Gradio 6 gives message content as a list of parts; the text parts, footer removed."""
    content = message.get("content", "")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return FOOTER.sub("", str(content))


def footer(reply: Reply, adapter_name: str) -> str:
    rate = f"{reply.tokens_per_s:.1f} tok/s" if reply.tokens > 1 else "- tok/s"  # a rate needs two tokens
    return (f"\n\n<sub>{reply.tokens} tokens · {rate} · "
            f"first token {reply.first_token - reply.submitted:.2f} s · adapter: {adapter_name}</sub>"
            if reply.first_token is not None else f"\n\n<sub>no tokens · adapter: {adapter_name}</sub>")


class Studio:
    def __init__(self, lm: LoadedModel, adapters_dir: str | Path, runs_dir: str | Path, model_name: str = "smollm2"):
        self.lm = lm
        self.engine = ChatEngine(lm)
        self.registry = AdapterRegistry(adapters_dir, lm.model)
        self.runner = JobRunner(runs_dir, model=model_name)
        self.live_name: str | None = None
        self.last_swap_s: float | None = None
        self._add_shipped_adapters()

    def _add_shipped_adapters(self):
        """The adapters in assets/adapters (made by the project's scripts) join the registry, so
        the media tabs answer on first launch; ones for another base model are left out."""
        for path in sorted(SHIPPED.glob("*.safetensors")):
            if not self.registry.path(path.stem).exists():
                try:
                    self.registry.add(path, path.stem)
                except UserError:
                    pass

    # -- chat -------------------------------------------------------------------------------
    def fit_to_context(self, messages: list[dict], fmt: str, system: str | None,
                       max_new_tokens: int) -> tuple[list[int], str | None]:
        """Token ids of the conversation, trimmed to leave room for the reply: oldest turns go
        first, then the start of the last message. Returns (ids, a notice if anything was cut)."""
        tok = self.lm.tokenizer
        budget = self.lm.model.args.max_seq_len - max_new_tokens
        if budget < 16:
            raise UserError(f"max new tokens {max_new_tokens} leaves no room for the prompt in this model's "
                            f"context of {self.lm.model.args.max_seq_len}; accepted: up to "
                            f"{self.lm.model.args.max_seq_len - 16}")
        dropped = 0
        while True:
            ids = tok.encode(render(fmt, messages, system))
            if len(ids) <= budget:
                break
            if len(messages) > 1:  # drop the oldest user/assistant pair
                messages = messages[2:] if messages[0]["role"] == "user" and len(messages) > 2 else messages[1:]
                dropped += 1
                continue
            overflow = len(ids) - budget
            words = tok.encode(messages[-1]["content"])
            if overflow >= len(words):
                raise UserError("the system prompt alone does not fit the context; shorten it")
            messages = [{"role": "user", "content": tok.decode(words[overflow + 1:])}]
            cut = f"the message was {len(words)} tokens; its first {overflow + 1} were cut to fit the context"
            return tok.encode(render(fmt, messages, system)), cut + (" (and older turns dropped)" if dropped else "")
        notice = f"{dropped} older message(s) left out to fit the context" if dropped else None
        return ids, notice

    def start_reply(self, history: list[dict], system: str, max_new_tokens: int, temperature: float,
                    top_p: float, owner: str = "", adapter="live", media: tuple[str, object] | None = None
                    ) -> tuple[Reply, str | None]:
        """Submit the conversation (ending with the user's message) on the live adapter, or on
        `adapter` (a registry name) about `media` for the media tabs: (kind, file or array), or
        (kind, [files], [weights]) for several inputs mixed into one, or ([kinds], [files],
        [weights]) for inputs of several kinds (an encoder that reads them all: imagebind)."""
        messages = [{"role": m["role"], "content": message_text(m)} for m in history if m["role"] in ("user", "assistant")]
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise UserError("empty message: type something to send")
        adapter = self.engine.live if adapter == "live" else self.registry.load(adapter) if adapter else None
        condition = None
        if media is not None:
            kind, sources, weights = (*media, None) if len(media) == 2 else media
            sources = sources if isinstance(sources, list) else [sources]
            if not sources or any(s is None for s in sources):
                raise UserError(f"upload a {kind} file or pick an example first")
            if len(sources) > 1 and weights is None:
                weights = [1.0] * len(sources)
            with torch.no_grad():  # a question-aware bind network reads this turn's question
                questions = questions_for(adapter, self.lm.model, self.lm.tokenizer, [messages[-1]["content"]])
                condition = embed_inputs(adapter, sources, kind, weights, questions=questions)
        fmt, default_system, stops = chat_setup(self.lm, adapter)
        system = system.strip() if system and system.strip() else default_system
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                top_p=float(top_p), stop=stops)
        params.validate()
        ids, notice = self.fit_to_context(messages, fmt, system, int(max_new_tokens))
        return self.engine.submit(ids, params, owner, adapter, condition), notice

    def media_adapters(self, kind: str) -> list[str]:
        """Registry adapters trained on `kind` inputs (their encoder reads that kind); for "mix",
        those whose encoder reads several of the app's kinds into one space (ImageBind)."""
        from core.encoders import KINDS, encoder_kinds
        names = []
        for e in self.registry.entries():
            encoder = e.meta.get("config", {}).get("encoder")
            if e.problem is None and encoder:
                try:
                    reads = encoder_kinds(encoder)
                    if kind in reads or (kind == "mix" and len(set(reads) & set(KINDS)) > 1):
                        names.append(e.name)
                except UserError:  # an encoder this version does not know
                    pass
        return names

    def adapter_label(self, adapter) -> str:
        return NONE if adapter is None else (self.registry.name_of(adapter) or "(unnamed)")

    # -- adapters ---------------------------------------------------------------------------
    def adapter_choices(self) -> list[str]:
        return [NONE] + [e.name for e in self.registry.entries() if e.problem is None]

    def make_live(self, name: str | None) -> str:
        """Switch the live adapter (or none); returns a line saying what happened and how long it took."""
        name = None if not name or name == NONE else name
        t0 = time.perf_counter()
        adapter = self.registry.load(name) if name else None
        self.engine.set_live(adapter)
        self.last_swap_s = time.perf_counter() - t0
        self.live_name = name
        return self.live_line()

    def live_line(self) -> str:
        swap = f" · last swap {1000 * self.last_swap_s:.1f} ms" if self.last_swap_s is not None else ""
        return f"**Live adapter:** {self.live_name or 'none (base model)'}{swap}"

    def forget_adapter(self, name: str):
        """Delete from the registry; the live model drops it first."""
        if name == self.live_name:
            self.make_live(None)
        self.registry.delete(name)

    def rename_adapter(self, old: str, new: str) -> str:
        new = self.registry.rename(old, new)
        if old == self.live_name:
            self.live_name = new
        return new

    # -- training ---------------------------------------------------------------------------
    def dataset_choices(self) -> list[str]:
        from train.data import shipped_datasets
        from train.tasks import TASKS
        return list(shipped_datasets()) + [f"task:{t}" for t in TASKS]

    def start_job(self, dataset: str, upload: str | None, prompt_len: int, layers: int, bias_scale: bool,
                  norm_tuning: bool, epochs: float, lr: float, max_seq_len: int, nproc: int,
                  max_steps: int = 0) -> str:
        data = upload or dataset
        if not data:
            raise UserError("choose a dataset or upload a .json/.jsonl file")
        if upload and Path(upload).suffix.lower() not in (".json", ".jsonl"):
            raise UserError(f"{Path(upload).name}: wrong file type; accepted: .json or .jsonl")
        name = Path(upload).stem if upload else dataset.replace("task:", "")
        options = {"prompt_len": int(prompt_len), "layers": int(layers), "bias_scale": bool(bias_scale),
                   "norm_tuning": bool(norm_tuning), "epochs": float(epochs), "max_seq_len": int(max_seq_len),
                   "lr": float(lr) if lr else None, "max_steps": int(max_steps) or None}
        for key in ("prompt_len", "layers", "max_seq_len"):
            if options[key] < 1:
                raise UserError(f"{key.replace('_', ' ')} must be at least 1, got {options[key]}")
        if options["epochs"] <= 0:
            raise UserError(f"epochs must be positive, got {epochs}")
        return self.runner.start(data, name, int(nproc), options)
