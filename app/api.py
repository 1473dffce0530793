"""The OpenAI-compatible HTTP API, on the app's own port, engine and queue: the convention that
llama.cpp's server, Ollama, vLLM and LM Studio follow, so any OpenAI client talks to the studio.

- GET /v1/models: the base model and each usable adapter as BASE:ADAPTER (e.g. smollm2:pirate).
- POST /v1/chat/completions: messages (text, and for media adapters `image_url`
  data URLs and `input_audio` parts), temperature, top_p, max_tokens, stop, seed, n=1, stream
  (SSE `data:` chunks ending in [DONE]; `stream_options.include_usage` adds the usage chunk);
  `ignore_eos` (vLLM's and llama.cpp's extension) runs a reply to max_tokens.
- POST /v1/completions: a raw prompt, the same options.

Sampling defaults to the model's own, with the repetition guard (core.generation.model_sampling).
Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}}) with its status codes:
400 a bad request, 401 a missing or wrong key, 404 an unknown model, 413 too large, 429 over a
limit. With STUDIO_API_KEY set every call needs `Authorization: Bearer KEY`. The hosting rules hold:
a caller is a visitor (limits, published adapters) unless it sends the owner's token header.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import fastapi
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from app.studio import Studio
from core.chat_format import render
from core.errors import LimitError, TooLargeError, UserError
from core.generation import model_sampling
from core.serving import chat_setup

MAX_BODY_MB = 48  # a request body: room for a visitor's 25 MB file in base64
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
               "image/bmp": ".bmp"}
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)

    @classmethod
    def of(cls, e: UserError) -> "APIError":
        if isinstance(e, LimitError):
            return cls(429, str(e), "rate_limit_error", "rate_limit_exceeded")
        if isinstance(e, TooLargeError):
            return cls(413, str(e), code="too_large")
        return cls(400, str(e))


def model_id(studio: Studio) -> str:
    """The base model's name in the API: `smollm2`, or a checkpoint's file or folder name."""
    name = studio.lm.name
    return Path(name).name.removesuffix(".gguf") if "/" in name or name.endswith(".gguf") else name


def router(studio: Studio, api_key: str | None = None) -> fastapi.APIRouter:
    api = fastapi.APIRouter(prefix="/v1")
    base = model_id(studio)
    lm, access = studio.lm, studio.access

    async def checked(request: fastapi.Request) -> tuple[dict, object]:
        """The request's JSON body and caller, after the key and the size limit."""
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer <STUDIO_API_KEY>",
                               code="invalid_api_key")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_MB * 2**20:
                raise APIError(413, f"the request body is over {MAX_BODY_MB} MB; accepted: up to {MAX_BODY_MB} MB",
                               code="too_large")
        try:
            data = json.loads(body) if body else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}; accepted: a JSON object") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        caller = access.caller(request)  # API calls have no browser session: the address is theirs
        return data, dataclasses.replace(caller, session=f"api:{caller.ip}")

    def resolve(name, caller):
        """The adapter a model id names (None: the base)."""
        if name == base:
            return None
        if not isinstance(name, str) or not name.startswith(base + ":"):
            raise APIError(404, f"the model {name!r} does not exist; accepted: {base} or {base}:ADAPTER (GET /v1/models)",
                           code="model_not_found", param="model")
        try:
            return studio.adapter_for(name[len(base) + 1:], caller)
        except UserError:
            raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists them",
                           code="model_not_found", param="model") from None

    def sampling(data: dict, prompt_tokens: int, stops: list[str], caller, default_max: int | None):
        if data.get("n", 1) != 1:
            raise APIError(400, f"n={data.get('n')}: this server makes one choice per request; accepted: n=1", param="n")
        room = lm.model.args.max_seq_len - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens; this model's context is "
                           f"{lm.model.args.max_seq_len}", code="context_length_exceeded", param="messages")
        limit = room if caller.is_owner else min(room, access.limits.max_new_tokens)
        max_tokens = data.get("max_completion_tokens", data.get("max_tokens")) or default_max or limit
        stop = data.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(max_tokens, int) or not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "max_tokens must be an integer and stop a string or a list of strings")
        try:
            params = model_sampling(lm, max_new_tokens=min(max_tokens, room), stop=stops + stop,
                                    temperature=data.get("temperature"), top_p=data.get("top_p"), seed=data.get("seed"),
                                    ignore_eos=bool(data.get("ignore_eos", False)))
            params.validate()
        except (TypeError, UserError) as e:
            raise APIError(400, f"bad sampling options: {e}") from None
        return params

    def run(data, caller, ids, params, adapter, condition, question, kind):
        """Submit, then answer: the whole text, or an SSE stream of chunks."""
        try:
            access.admit(caller, question, params.max_new_tokens, studio.engine.in_flight(caller.session, caller.ip))
            reply = studio.submit(ids, params, caller, adapter, condition)
        except UserError as e:
            raise APIError.of(e) from None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "created": int(time.time()), "model": data["model"]}

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": reply.tokens, "total_tokens": len(ids) + reply.tokens}

        def choice(**fields):
            return {"index": 0, "logprobs": None, **fields}

        if not data.get("stream"):
            text = "".join(studio.deltas(reply))
            made = (choice(message={"role": "assistant", "content": text}, finish_reason=reply.finish_reason)
                    if kind == "chat" else choice(text=text, finish_reason=reply.finish_reason))
            return JSONResponse({**head, "object": "chat.completion" if kind == "chat" else "text_completion",
                                 "choices": [made], "usage": usage()})

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        def event(**payload):
            return f"data: {json.dumps({**head, 'object': obj, **payload})}\n\n"

        def piece(text=None, finish=None):
            if kind == "chat":
                return choice(delta={} if text is None else {"content": text}, finish_reason=finish)
            return choice(text=text or "", finish_reason=finish)

        def events():
            if kind == "chat":
                yield event(choices=[choice(delta={"role": "assistant", "content": ""}, finish_reason=None)])
            try:
                for delta in studio.deltas(reply):
                    yield event(choices=[piece(delta)])
            except UserError as e:  # the request failed in the engine: say so in the stream
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
                return
            yield event(choices=[piece(finish=reply.finish_reason)])
            if include_usage:
                yield event(choices=[], usage=usage())
            yield "data: [DONE]\n\n"
        return StreamingResponse(iterate_in_threadpool(events()), media_type="text/event-stream")

    @api.get("/models")
    async def models(request: fastapi.Request):
        _, caller = await checked(request)
        entries = [(base, 0)] + [(f"{base}:{e.name}", int(e.path.stat().st_mtime)) for e in studio.entries(caller)
                                 if e.problem is None]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "studio"}
                                           for name, created in entries]}

    @api.post("/chat/completions")
    async def chat_completions(request: fastapi.Request):
        data, caller = await checked(request)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
        adapter = resolve(data.get("model"), caller)
        folder = Path(tempfile.mkdtemp(prefix="studio-api-"))
        try:
            system, turns, media = read_messages(messages, folder)
            fmt, default_system, stops = chat_setup(lm, adapter)
            question = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
            try:
                condition = await run_in_threadpool(studio.condition, adapter, media, question, caller) if media else None
            except UserError as e:
                raise APIError.of(e) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        ids = lm.tokenizer.encode(render(fmt, turns, system if system is not None else default_system))
        params = sampling(data, len(ids), stops, caller, None)
        return run(data, caller, ids, params, adapter, condition, question, "chat")

    @api.post("/completions")
    async def completions(request: fastapi.Request):
        data, caller = await checked(request)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
        adapter = resolve(data.get("model"), caller)
        ids = lm.tokenizer.encode(prompt)
        params = sampling(data, len(ids), [], caller, 16)  # OpenAI's default for completions
        return run(data, caller, ids, params, adapter, None, prompt, "completion")

    return api


