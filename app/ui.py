"""The Gradio Blocks page: Chat, the media tabs, Train and Adapters over one `Studio`.

Each handler turns the Gradio request into a `Caller` (`studio.access.caller`) and hands it to
the studio, which checks what that caller may do. The page mirrors those rules for the eye:
what a visitor may not use is disabled, with a line saying why.
"""
from __future__ import annotations

import functools
import shutil
import tempfile
from typing import Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from app.access import ANYONE, Caller
from app.media import TABS, media_tab, mix_tab
from app.studio import NONE, Studio, footer, message_text
from core.errors import UserError
from core.generation import model_sampling

TICK_S = 1.5  # how often an open page re-reads the selected job's files


def shown(fn):
    """A UserError becomes an error toast in the page; the app keeps serving."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def build(studio: Studio) -> gr.Blocks:
    lm, access = studio.lm, studio.access
    device = str(lm.model.tok_embeddings.weight.device)
    precision = getattr(lm.model, "quantization", None) or str(lm.model.tok_embeddings.weight.dtype).removeprefix("torch.")
    header = (f"# LLaMA-Adapter studio\n**Model:** {lm.name} · {precision} · {device} · {lm.chat_format} format · "
              f"context {lm.model.args.max_seq_len}")
    who = access.caller
    max_tokens = min(2048, lm.model.args.max_seq_len - 16)
    defaults = model_sampling(lm)

    with gr.Blocks(title="LLaMA-Adapter studio") as demo:
        gr.Markdown(header)
        role_line = gr.Markdown(elem_id="role")
        with gr.Accordion("Owner sign-in", open=False, visible=access.owner_can_sign_in, elem_id="owner-box"):
            with gr.Row():
                owner_user = gr.Textbox(label="User (STUDIO_AUTH)", visible=bool(access.login), elem_id="owner-user")
                owner_secret = gr.Textbox(label="Password or owner token", type="password", elem_id="owner-secret")
                sign_in = gr.Button("Sign in", elem_id="sign-in")
                sign_out = gr.Button("Sign out", elem_id="sign-out")
        seen = gr.State(None)  # what this page last showed of jobs and adapters (to refresh only on change)
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                chat_adapter = gr.Dropdown(studio.adapter_choices(ANYONE), value=studio.default_name or NONE,
                                           label="Adapter (for this chat only)", elem_id="chat-adapter", scale=3)
            chatbot = gr.Chatbot(elem_id="chatbot", height=420, label="Chat")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                     elem_id="message", max_lines=8)
                send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                stop = gr.Button("Stop", elem_id="stop", scale=1)
            with gr.Row():
                retry = gr.Button("Retry", elem_id="retry", size="sm")
                undo = gr.Button("Undo", elem_id="undo", size="sm")
                clear = gr.Button("Clear", elem_id="clear", size="sm")
            with gr.Accordion("Generation settings", open=False):
                system = gr.Textbox(label="System prompt (empty: the model's or adapter's default)", elem_id="system")
                max_new = gr.Slider(1, max_tokens, value=256, step=1, label="Max new tokens", elem_id="max-new")
                # the model's own defaults (its card or generation_config), with the repetition guard
                temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")

        media_adapters = [media_tab(studio, kind, stream_reply, user_turn, max_new) for kind in TABS]
        media_adapters.append(mix_tab(studio, stream_reply, user_turn, max_new))

        with gr.Tab("Train", id="train"):
            train_note = gr.Markdown(elem_id="train-note")
            with gr.Row():
                with gr.Column(scale=1):
                    dataset = gr.Dropdown(studio.dataset_choices(), value="pirate", label="Shipped dataset",
                                          elem_id="dataset")
                    upload = gr.File(label="...or upload JSON / JSONL (Alpaca or chat records)",
                                     file_types=[".json", ".jsonl"], elem_id="data-upload")
                    with gr.Row():
                        prompt_len = gr.Number(10, label="K (prompts per layer)", precision=0, minimum=1)
                        layers = gr.Number(lm.model.args.n_layers, label="L (adapted layers)", precision=0, minimum=1)
                    with gr.Row():
                        bias_scale = gr.Checkbox(label="V2 bias/scale")
                        norm_tuning = gr.Checkbox(label="V2 norm tuning")
                    with gr.Row():
                        epochs = gr.Number(5, label="Epochs", minimum=0.01)
                        max_steps = gr.Number(0, label="Max steps (0: epochs decide)", precision=0, minimum=0,
                                              elem_id="max-steps")
                    with gr.Row():
                        # 1e-2: what shows the shipped persona on the embedded model in a few epochs (README);
                        # the paper's rule gives 1.4e-4 at batch 4
                        lr = gr.Number(1e-2, label="lr (0: the paper's rule, 9e-3 x batch / 256)", minimum=0)
                        max_seq_len = gr.Number(512, label="Max sequence length", precision=0, minimum=8)
                        nproc = gr.Number(1, label="Processes", precision=0, minimum=1, elem_id="nproc")
                    start = gr.Button("Start training", variant="primary", elem_id="start-job")
                    start_msg = gr.Markdown(elem_id="start-msg")
                with gr.Column(scale=2):
                    with gr.Row():
                        job = gr.Dropdown([], label="Job", elem_id="job", scale=3)
                        cancel = gr.Button("Cancel", elem_id="cancel-job", scale=1)
                        resume = gr.Button("Resume", elem_id="resume-job", scale=1)
                    job_status = gr.Markdown("No job selected.", elem_id="job-status")
                    # one series: a colour legend built from the empty first value never picks up new ones
                    loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=260,
                                            elem_id="loss-plot")
                    job_log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True,
                                         elem_id="job-log", interactive=False)

        with gr.Tab("Adapters", id="adapters"):
            adapter_msg = gr.Markdown(studio.default_line(), elem_id="adapter-msg")
            adapters_note = gr.Markdown(elem_id="adapters-note")
            table = gr.Dataframe(adapter_rows(studio, studio.entries(ANYONE)), interactive=False, elem_id="adapter-table",
                                 wrap=True)
            with gr.Row():
                picked = gr.Dropdown([], label="Adapter", elem_id="adapter-name", scale=2)
                make_default = gr.Button("Make default", variant="primary", elem_id="make-default")
                no_default = gr.Button("No default", elem_id="no-default")
                publish = gr.Button("Publish", elem_id="publish-adapter")
                delete = gr.Button("Delete", variant="stop", elem_id="delete-adapter")
                download = gr.DownloadButton("Download", elem_id="download-adapter")
            with gr.Row():
                new_name = gr.Textbox(label="New name", elem_id="new-name", scale=2)
                rename = gr.Button("Rename", elem_id="rename-adapter")
            with gr.Row():
                adapter_upload = gr.File(label="Add an adapter (.safetensors)", file_types=[".safetensors"],
                                         elem_id="adapter-upload", scale=2)
                add = gr.Button("Add to registry", elem_id="add-adapter")

        # -- who is here ------------------------------------------------------------------------
        train_controls = [dataset, upload, prompt_len, layers, bias_scale, norm_tuning, epochs, max_steps, lr,
                          max_seq_len, start, cancel, resume]
        owner_controls = [make_default, no_default, publish, rename, new_name, adapter_upload, add]

        def role_view(caller: Caller):
            """The page as `caller` may use it: the role line, the sign-in buttons, what is enabled."""
            trains = caller.is_owner or access.visitor_training
            if access.everyone_is_owner:
                line = "Local studio: you are its owner."
            elif caller.is_owner:
                line = "**Signed in as the owner**: training, adding, renaming, deleting and publishing adapters."
            else:
                line = ("**Visitor**: chat and the media tabs, on any published adapter of your choice; "
                        + ("training within limits" if access.visitor_training else "no training") + ". "
                        + ("The owner signs in below." if access.owner_can_sign_in else ""))
            lim = access.limits
            if caller.is_owner:
                train_line = ""
            elif trains:
                train_line = (f"Visitors train one job at a time, 1 process, up to {lim.visitor_records} records, "
                              f"{lim.visitor_steps} steps and sequence length {lim.visitor_seq_len}. Jobs run one "
                              "after another; yours shows its place in line. Its adapter is yours (and the "
                              "owner's) until the owner publishes it.")
            else:
                train_line = "Training here is for the studio's owner (the operator can let visitors train)."
            adapters_line = "" if caller.is_owner else (
                "Pick any adapter for your own chat in the Chat tab, or download it here. Adding, renaming, "
                "publishing and the default for new sessions are the owner's" +
                ("; you may delete adapters your own jobs made." if trains else ".") + "")
            return (line, gr.update(visible=not caller.is_owner and access.owner_can_sign_in),
                    gr.update(visible=caller.is_owner and not access.everyone_is_owner),
                    train_line, adapters_line,
                    *[gr.update(interactive=trains) for _ in train_controls],
                    gr.update(interactive=caller.is_owner),  # processes: visitors train with one
                    *[gr.update(interactive=caller.is_owner) for _ in owner_controls],
                    gr.update(interactive=trains or caller.is_owner),  # delete: a visitor's own adapters
                    gr.update(maximum=max_tokens if caller.is_owner else min(max_tokens, lim.max_new_tokens)))
        role_outputs = [role_line, sign_in, sign_out, train_note, adapters_note, *train_controls, nproc,
                        *owner_controls, delete, max_new]

        # -- chat ---------------------------------------------------------------------------
        def bot_turn(history, system_prompt, max_new_tokens, temp, p, adapter, request: gr.Request):
            yield from stream_reply(studio, request, history, system_prompt, max_new_tokens, temp, p, adapter=adapter)

        def without_last_reply(history):
            history = list(history or [])
            while history and history[-1]["role"] == "assistant":
                history.pop()
            if not history:
                raise gr.Error("Nothing to retry yet.", print_exception=False)
            return history

        def undo_turn(history):
            history = list(history or [])
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            if not users:
                return history, ""
            return history[:users[-1]], message_text(history[users[-1]])

        def stop_reply(request: gr.Request):
            studio.engine.cancel(request.session_hash if request else "")

        reply_args = dict(fn=bot_turn, inputs=[chatbot, system, max_new, temperature, top_p, chat_adapter],
                          outputs=chatbot, concurrency_limit=8, concurrency_id="chat")
        for trigger in (message.submit, send.click):
            trigger(user_turn, [message, chatbot], [message, chatbot], show_progress="hidden").success(**reply_args)
        for trigger in (retry.click, chatbot.retry):
            trigger(without_last_reply, chatbot, chatbot, show_progress="hidden").success(**reply_args)
        for trigger in (undo.click, chatbot.undo):
            trigger(undo_turn, chatbot, [chatbot, message], queue=False)
        stop.click(stop_reply, None, None, queue=False)
        clear.click(lambda r=None: [], None, chatbot, queue=False).then(stop_reply, None, None, queue=False)

        def chat(message: str, system: str = "", max_new_tokens: int = 256, temperature: float = defaults.temperature,
                 top_p: float = defaults.top_p, adapter: str = "", request: gr.Request = None) -> Iterator[str]:
            """One user message in, the reply so far out (streamed): the API for programs
            (gradio_client), with the same queue and limits as the page. Temperature and top-p
            default to the model's (0: greedy); `adapter`: a registry name, "(none)" for the base
            model, or "" for the studio's default."""
            for history in bot_turn([{"role": "user", "content": message}], system, max_new_tokens, temperature,
                                    top_p, adapter, request):
                yield message_text(history[-1])

        gr.api(chat, api_name="chat", concurrency_limit=8, concurrency_id="chat")

        # -- adapters -----------------------------------------------------------------------
        def adapter_lists(caller: Caller):
            """Everything that shows the registry, as `caller` sees it, in the order of list_outputs."""
            names = [e.name for e in studio.entries(caller)]
            return (studio.default_line(), adapter_rows(studio, studio.entries(caller)), gr.update(choices=names),
                    gr.update(choices=studio.adapter_choices(caller)),
                    *(gr.update(choices=studio.media_adapters(kind, caller)) for kind in (*TABS, "mix")))

        list_outputs = [adapter_msg, table, picked, chat_adapter, *media_adapters]

        def registry_view(caller: Caller, line: str):
            """After an Adapters-tab action: its line, and the registry as it is now."""
            return (line, *adapter_lists(caller)[1:])

        def chosen(name):
            if not name:
                raise UserError("choose an adapter first")
            return name

        @shown
        def set_default(name, request: gr.Request):
            caller = who(request)
            return registry_view(caller, studio.make_default(chosen(name), caller))

        @shown
        def clear_default(request: gr.Request):
            caller = who(request)
            return registry_view(caller, studio.make_default(None, caller))

        @shown
        def delete_adapter(name, request: gr.Request):
            caller = who(request)
            studio.delete_adapter(chosen(name), caller)
            return registry_view(caller, f"Deleted **{name}**. " + studio.default_line())

        @shown
        def rename_adapter(old, new, request: gr.Request):
            caller = who(request)
            return registry_view(caller, f"Renamed **{chosen(old)}** to **{studio.rename_adapter(old, new, caller)}**.")

        @shown
        def add_adapter(file, new, request: gr.Request):
            caller = who(request)
            if not file:
                raise UserError("choose a .safetensors file to upload first")
            return registry_view(caller, f"Added **{studio.add_adapter(file, new, caller)}**.")

        @shown
        def publish_adapter(name, request: gr.Request):
            caller = who(request)
            studio.publish_adapter(chosen(name), caller)
            return registry_view(caller, f"Published **{name}**: every visitor can pick it now.")

        make_default.click(set_default, picked, list_outputs)
        no_default.click(clear_default, None, list_outputs)
        delete.click(delete_adapter, picked, list_outputs)
        rename.click(rename_adapter, [picked, new_name], list_outputs)
        add.click(add_adapter, [adapter_upload, new_name], list_outputs)
        publish.click(publish_adapter, picked, list_outputs)

        downloads = Path(tempfile.mkdtemp(prefix="studio-downloads-"))

        def download_copy(name, request: gr.Request):
            """A copy of the file for the download button, made again only when the file changes (the
            registry's folder is not served: a visitor's private adapter must not be reachable by path)."""
            source = studio.registry.path(name) if name else None
            if source is None or not studio.can_see(name, who(request)) or not source.is_file():
                return gr.update(value=None)
            copy = downloads / source.name
            if not copy.is_file() or copy.stat().st_mtime < source.stat().st_mtime:
                shutil.copyfile(source, copy)
            return gr.update(value=str(copy))

        picked.change(download_copy, picked, download)

        # -- training -----------------------------------------------------------------------
        @shown
        def start_job(dataset, upload, prompt_len, layers, bias_scale, norm_tuning, epochs, lr, max_seq_len, nproc,
                      max_steps, request: gr.Request):
            caller = who(request)
            job_id = studio.start_job(dataset, upload, prompt_len, layers, bias_scale, norm_tuning, epochs, lr,
                                      max_seq_len, nproc, max_steps, caller=caller)
            view = studio.runner.view(job_id)
            where = f" It is number {view.position} in line." if view.state == "queued" else ""
            return f"Started **{job_id}**.{where}", gr.update(choices=studio.jobs(caller), value=job_id)

        start.click(start_job, [dataset, upload, prompt_len, layers, bias_scale, norm_tuning, epochs, lr, max_seq_len,
                                nproc, max_steps], [start_msg, job])

        @shown
        def cancel_job(job_id, request: gr.Request):
            studio.cancel_job(job_id, who(request))
            return f"Asked **{job_id}** to stop; a running job saves a resumable state."

        @shown
        def resume_job(job_id, request: gr.Request):
            studio.resume_job(job_id, who(request))
            return f"Resumed **{job_id}**."

        cancel.click(cancel_job, job, start_msg)
        resume.click(resume_job, job, start_msg)

        def refresh(job_id, known, request: gr.Request):
            """The timer's tick: the job's status, curve and log; new jobs and adapters when they appear.
            Lists and the plot are re-sent only when they changed (a re-sent plot redraws from scratch)."""
            caller = who(request)
            jobs, names = studio.jobs(caller), [e.name for e in studio.entries(caller)]
            status, curve, log = job_panel(studio, job_id, caller)
            now = {"lists": [jobs, names, studio.default_name], "curve": [job_id, len(curve)]}
            known = known or {}
            lists_changed, curve_changed = known.get("lists") != now["lists"], known.get("curve") != now["curve"]
            keep = gr.update()
            return (status, curve if curve_changed else keep, log, now,
                    gr.update(choices=jobs) if lists_changed else keep,
                    *(adapter_lists(caller) if lists_changed else [keep] * len(list_outputs)))

        panel = [job_status, loss_plot, job_log, seen, job, *list_outputs]
        gr.Timer(TICK_S).tick(refresh, [job, seen], panel, show_progress="hidden", concurrency_limit=None)
        def show_job(job_id, request: gr.Request):
            return job_panel(studio, job_id, who(request))

        job.change(show_job, job, [job_status, loss_plot, job_log], show_progress="hidden")

        def on_load(request: gr.Request):
            """A new or reloaded page: the caller's role, their jobs (reattached to the newest running
            one), the registry as they see it, and the chat on the default adapter."""
            caller = who(request)
            jobs = studio.jobs(caller)
            running = [j for j in jobs if studio.runner.view(j).state == "running"]
            lists = adapter_lists(caller)
            chat_choice = gr.update(choices=studio.adapter_choices(caller), value=studio.default_name or NONE)
            return (gr.update(choices=jobs, value=(running or jobs or [None])[0]), *lists[:3], chat_choice,
                    *lists[4:], *role_view(caller))

        demo.load(on_load, None, [job, *list_outputs, *role_outputs])

        @shown
        def do_sign_in(user, secret, request: gr.Request):
            caller = access.sign_in(request, user, secret)
            return ("", *adapter_lists(caller), gr.update(choices=studio.jobs(caller)), *role_view(caller))

        def do_sign_out(request: gr.Request):
            access.sign_out(request)
            caller = who(request)
            return ("", *adapter_lists(caller), gr.update(choices=studio.jobs(caller)), *role_view(caller))

        signed = [owner_secret, *list_outputs, job, *role_outputs]
        sign_in.click(do_sign_in, [owner_user, owner_secret], signed)
        owner_secret.submit(do_sign_in, [owner_user, owner_secret], signed)
        sign_out.click(do_sign_out, None, signed)
    return demo


