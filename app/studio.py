"""What the app's pages do, apart from how they look: chat turns, each on the adapter its caller
chose, the registry, training jobs. Handlers take and return plain values and the `Caller` asking,
and check what the caller may do themselves, so tests call them directly and a crafted request
meets the same checks as the page; `app.ui` wires them to Gradio components."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch

from app import zerogpu
from app.access import OWNER, Access, Caller
from core.adapter import SHIPPED
from core.chat_format import render
from core.errors import UserError
from core.generation import model_sampling
from core.loading import LoadedModel
from core.multimodal import embed_inputs, questions_for
from core.registry import AdapterRegistry, clean_name
from core.serving import ChatEngine, Reply, beside_engine, chat_setup
from train.jobs import JobRunner

NONE = "(none)"
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
    @beside_engine  # loads the shipped adapters after the engine started
    def __init__(self, lm: LoadedModel, adapters_dir: str | Path, runs_dir: str | Path, model_name: str = "smollm2",
                 access: Access | None = None, max_running_jobs: int | None = None, engine: dict | None = None):
        """`engine`: ChatEngine's options (max_batch, kv_budget, prefill_chunk)."""
        self.lm = lm
        self.access = access or Access()
        self.engine = ChatEngine(lm, **(engine or {}))
        self.registry = AdapterRegistry(adapters_dir, lm.model)
        self.runner = JobRunner(runs_dir, model=model_name, max_running=max_running_jobs)
        self.default_name: str | None = None  # the adapter a new session starts on; the owner sets it
        self._add_shipped_adapters()
        threading.Thread(target=self._keep_jobs_moving, name="job-keeper", daemon=True).start()

    def _add_shipped_adapters(self):
        """The adapters in assets/adapters (made by the project's scripts) join the registry, so
        the media tabs answer on first launch; ones for another base model are left out."""
        for path in sorted(SHIPPED.glob("*.safetensors")):
            if not self.registry.path(path.stem).exists():
                try:
                    self.registry.add(path, path.stem)
                except UserError:
                    pass

    def _keep_jobs_moving(self, every_s: float = 1.0):
        """Launch the next job in line when one ends, and register finished jobs' adapters, whether
        or not a page is open."""
        while True:
            try:
                self.runner.pump()
                for name in self.runner.register_finished(self.registry):
                    print(f"registered adapter {name}", flush=True)
            except Exception as e:  # a damaged run folder must not stop the line
                print(f"job keeper: {e}", flush=True)
            time.sleep(every_s)

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

    def start_reply(self, history: list[dict], system: str, max_new_tokens: int, temperature: float | None = None,
                    top_p: float | None = None, caller: Caller = OWNER, adapter: str | None = "",
                    media: tuple[str, object] | None = None, repetition_guard: bool = True) -> tuple[Reply, str | None]:
        """Submit the conversation (ending with the user's message) for `caller`, on `adapter`: a
        registry name, "" for the default of new sessions, None or NONE for the base model; about
        `media` for the media tabs: (kind, file or array), or (kind, [files], [weights]) for several
        inputs mixed into one, or ([kinds], [files], [weights]) for inputs of several kinds (an
        encoder that reads them all: imagebind). Temperature and top-p default to the model's; the
        repetition guard is on unless asked off (the media tabs' one-word answers run exactly as
        their adapters were evaluated). A visitor's request over a limit is refused."""
        messages = [{"role": m["role"], "content": message_text(m)} for m in history if m["role"] in ("user", "assistant")]
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise UserError("empty message: type something to send")
        self.access.admit(caller, messages[-1]["content"], int(max_new_tokens),
                          self.engine.in_flight(caller.session, caller.ip))
        adapter = self.adapter_for(adapter, caller)
        condition = self.condition(adapter, media, messages[-1]["content"], caller)
        fmt, default_system, stops = chat_setup(self.lm, adapter)
        system = system.strip() if system and system.strip() else default_system
        guard = {} if repetition_guard else {"repetition_penalty": 1.0, "ngram_guard": 0}
        params = model_sampling(self.lm, max_new_tokens=int(max_new_tokens), stop=stops, **guard,
                                temperature=None if temperature is None else float(temperature),
                                top_p=None if top_p is None else float(top_p))
        params.validate()
        ids, notice = self.fit_to_context(messages, fmt, system, int(max_new_tokens))
        return self.submit(ids, params, caller, adapter, condition), notice

    def submit(self, ids: list[int], params, caller: Caller, adapter=None, condition=None) -> Reply:
        """A reply for `caller` (already admitted): queued for the engine's worker, or, on ZeroGPU,
        left for `deltas` to run inside a GPU call."""
        return self.engine.submit(ids, params, caller.session, adapter, condition, caller.ip,
                                  queued=not zerogpu.ON_ZERO_GPU)

    def deltas(self, reply: Reply, every_s: float | None = None):
        """A submitted reply's text deltas (with `every_s`, None on each quiet tick, see Reply.updates)."""
        return zerogpu.stream(self.engine, reply) if zerogpu.ON_ZERO_GPU else reply.updates(every_s)

    @beside_engine  # an encoder runs on the handler's thread
    def condition(self, adapter, media, question: str, caller: Caller = OWNER) -> torch.Tensor | None:
        """What `media` (see start_reply) adds to `adapter`'s prompts for `question`; None without media."""
        if media is None:
            return None
        kind, sources, weights = (*media, None) if len(media) == 2 else media
        sources = sources if isinstance(sources, list) else [sources]
        if not sources or any(s is None for s in sources):
            raise UserError(f"upload a {kind} file or pick an example first")
        for source in sources:
            if isinstance(source, (str, Path)):
                self.access.check_upload(caller, source, "media")
        if len(sources) > 1 and weights is None:
            weights = [1.0] * len(sources)
        with torch.no_grad():  # a question-aware bind network reads this turn's question
            questions = questions_for(adapter, self.lm.model, self.lm.tokenizer, [question])
            return embed_inputs(adapter, sources, kind, weights, questions=questions)

    @beside_engine  # may load an adapter on the handler's thread
    def adapter_for(self, name: str | None, caller: Caller = OWNER):
        """The adapter a request names: "" the default of new sessions, None or NONE the base
        model, else a registry name the caller may use (published, theirs, or any for the owner)."""
        if name == "":
            name = self.default_name
        if not name or name == NONE:
            return None
        if not self.can_see(name, caller):
            raise UserError(f"no adapter named {name!r}; accepted: {', '.join(self.adapter_choices(caller))}")
        return self.registry.load(name)

    def adapter_label(self, adapter) -> str:
        return NONE if adapter is None else (self.registry.name_of(adapter) or "(unnamed)")

    # -- adapters ---------------------------------------------------------------------------
    def can_see(self, name: str, caller: Caller) -> bool:
        keeper = self.registry.keeper(clean_name(name))
        return keeper is None or caller.is_owner or keeper == caller.id

    def entries(self, caller: Caller = OWNER):
        """The registry as `caller` sees it: published adapters, their own, or all for the owner."""
        return [e for e in self.registry.entries() if self.can_see(e.name, caller)]

    def adapter_choices(self, caller: Caller = OWNER) -> list[str]:
        return [NONE] + [e.name for e in self.entries(caller) if e.problem is None]

    def media_adapters(self, kind: str, caller: Caller = OWNER) -> list[str]:
        """Adapters trained on `kind` inputs (their encoder reads that kind); for "mix", those whose
        encoder reads several of the app's kinds into one space (ImageBind). The one named after the
        kind (the shipped one, as the CLI picks it) comes first: the tab starts on it."""
        from core.encoders import KINDS, encoder_kinds
        names = []
        for e in self.entries(caller):
            encoder = e.meta.get("config", {}).get("encoder")
            if e.problem is None and encoder:
                try:
                    reads = encoder_kinds(encoder)
                    if kind in reads or (kind == "mix" and len(set(reads) & set(KINDS)) > 1):
                        names.append(e.name)
                except UserError:  # an encoder this version does not know
                    pass
        return sorted(names, key=lambda name: name != kind)  # stable: the rest keep the registry's order

    @beside_engine  # may load an adapter on the handler's thread
    def make_default(self, name: str | None, caller: Caller = OWNER) -> str:
        """Set the adapter new sessions start on (or none); sessions already open keep their choice."""
        self.access.require_owner(caller, "setting the default adapter")
        name = None if not name or name == NONE else name
        if name:
            if self.registry.keeper(clean_name(name)) is not None:
                raise UserError(f"{name} is a visitor's private adapter; publish it before making it the default")
            self.registry.load(name)  # refuses a missing or unusable file now, not at the next chat
        self.default_name = name
        return self.default_line()

    def default_line(self) -> str:
        return f"**Default adapter for new sessions:** {self.default_name or 'none (base model)'}"

    def delete_adapter(self, name: str, caller: Caller = OWNER):
        """The owner deletes any adapter; a visitor only their own private one."""
        keeper = self.registry.keeper(clean_name(name))
        if not (keeper is not None and keeper == caller.id):
            self.access.require_owner(caller, "deleting adapters")
        if name == self.default_name:
            self.default_name = None
        self.registry.delete(name)

    def rename_adapter(self, old: str, new: str, caller: Caller = OWNER) -> str:
        self.access.require_owner(caller, "renaming adapters")
        new = self.registry.rename(old, new)
        if old == self.default_name:
            self.default_name = new
        return new

    @beside_engine  # may load an adapter on the handler's thread
    def add_adapter(self, file: str, name: str | None, caller: Caller = OWNER) -> str:
        self.access.require_owner(caller, "adding adapters")
        return self.registry.add(file, name or Path(file).stem)

    def publish_adapter(self, name: str, caller: Caller = OWNER):
        """A visitor's private adapter becomes everyone's."""
        self.access.require_owner(caller, "publishing adapters")
        self.registry.publish(name)

    # -- training ---------------------------------------------------------------------------
    def dataset_choices(self) -> list[str]:
        from train.data import shipped_datasets
        from train.tasks import TASKS
        return list(shipped_datasets()) + [f"task:{t}" for t in TASKS]

    def jobs(self, caller: Caller = OWNER) -> list[str]:
        return self.runner.jobs(None if caller.is_owner else caller.id)

    def check_job(self, job_id: str, caller: Caller):
        """A visitor reaches their own jobs only; others' are as if they did not exist."""
        if not job_id:
            raise UserError("choose a job first")
        if not caller.is_owner and self.runner.owner_of(job_id) != caller.id:
            raise UserError(f"no job named {job_id!r} of yours")

    def start_job(self, dataset: str, upload: str | None, prompt_len: int, layers: int, bias_scale: bool,
                  norm_tuning: bool, epochs: float, lr: float, max_seq_len: int, nproc: int,
                  max_steps: int = 0, caller: Caller = OWNER) -> str:
        self.access.require_training(caller)
        data = upload or dataset
        if not data:
            raise UserError("choose a dataset or upload a .json/.jsonl file")
        if upload and Path(upload).suffix.lower() not in (".json", ".jsonl"):
            raise UserError(f"{Path(upload).name}: wrong file type; accepted: .json or .jsonl")
        self.access.check_upload(caller, upload, "dataset")
        name = Path(upload).stem if upload else dataset.replace("task:", "")
        options = {"prompt_len": int(prompt_len), "layers": int(layers), "bias_scale": bool(bias_scale),
                   "norm_tuning": bool(norm_tuning), "epochs": float(epochs), "max_seq_len": int(max_seq_len),
                   "lr": float(lr) if lr else None, "max_steps": int(max_steps) or None}
        for key in ("prompt_len", "layers", "max_seq_len"):
            if options[key] < 1:
                raise UserError(f"{key.replace('_', ' ')} must be at least 1, got {options[key]}")
        if options["epochs"] <= 0:
            raise UserError(f"epochs must be positive, got {epochs}")
        if not caller.is_owner:
            options["max_steps"] = self.check_visitor_job(caller, data, options, int(nproc))
        if zerogpu.ON_ZERO_GPU:  # the lent GPU never reaches a job's own processes
            options["device"] = "cpu"
        return self.runner.start(data, name, int(nproc), options, by=caller.id)

    def check_visitor_job(self, caller: Caller, data: str, options: dict, nproc: int) -> int:
        """A visitor's job: one at a time, within the caps, while the line has room. Returns its
        step limit (the cap unless they asked for fewer)."""
        from train.data import load_records
        lim = self.access.limits
        states = {j: self.runner.view(j).state for j in self.runner.jobs(caller.id)}
        mine = [j for j, state in states.items() if state in ("queued", "running")]
        if mine:
            raise UserError(f"you have a job already ({mine[0]}, {states[mine[0]]}); "
                            "one at a time: wait for it to end or cancel it")
        if len(self.runner.waiting()) >= lim.jobs_waiting:
            raise UserError(f"the training line is full ({lim.jobs_waiting} jobs waiting); try again later")
        if nproc != 1:
            raise UserError(f"processes: visitors train with 1, got {nproc}")
        if options["max_seq_len"] > lim.visitor_seq_len:
            raise UserError(f"max sequence length {options['max_seq_len']} is over the visitors' limit; "
                            f"accepted: up to {lim.visitor_seq_len}")
        records = len(load_records(data))
        if records > lim.visitor_records:
            raise UserError(f"{Path(data).name}: {records} records; visitors' datasets hold up to {lim.visitor_records}")
        return min(options["max_steps"] or lim.visitor_steps, lim.visitor_steps)

    def cancel_job(self, job_id: str, caller: Caller = OWNER) -> str:
        self.check_job(job_id, caller)
        self.runner.cancel(job_id)
        return job_id

    def resume_job(self, job_id: str, caller: Caller = OWNER) -> str:
        self.check_job(job_id, caller)
        self.access.require_training(caller)
        return self.runner.resume(job_id)
