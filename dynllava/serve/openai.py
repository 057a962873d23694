"""OpenAI-compatible HTTP API over the Engine: /v1/chat/completions (with image_url parts, streaming as SSE),
/v1/completions, /v1/models, /health, /metrics. Every user error is a 4xx in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dynllava.errors import DynLlavaError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request
from dynllava.serve.bridge import Delta, EngineLoop
from dynllava.serve.media import MediaError, load_image_url
from dynllava.serve.metrics import Metrics


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    allowed_media_dir: Path | None = None
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_waiting: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------------- request parsing
def _params(body: dict, cfg: ServerConfig) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", cfg.default_max_tokens))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise APIError(400, f"max_tokens must be an integer in [1, {cfg.max_tokens_limit}], got {max_tokens!r}",
                       "max_tokens")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    kwargs = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
              "top_k": body.get("top_k", 0), "repetition_penalty": body.get("repetition_penalty", 1.0),
              "seed": body.get("seed"), "stop": tuple(stop), "ignore_eos": bool(body.get("ignore_eos", False))}
    for key in ("temperature", "top_p", "repetition_penalty"):
        if kwargs[key] is None:
            kwargs[key] = 1.0
    try:
        return SamplingParams(max_new_tokens=max_tokens, **kwargs)
    except DynLlavaError as exc:
        name = str(exc).split("invalid sampling parameter ")[-1].split("=")[0]
        raise APIError(400, exc.message, name if name in kwargs else None) from exc


def _messages(body: dict, cfg: ServerConfig) -> tuple[list[dict[str, str]], Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out, image = [], None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    if image is not None:
                        raise APIError(400, "LLaVA-1.5 takes at most one image per conversation", "messages")
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    try:
                        image = load_image_url(url, cfg.allowed_media_dir, cfg.max_image_bytes, cfg.max_image_pixels)
                    except MediaError as exc:
                        raise APIError(exc.status, str(exc), "messages") from exc
                else:
                    raise APIError(400, f"messages[{i}] has an unsupported content part {kind!r} (text, image_url)",
                                   "messages")
            text = "\n".join(texts)
        else:
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        if msg["role"] != "system":  # LLaVA-1.5's template has its own fixed system prompt
            out.append({"role": msg["role"], "content": text})
    return out, image


# ---------------------------------------------------------------------- the app
def build_app(engine: Engine, cfg: ServerConfig) -> FastAPI:
    metrics = Metrics(engine)
    loop = EngineLoop(engine, on_token=metrics.on_token, on_finish=metrics.on_finish)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="dynllava", version="1", lifespan=lifespan)
    app.state.engine, app.state.loop, app.state.metrics = engine, loop, metrics

    @app.exception_handler(APIError)
    async def _api_error(_: HttpRequest, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        if request.url.path.startswith("/v1/"):
            if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                return _error(401, "invalid or missing API key (Authorization: Bearer KEY)",
                              kind="authentication_error")
            size = request.headers.get("content-length")
            if size and size.isdigit() and int(size) > cfg.max_body_bytes:
                return _error(413, f"request body larger than {cfg.max_body_bytes} bytes")
        return await call_next(request)

    async def _body(request: HttpRequest) -> dict:
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body larger than {cfg.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def _first(queue: asyncio.Queue) -> Delta:
        delta = await queue.get()
        if delta.error is not None:
            raise APIError(400, str(delta.error))
        return delta

    async def _run(request: HttpRequest, gen_request: Request, chat: bool):
        if loop.waiting >= cfg.max_waiting:
            raise APIError(429, "the server is busy; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        body_stream = getattr(request.state, "stream", False)
        rid = gen_request.request_id
        queue = loop.submit(gen_request)
        first = await _first(queue)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body_stream:
            return StreamingResponse(_sse(request, queue, first, rid, created, chat), media_type="text/event-stream")
        text, delta = first.text, first
        while delta.output is None:
            try:
                delta = await asyncio.wait_for(queue.get(), timeout=0.5)
                text += delta.text
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    loop.cancel(rid)
                    return Response(status_code=499)
        out = delta.output
        choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": _reason(out)}
                  if chat else {"index": 0, "text": out.text, "finish_reason": _reason(out)})
        return {"id": rid, "object": kind, "created": created, "model": cfg.model_name, "choices": [choice],
                "usage": _usage(out)}

    async def _sse(request: HttpRequest, queue: asyncio.Queue, first: Delta, rid: str, created: int,
                   chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": cfg.model_name,
                                          "choices": [choice]}) + "\n\n"

        finished = False
        try:
            if chat:
                yield chunk(None, None, role=True)
            delta = first
            while True:
                if delta.text:
                    yield chunk(delta.text, None)
                if delta.output is not None:
                    finished = True
                    yield chunk(None, _reason(delta.output))
                    yield "data: [DONE]\n\n"
                    return
                delta = await queue.get()
        finally:
            if not finished:  # the client went away: free its blocks
                loop.cancel(rid)

    def _request(body: dict, request: HttpRequest, chat: bool) -> Request:
        request.state.stream = bool(body.get("stream", False))
        params = _params(body, cfg)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if chat:
            messages, image = _messages(body, cfg)
            if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
                raise APIError(400, "the conversation must start and end with a user message", "messages")
            return Request(messages=messages, image=image, params=params, request_id=rid)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", "prompt")
        return Request(prompt=prompt, params=params, request_id=rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _run(request, _request(await _body(request), request, chat=True), chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _run(request, _request(await _body(request), request, chat=False), chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dynllava"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.scheduler.running), "waiting": loop.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _reason(out) -> str:
    return {"cancelled": "stop"}.get(out.finish_reason, out.finish_reason)


def _usage(out) -> dict[str, int]:
    return {"prompt_tokens": out.stats.prompt_tokens, "completion_tokens": out.stats.generated_tokens,
            "total_tokens": out.stats.prompt_tokens + out.stats.generated_tokens}
