"""The Gradio Blocks page: Chat, Train and Adapters tabs over one `Studio`."""
from __future__ import annotations

import functools
from typing import Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from app.media import TABS, media_tab, mix_tab
from app.studio import NONE, Studio, footer, message_text
from core.errors import UserError
from core.model import count_parameters

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
    lm = studio.lm
    device = str(lm.model.tok_embeddings.weight.device)
    header = (f"# LLaMA-Adapter studio\n**Model:** {lm.name} · {count_parameters(lm.model) / 1e6:.0f}M parameters · "
              f"{device} · {lm.chat_format} format · context {lm.model.args.max_seq_len}")

    with gr.Blocks(title="LLaMA-Adapter studio") as demo:
        gr.Markdown(header)
        seen = gr.State(None)  # what this page last showed of jobs and adapters (to refresh only on change)
        with gr.Tab("Chat", id="chat"):
            live = gr.Markdown(studio.live_line(), elem_id="live")
            with gr.Row():
                chat_adapter = gr.Dropdown(studio.adapter_choices(), value=studio.live_name or NONE,
                                           label="Adapter (switches the live model)", elem_id="chat-adapter", scale=3)
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
                max_new = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id="max-new")
                # greedy by default: the 135M embedded model rambles when sampled
                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")

        media_adapters = [media_tab(studio, kind, stream_reply, user_turn, max_new) for kind in TABS]
        media_adapters.append(mix_tab(studio, stream_reply, user_turn, max_new))

        with gr.Tab("Train", id="train"):
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
                        nproc = gr.Number(1, label="Processes", precision=0, minimum=1)
                    start = gr.Button("Start training", variant="primary", elem_id="start-job")
                    start_msg = gr.Markdown(elem_id="start-msg")
                with gr.Column(scale=2):
                    with gr.Row():
                        job = gr.Dropdown(studio.runner.jobs(), label="Job", elem_id="job", scale=3)
                        cancel = gr.Button("Cancel", elem_id="cancel-job", scale=1)
                        resume = gr.Button("Resume", elem_id="resume-job", scale=1)
                    job_status = gr.Markdown("No job selected.", elem_id="job-status")
                    # one series: a colour legend built from the empty first value never picks up new ones
                    loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=260,
                                            elem_id="loss-plot")
                    job_log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True,
                                         elem_id="job-log", interactive=False)

        with gr.Tab("Adapters", id="adapters"):
            adapter_msg = gr.Markdown(studio.live_line(), elem_id="adapter-msg")
            table = gr.Dataframe(adapter_rows(studio), interactive=False, elem_id="adapter-table", wrap=True)
            with gr.Row():
                picked = gr.Dropdown(studio.registry.names(), label="Adapter", elem_id="adapter-name", scale=2)
                make_live = gr.Button("Make live", variant="primary", elem_id="make-live")
                go_base = gr.Button("Use no adapter", elem_id="no-adapter")
                delete = gr.Button("Delete", variant="stop", elem_id="delete-adapter")
                download = gr.DownloadButton("Download", elem_id="download-adapter")
            with gr.Row():
                new_name = gr.Textbox(label="New name", elem_id="new-name", scale=2)
                rename = gr.Button("Rename", elem_id="rename-adapter")
            with gr.Row():
                adapter_upload = gr.File(label="Add an adapter (.safetensors)", file_types=[".safetensors"],
                                         elem_id="adapter-upload", scale=2)
                add = gr.Button("Add to registry", elem_id="add-adapter")

        # -- chat ---------------------------------------------------------------------------
        def bot_turn(history, system_prompt, max_new_tokens, temp, p, request: gr.Request):
            yield from stream_reply(studio, request, history, system_prompt, max_new_tokens, temp, p)

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

        reply_args = dict(fn=bot_turn, inputs=[chatbot, system, max_new, temperature, top_p], outputs=chatbot,
                          concurrency_limit=4, concurrency_id="chat")
        for trigger in (message.submit, send.click):
            trigger(user_turn, [message, chatbot], [message, chatbot], show_progress="hidden").success(**reply_args)
        for trigger in (retry.click, chatbot.retry):
            trigger(without_last_reply, chatbot, chatbot, show_progress="hidden").success(**reply_args)
        for trigger in (undo.click, chatbot.undo):
            trigger(undo_turn, chatbot, [chatbot, message], queue=False)
        stop.click(stop_reply, None, None, queue=False)
        clear.click(lambda r=None: [], None, chatbot, queue=False).then(stop_reply, None, None, queue=False)

        def chat(message: str, system: str = "", max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, request: gr.Request = None) -> Iterator[str]:
            """One user message in, the reply so far out (streamed), on the live adapter: the API for
            programs (gradio_client), with the same queue as the page."""
            for history in bot_turn([{"role": "user", "content": message}], system, max_new_tokens, temperature,
                                    top_p, request):
                yield message_text(history[-1])

        gr.api(chat, api_name="chat", concurrency_limit=4, concurrency_id="chat")

        # -- adapters -----------------------------------------------------------------------
        def adapter_lists():
            """Everything that shows the registry or the live adapter, in the order of list_outputs."""
            return (studio.live_line(), adapter_rows(studio), gr.update(choices=studio.registry.names()),
                    gr.update(choices=studio.adapter_choices(), value=studio.live_name or NONE),
                    *(gr.update(choices=studio.media_adapters(kind)) for kind in (*TABS, "mix")))

        list_outputs = [live, table, picked, chat_adapter, *media_adapters]

        def adapter_views(message_line: str):
            return (message_line, *adapter_lists())

        adapter_outputs = [adapter_msg, *list_outputs]

        @shown
        def switch(name):
            return adapter_views(studio.make_live(name))

        @shown
        def delete_adapter(name):
            if not name:
                raise UserError("choose an adapter first")
            studio.forget_adapter(name)
            return adapter_views(f"Deleted **{name}**. " + studio.live_line())

        @shown
        def rename_adapter(old, new):
            if not old:
                raise UserError("choose an adapter first")
            new = studio.rename_adapter(old, new)
            return adapter_views(f"Renamed **{old}** to **{new}**.")

        @shown
        def add_adapter(file, new):
            if not file:
                raise UserError("choose a .safetensors file to upload first")
            name = studio.registry.add(file, new or Path(file).stem)
            return adapter_views(f"Added **{name}**.")

        chat_adapter.input(switch, chat_adapter, adapter_outputs)
        make_live.click(switch, picked, adapter_outputs)
        go_base.click(switch, gr.State(NONE), adapter_outputs)
        delete.click(delete_adapter, picked, adapter_outputs)
        rename.click(rename_adapter, [picked, new_name], adapter_outputs)
        add.click(add_adapter, [adapter_upload, new_name], adapter_outputs)
        picked.change(lambda n: gr.update(value=str(studio.registry.path(n)) if n else None), picked, download)

        # -- training -----------------------------------------------------------------------
        @shown
        def start_job(*values):
            job_id = studio.start_job(*values)
            return f"Started **{job_id}**.", gr.update(choices=studio.runner.jobs(), value=job_id)

        start.click(start_job, [dataset, upload, prompt_len, layers, bias_scale, norm_tuning, epochs, lr, max_seq_len,
                                nproc, max_steps], [start_msg, job])

        def on_job(action, done: str):
            @shown
            def handler(job_id):
                if not job_id:
                    raise UserError("choose a job first")
                action(job_id)
                return done.format(job=job_id)
            return handler

        cancel.click(on_job(studio.runner.cancel, "Asked **{job}** to stop; it saves a resumable state."), job, start_msg)
        resume.click(on_job(studio.runner.resume, "Resumed **{job}**."), job, start_msg)

        def refresh(job_id, known):
            """The timer's tick: the job's status, curve and log; new jobs and adapters when they appear.
            Lists and the plot are re-sent only when they changed (a re-sent plot redraws from scratch)."""
            for name in studio.runner.register_finished(studio.registry):
                gr.Info(f"Training finished: adapter {name} is in the registry.")
            jobs, names = studio.runner.jobs(), studio.registry.names()
            status, curve, log = job_panel(studio, job_id)
            now = {"lists": [jobs, names, studio.live_name], "curve": [job_id, len(curve)]}
            known = known or {}
            lists_changed, curve_changed = known.get("lists") != now["lists"], known.get("curve") != now["curve"]
            keep = gr.update()
            return (status, curve if curve_changed else keep, log, now,
                    gr.update(choices=jobs) if lists_changed else keep,
                    *(adapter_lists() if lists_changed else [keep] * len(list_outputs)))

        panel = [job_status, loss_plot, job_log, seen, job, *list_outputs]
        gr.Timer(TICK_S).tick(refresh, [job, seen], panel, show_progress="hidden", concurrency_limit=None)
        job.change(lambda j: job_panel(studio, j), job, [job_status, loss_plot, job_log], show_progress="hidden")

        def on_load():
            """A new or reloaded page reattaches to the newest running job (else the newest job)."""
            jobs = studio.runner.jobs()
            running = [j for j in jobs if studio.runner.view(j).state == "running"]
            return gr.update(choices=jobs, value=(running or jobs or [None])[0]), *adapter_lists()

        demo.load(on_load, None, [job, *list_outputs])
    return demo


