"""The media tabs: ask about an uploaded (or example) input through an adapter trained on that
kind of input, whose bind network (or V2 visual queries) adds the encoder's output to the adaption
prompts."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.access import ANYONE
from app.studio import Studio
from core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


def cloud_figure(points):
    """An interactive 3D scatter of an (N, 6) xyz+rgb cloud."""
    import plotly.graph_objects as go
    colors = [f"rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})" for r, g, b in points[:, 3:6]]
    fig = go.Figure(go.Scatter3d(x=points[:, 0], y=points[:, 1], z=points[:, 2], mode="markers",
                                 marker={"size": 2.5, "color": colors}))
    fig.update_layout(margin={"l": 0, "r": 0, "t": 0, "b": 0}, height=360,
                      scene={"aspectmode": "data", "bgcolor": "rgb(40, 40, 48)"})  # white points show too
    return fig


def audio_facts(path) -> str:
    """What the app makes of a clip before the encoder sees it: length, rate, channels."""
    import soundfile as sf

    from core.encoders.audio import MAX_SECONDS, RATE
    info = sf.info(str(path))
    notes = [f"{info.duration:.2f} s", f"{info.samplerate} Hz" + (f" (resampled to {RATE // 1000} kHz)" if info.samplerate != RATE else ""),
             "mono" if info.channels == 1 else f"{info.channels} channels (averaged to mono)"]
    if info.duration > MAX_SECONDS:
        notes.append(f"only the first {MAX_SECONDS:.0f} s are heard")
    return " · ".join(notes)


# per kind: tab title, upload label, examples' glob, what the side panel shows, a sample question
TABS = {
    "image": ("Image", "Image (PNG, JPEG, WebP, BMP, GIF, TIFF)", "*.png", "ImageNet classes (EfficientNet-Lite0's own head)",
              "e.g. What color is the shape?"),
    "audio": ("Audio", "Audio clip (WAV, FLAC, OGG, MP3, AIFF; any rate, any channels; up to 30 s)", "*.wav",
              "The clip as the encoder hears it", "e.g. What kind of sound is this?"),
    "points": ("Point Cloud", "Point cloud (.npy, .ply, .pcd, .xyz, .txt; N x 3 or N x 6 xyz+rgb)", "*.npy",
               "What the point encoder's heads see", "e.g. How many objects are there?"),
}


def ask_column(studio: Studio, key: str, adapter_label: str, chat_label: str, placeholder: str):
    """A media tab's right side: the adapters for `key` (a kind, or "mix"), the conversation and
    the question box (elem_ids <key>-adapter, -chat, -message, -send). Returns the adapter list,
    the chatbot, and ask(user_turn, answer, inputs), which wires Enter / Ask / Clear."""
    choices = studio.media_adapters(key, ANYONE)  # the page's load fills in the caller's own
    adapter = gr.Dropdown(choices, value=choices[0] if choices else None, elem_id=f"{key}-adapter", label=adapter_label)
    chatbot = gr.Chatbot(elem_id=f"{key}-chat", height=380, label=chat_label)
    with gr.Row():
        message = gr.Textbox(placeholder=placeholder, show_label=False, scale=6, elem_id=f"{key}-message")
        send = gr.Button("Ask", variant="primary", scale=1, elem_id=f"{key}-send")
        clear = gr.Button("Clear", scale=1)

    def ask(user_turn, answer, inputs):
        for trigger in (message.submit, send.click):
            trigger(user_turn, [message, chatbot], [message, chatbot], show_progress="hidden").success(
                answer, inputs, chatbot, concurrency_limit=4, concurrency_id="chat")
        clear.click(lambda: [], None, chatbot, queue=False)
    return adapter, chatbot, ask


def media_tab(studio: Studio, kind: str, stream_reply, user_turn, max_new):
    """One tab per kind of input: upload or pick an example, see or hear it with what the
    encoder reads, and ask; follow-ups are about the same input. Images can be mixed: a second
    image with a weight (ImageBind-LLM's weighted mix of embeddings)."""
    title, upload_label, pattern, side_label, placeholder = TABS[kind]
    with gr.Tab(title, id=kind):
        with gr.Row():
            with gr.Column(scale=1):
                second = weight = None
                if kind == "image":
                    upload = gr.Image(type="filepath", label=upload_label, elem_id="image-file", height=260)
                    with gr.Accordion("Mix in a second image (optional)", open=False):
                        second = gr.Image(type="filepath", label="Second image", elem_id="image-second", height=160)
                        weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Weight of the second image",
                                           elem_id="image-weight")
                elif kind == "audio":
                    upload = gr.Audio(type="filepath", label=upload_label, elem_id="audio-file")
                else:
                    from core.encoders.points import FORMATS
                    upload = gr.File(label=upload_label, file_types=list(FORMATS), elem_id="points-file")
                examples = sorted(str(p) for p in (EXAMPLES / kind).glob(pattern))
                if examples:
                    gr.Examples([[e] for e in examples], inputs=upload, label="Examples", elem_id=f"{kind}-examples",
                                example_labels=[Path(e).stem for e in examples])
                view = gr.Plot(label="3D view (drag to turn)", elem_id="points-view") if kind == "points" else None
                classes = None
                if kind == "audio":  # Whisper's encoder has no classifier head: what it is given, and YAMNet's classes
                    side = gr.Textbox(label=side_label, interactive=False, elem_id="audio-labels")
                    classes = gr.Label(label="AudioSet classes (YAMNet)", num_top_classes=5, elem_id="audio-classes")
                else:
                    side = gr.Label(label=side_label, num_top_classes=7, elem_id=f"{kind}-labels")
            with gr.Column(scale=2):
                adapter, chatbot, ask = ask_column(studio, kind, f"Adapter (trained on {title.lower()} inputs)",
                                                   f"Ask about the {title.lower()}", placeholder)

        panels = [p for p in (view, side, classes) if p is not None]

        def show(path):
            """A new input: show what the encoder makes of it, and start a new conversation."""
            if not path:
                return (*[None] * len(panels), [])
            try:
                return (*read_for_view(kind, path, view is not None), [])
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None

        def answer(history, path, second_path, second_weight, name, max_new_tokens, request: gr.Request):
            if not name:
                raise gr.Error(f"No {title.lower()} adapter in the registry: train one on {kind} records "
                               "(README: Multimodal) or add one in the Adapters tab.", print_exception=False)
            media = (kind, path)
            if second_path and path:
                media = (kind, [path, second_path], [1.0 - second_weight, second_weight])
            yield from stream_reply(studio, request, history, "", max_new_tokens, 0.0, 1.0, adapter=name, media=media,
                                   repetition_guard=False)

        upload.change(show, upload, [*panels, chatbot])
        extra = [second, weight] if second is not None else [gr.State(None), gr.State(0.0)]
        ask(user_turn, answer, [chatbot, upload, *extra, adapter, max_new])
    return adapter


