"""The media tabs: ask about an uploaded (or example) input through an adapter trained on that
kind of input, whose bind network adds the encoder's embedding to the adaption prompts."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

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


def points_tab(studio: Studio, stream_reply, user_turn, max_new):
    from core.encoders.points import FORMATS, read_points
    kind = "points"
    with gr.Tab("Point Cloud", id="points"):
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Point cloud (" + ", ".join(FORMATS) + "; N x 3 or N x 6 xyz+rgb)",
                                 file_types=list(FORMATS), elem_id="points-file")
                examples = sorted(str(p) for p in (EXAMPLES / "points").glob("*.npy"))
                if examples:
                    gr.Examples([[e] for e in examples], inputs=upload, label="Examples (generated scenes)")
                view = gr.Plot(label="3D view (drag to turn)", elem_id="points-view")
                labels = gr.Label(label="What the point encoder's heads see", num_top_classes=7,
                                  elem_id="points-labels")
            with gr.Column(scale=2):
                choices = studio.media_adapters(kind)
                adapter = gr.Dropdown(choices, value=choices[0] if choices else None, elem_id="points-adapter",
                                      label="Adapter (with a bind network for point clouds)")
                chatbot = gr.Chatbot(elem_id="points-chat", height=380, label="Ask about the cloud")
                with gr.Row():
                    message = gr.Textbox(placeholder="e.g. How many objects are there?", show_label=False, scale=6,
                                         elem_id="points-message")
                    send = gr.Button("Ask", variant="primary", scale=1, elem_id="points-send")
                    clear = gr.Button("Clear", scale=1)

        def show(path):
            """A new cloud: draw it, read it with the encoder's heads, and start a new conversation."""
            if not path:
                return None, None, []
            try:
                points = read_points(path)
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None
            found = None
            try:
                from core.encoders import DEFAULT_ENCODERS, get_encoder
                encoder = get_encoder(DEFAULT_ENCODERS[kind])
                found = encoder.labels([encoder.load(points)])
            except UserError as e:  # no encoder weights: the cloud is still drawn
                gr.Warning(str(e))
            return cloud_figure(points), ({name: p for name, p in found[0]} if found else None), []

        def answer(history, path, name, max_new_tokens, request: gr.Request):
            if not name:
                raise gr.Error("No point-cloud adapter in the registry: train one on points records "
                               "(README: Multimodal) or add one in the Adapters tab.", print_exception=False)
            yield from stream_reply(studio, request, history, "", max_new_tokens, 0.0, 1.0, adapter=name,
                                    media=(kind, path))

        upload.change(show, upload, [view, labels, chatbot])
        for trigger in (message.submit, send.click):
            trigger(user_turn, [message, chatbot], [message, chatbot], show_progress="hidden").success(
                answer, [chatbot, upload, adapter, max_new], chatbot, concurrency_limit=4, concurrency_id="chat")
        clear.click(lambda: [], None, chatbot, queue=False)
    return adapter