def user_turn(text, history):
    if not text or not text.strip():
        raise gr.Error("Empty message: type something to send.", print_exception=False)
    return "", (history or []) + [{"role": "user", "content": text}]


def stream_reply(studio: Studio, request, history, system_prompt, max_new_tokens, temp, p, **where):
    """The assistant's message growing as tokens arrive, then its stats line. `where`: the
    adapter and media of a media tab (default: the live adapter, text only)."""
    try:
        reply, notice = studio.start_reply(history, system_prompt, max_new_tokens, temp, p,
                                           owner=request.session_hash if request else "", **where)
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    if notice:
        gr.Warning(notice)
    name = studio.adapter_label(reply.adapter)
    history = history + [{"role": "assistant", "content": ""}]
    text = ""
    try:
        for delta in reply:
            text += delta
            history[-1]["content"] = text
            yield history
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    history[-1]["content"] = text.strip() + footer(reply, name)
    yield history


def adapter_rows(studio: Studio) -> pd.DataFrame:
    rows = [e.summary() for e in studio.registry.entries()]
    for row in rows:
        row["live"] = "●" if row["name"] == studio.live_name else ""
    columns = ["live", "name", "K", "L", "V2", "base", "dataset", "steps", "final loss", "date", "usable"]
    return pd.DataFrame(rows, columns=columns)


def loss_frame(points: list[tuple[int, float]]) -> pd.DataFrame:
    """(step, loss) rows; typed even when empty, or the plot takes the axes for categories."""
    steps, losses = zip(*points) if points else ((), ())
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(losses, dtype="float64")})


def job_panel(studio: Studio, job_id: str | None):
    if not job_id:
        return "No job selected.", loss_frame([]), ""
    try:
        view = studio.runner.view(job_id)
    except UserError as e:
        return f"⚠ {e}", loss_frame([]), ""
    rows = view.metrics
    curve = loss_frame([(r["step"], r["loss"]) for r in rows])
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
        lines.append(f"adapter **{view.adapter}** is in the registry (Adapters tab, or the Chat tab's list)")
    return "\n\n".join(lines), curve, studio.runner.log_tail(job_id)