def mix_tab(studio: Studio, stream_reply, user_turn, max_new):
    """Inputs of different kinds at once, each with its weight, mixed into one embedding
    (ImageBind-LLM's weighted mix) for adapters whose encoder reads them all into one space."""
    from core.encoders.points import FORMATS
    with gr.Tab("Mix", id="mix"):
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("Any of an image, a clip and a point cloud, each with its weight, through an adapter "
                            "trained with `--encoder imagebind` or `--encoder pointbind` (README: ImageBind).")
                image = gr.Image(type="filepath", label="Image", elem_id="mix-image", height=160)
                image_weight = gr.Slider(0, 1, value=1.0, step=0.05, label="Image weight", elem_id="mix-image-weight")
                audio = gr.Audio(type="filepath", label="Audio", elem_id="mix-audio")
                audio_weight = gr.Slider(0, 1, value=1.0, step=0.05, label="Audio weight", elem_id="mix-audio-weight")
                points = gr.File(label="Point cloud", file_types=list(FORMATS), elem_id="mix-points")
                points_weight = gr.Slider(0, 1, value=1.0, step=0.05, label="Point-cloud weight",
                                          elem_id="mix-points-weight")
            with gr.Column(scale=2):
                adapter, chatbot, ask = ask_column(studio, "mix", "Adapter (its encoder reads several kinds into one space)",
                                                   "Ask about them together", "e.g. What is going on here?")

        def answer(history, image_path, image_w, audio_path, audio_w, points_file, points_w, name, max_new_tokens,
                   request: gr.Request):
            if not name:
                raise gr.Error("No adapter here mixes kinds of input: train one with --encoder imagebind "
                               "(or pointbind) on image, audio or point-cloud records.", print_exception=False)
            given = [(k, f, w) for k, f, w in (("image", image_path, image_w), ("audio", audio_path, audio_w),
                                               ("points", points_file, points_w)) if f]
            if not given:
                raise gr.Error("Give at least one input: an image, a clip or a point cloud.", print_exception=False)
            media = ([k for k, _, _ in given], [f for _, f, _ in given], [w for _, _, w in given])
            yield from stream_reply(studio, request, history, "", max_new_tokens, 0.0, 1.0, adapter=name, media=media,
                                   repetition_guard=False)

        ask(user_turn, answer, [chatbot, image, image_weight, audio, audio_weight, points, points_weight, adapter,
                                max_new])
    return adapter


def read_for_view(kind: str, path, with_view: bool):
    """(3D figure,) and the side panel for an input; raises UserError for unusable input."""
    from core.encoders import DEFAULT_ENCODERS, get_encoder
    if kind == "audio":
        from core.encoders.audio import read_audio
        from core.encoders.yamnet import audioset_labels
        wave = read_audio(path)  # the clip's own errors (silent, too short, unreadable) show at once
        try:
            classes = dict(audioset_labels(wave))
        except UserError as e:  # no YAMNet here: the clip is still described
            gr.Warning(str(e))
            classes = None
        return audio_facts(path), classes
    loaded = None
    if kind == "points":
        from core.encoders.points import read_points
        loaded = read_points(path)
    found = None
    try:
        encoder = get_encoder(DEFAULT_ENCODERS[kind])
        found = encoder.labels([encoder.load(loaded if loaded is not None else path)])
    except UserError as e:
        if kind == "image":  # the image's own problem (unreadable, too small)
            raise
        gr.Warning(str(e))  # no encoder weights: the cloud is still drawn
    labels = {name: p for name, p in found[0]} if found else None
    return (cloud_figure(loaded), labels) if with_view else (labels,)