def user_turn(text, history):
    if not text or not text.strip():
        raise gr.Error("Empty message: type something to send.", print_exception=False)
    return "", (history or []) + [{"role": "user", "content": text}]


def stream_reply(studio: Studio, request, history, system_prompt, max_new_tokens, temp, p, **where):
    """The assistant's message growing as tokens arrive, then its stats line. `where`: the
    adapter (default: the studio's default) and media of a media tab."""
    try:
        reply, notice = studio.start_reply(history, system_prompt, max_new_tokens, temp, p,
                                           caller=studio.access.caller(request), **where)
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    if notice:
        gr.Warning(notice)
    name = studio.adapter_label(reply.adapter)
    history = history + [{"role": "assistant", "content": ""}]
    text = ""
    try:
        for delta in studio.deltas(reply, every_s=0.5):
            if delta is None:  # nothing new: while it waits for room in the batch, say where it is
                if reply.position:
                    history[-1]["content"] = f"*Waiting for room: number {reply.position} in line…*"
                    yield history
                continue
            text += delta
            history[-1]["content"] = text
            yield history
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    history[-1]["content"] = text.strip() + footer(reply, name)
    yield history


def adapter_rows(studio: Studio, entries) -> pd.DataFrame:
    rows = []
    for e in entries:
        row = e.summary()
        row["default"] = "●" if e.name == studio.default_name else ""
        row["shared"] = "private" if studio.registry.keeper(e.name) else "published"
        rows.append(row)
    columns = ["default", "name", "shared", "K", "L", "V2", "base", "dataset", "steps", "final loss", "date", "usable"]
    return pd.DataFrame(rows, columns=columns)