def read_messages(messages: list, folder: Path) -> tuple[str | None, list[dict], tuple | None]:
    """OpenAI messages -> (system prompt or None, user/assistant turns, media for Studio.condition).
    Media parts are written into `folder`: images from `image_url` data URLs, clips from `input_audio`."""
    system, turns, kinds, files = None, [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role must be system, developer, user or assistant", param="messages")
        content = m.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        text = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind == "image_url":
                files.append(_data_url_file((part.get("image_url") or {}).get("url", ""), folder, len(files)))
                kinds.append("image")
            elif kind == "input_audio":
                files.append(_audio_file(part.get("input_audio") or {}, folder, len(files)))
                kinds.append("audio")
            else:
                raise APIError(400, f"messages[{i}]: content part type {kind!r}; accepted: text, image_url, input_audio",
                               param="messages")
        if m["role"] in ("system", "developer"):
            system = "\n".join(text)
        else:
            turns.append({"role": m["role"], "content": "\n".join(text)})
    if not turns or turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    media = None
    if files:
        media = (kinds[0], files) if len(set(kinds)) == 1 else (kinds, files, [1.0] * len(files))
    return system, turns, media


def _decode(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what} is not valid base64") from None


def _data_url_file(url: str, folder: Path, n: int) -> str:
    if not url.startswith("data:"):
        raise APIError(400, "image_url must be a data: URL (data:image/png;base64,...); this server fetches no URLs",
                       param="messages")
    header, _, payload = url[5:].partition(",")
    mime = header.split(";")[0]
    if mime not in IMAGE_TYPES or not header.endswith(";base64"):
        raise APIError(400, f"image type {mime!r}; accepted: base64 data URLs of {', '.join(IMAGE_TYPES)}",
                       param="messages")
    path = folder / f"image-{n}{IMAGE_TYPES[mime]}"
    path.write_bytes(_decode(payload, "the image data"))
    return str(path)


def _audio_file(audio: dict, folder: Path, n: int) -> str:
    fmt = audio.get("format")
    if fmt not in AUDIO_FORMATS:
        raise APIError(400, f"input_audio format {fmt!r}; accepted: {', '.join(AUDIO_FORMATS)}", param="messages")
    path = folder / f"audio-{n}.{fmt}"
    path.write_bytes(_decode(audio.get("data", ""), "the audio data"))
    return str(path)
