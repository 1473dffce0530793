"""The HTTP server: our FastAPI app with the OpenAI-compatible API (app.api) at /v1 and the Gradio
page mounted at /, on one port and one engine, and two rules hold for every request before Gradio
sees it:

- Only the intended endpoints are callable by name. Gradio leaves events marked
  `api_visibility="private"` out of its API page but (6.31) still runs them when called by name
  at /gradio_api/call/NAME; here such a call is a 404. The page itself calls its events by
  fn_index, through the queue or (unqueued events) at /gradio_api/run/predict, and every
  handler there that changes shared state checks the caller's role (`app.access`).
- Each browser gets a random `studio_visitor` cookie, so that a visitor's jobs and adapters stay
  theirs across page reloads (where a browser refuses the cookie, the session is the identity).
"""
from __future__ import annotations

import re
import secrets
import threading

import fastapi
from starlette.responses import JSONResponse

from app.access import VISITOR_COOKIE, VISITOR_ID

BY_NAME = re.compile(r"^/gradio_api/(?:call/v2|call|run|api)/([^/]+)")


def private_events(demo, public: set[str]):
    """Every event of the page but `public` (api names) becomes private: not listed, and (with
    `create_app`'s rule) not callable by name."""
    for fn in demo.fns.values():
        if fn.api_name not in public:
            fn.api_visibility = "private"


def create_app(demo, public: set[str], max_file_size: int | None = None, allowed_paths: list[str] | None = None,
               secure_cookies: bool = False, api: fastapi.APIRouter | None = None) -> fastapi.FastAPI:
    """The server: `api` (the OpenAI-compatible routes, app.api) and the Gradio page `demo`
    mounted at / (None: the API alone, headless)."""
    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if api is not None:
        from app.api import APIError
        app.include_router(api)
        app.add_exception_handler(APIError, lambda request, e: e.response())
    listed = ", ".join(f"/{name}" for name in sorted(public)) + (" and /v1 (OpenAI-compatible)" if api is not None else "")

    @app.middleware("http")
    async def rules(request: fastapi.Request, call_next):
        named = BY_NAME.match(request.url.path)
        if named and named.group(1) not in public and named.group(1) != "predict":
            return JSONResponse({"error": f"no endpoint /{named.group(1)}; this server's API: {listed}"},
                                status_code=404)
        response = await call_next(request)
        if not VISITOR_ID.fullmatch(request.cookies.get(VISITOR_COOKIE, "")):
            # inside a Space the page is a cross-site iframe: its cookie must say SameSite=None; Secure
            response.set_cookie(VISITOR_COOKIE, secrets.token_hex(16), max_age=30 * 86400, httponly=True,
                                samesite="none" if secure_cookies else "lax", secure=secure_cookies)
        return response

    if demo is None:
        return app
    import gradio as gr
    private_events(demo, public)
    return gr.mount_gradio_app(app, demo, path="/", max_file_size=max_file_size, allowed_paths=allowed_paths,
                               show_error=True, footer_links=["api", "gradio", "settings"])


def serve(app: fastapi.FastAPI, host: str, port: int, share: bool = False):
    """Run `app` until interrupted; with `share`, also through a gradio.live link (needs the internet)."""
    import uvicorn
    # open event streams (a client's SSE) would hold a graceful shutdown forever: give them 3 s
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3))
    if share:
        def tunnel():
            while not server.started:
                threading.Event().wait(0.1)
            from gradio.networking import setup_tunnel
            try:
                url = setup_tunnel(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port,
                                   secrets.token_urlsafe(32), None, None)
                print(f"* Running on public URL: {url}", flush=True)
            except Exception as e:  # no internet here: say so, keep serving locally
                print(f"* No share link: {e}", flush=True)
        threading.Thread(target=tunnel, daemon=True).start()
    print(f"* Running on local URL:  http://{host}:{port}", flush=True)
    server.run()