def loss_frame(points: list[tuple[int, float]]) -> pd.DataFrame:
    """(step, loss) rows; typed even when empty, or the plot takes the axes for categories."""
    steps, losses = zip(*points) if points else ((), ())
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(losses, dtype="float64")})


def job_panel(studio: Studio, job_id: str | None, caller: Caller):
    if not job_id:
        return "No job selected.", loss_frame([]), ""
    try:
        studio.check_job(job_id, caller)
        view = studio.runner.view(job_id)
    except UserError as e:
        return f"⚠ {e}", loss_frame([]), ""
    rows = view.metrics
    curve = loss_frame([(r["step"], r["loss"]) for r in rows])
    if view.state == "queued":
        progress = f"number {view.position} in line"
    else:
        progress = f"step {view.step}/{view.total_steps or '?'}"
        if view.total_steps:
            progress += f" ({100 * view.step / view.total_steps:.0f}%)"
    eta = f" · ETA {view.eta:.0f} s" if view.eta is not None else ""
    loss = f" · loss {rows[-1]['loss']:.4f}" if rows else ""
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    loss += f" · validation loss {val[-1]:.4f}" if val else ""
    lines = [f"**{job_id}** — {view.state} · {progress}{loss}{eta}", f"data: {view.data}"]
    if view.error:
        lines.append(f"⚠ **error:** {view.error}")
    if view.adapter:
        lines.append(f"adapter **{view.adapter}** is in the registry (pick it in the Chat tab's list)")
    return "\n\n".join(lines), curve, studio.runner.log_tail(job_id)
