"""OpenAI-compatible HTTP API over the Engine: /v1/chat/completions (with image_url parts, streaming as SSE),
/v1/completions, /v1/models, /v1/models/{id}, /health, /metrics, and the chat page at / (serve/page.py).

One extension, only when a request asks for it with `"dynllava": {"explain": true}`: each choice (its last SSE
chunk when streaming) carries a `dynllava` object with what the predictors kept (dynllava/explain.py:
`Explanation.to_dict`): kept image token indices and the grid, per-token kept flags, KV bytes held vs dense.
Without the field the answers are exactly OpenAI's shape.

Every error, on every route and status, is OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`),
never a Python traceback. Fields this server does not implement are refused with a 400 that names them (or accepted
only at their no-op value, e.g. `tools: []`), never ignored. A client that goes away, streaming or not,
cancels its request; an engine fault fails only the requests of that step (500 JSON, or an SSE error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dynllava.errors import DynLlavaError
from dynllava.explain import explain
from dynllava.runtime.engine import Engine
from dynllava.runtime.processor import MAX_ASPECT_RATIO
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request, RequestOutput
from dynllava.serve.bridge import Delta, EngineLoop, RequestError, TokenLogprob
from dynllava.serve.media import MediaError, load_image_url
from dynllava.serve.metrics import Metrics
from dynllava.serve.page import add_chat_page

log = logging.getLogger("dynllava.serve")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    allowed_media_dir: Path | None = None
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096  # decoded, and padded to a square as LLaVA does (max(w, h)^2)
    max_image_aspect: float = MAX_ASPECT_RATIO
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_waiting: int = 256  # requests queued (not yet running) before new ones get 429
    max_choices: int = 16  # n x prompts in one request
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    max_prompt_chars: int = 256 * 1024  # text per request, refused before it is tokenized (on the engine thread)
    image_decoders: int = 4  # images decoded at once, in threads (off the event loop)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.status, self.message, self.param, self.kind, self.headers, self.code = \
            status, message, param, kind, headers, code


def _error(status: int, message: str, param: str | None = None, kind: str | None = None,
           headers: dict | None = None, code: str | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _error_event(status: int, message: str) -> str:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return "data: " + json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}) + \
        "\n\n"


# ---------------------------------------------------------------------- request parsing
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
           "top_k", "repetition_penalty", "ignore_eos",  # vLLM's extras
           "dynllava"}  # ours: {"explain": true}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


# OpenAI features this server does not implement: accepted only at the value that asks for nothing
_ONLY_DEFAULT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (lambda v: v is None or v == {"type": "text"}, '{"type": "text"} (no JSON mode)'),
    "tools": (lambda v: v is None or v == [], "empty (no tool calling)"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), '"none" (no tool calling)'),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "functions": (lambda v: v is None or v == [], "empty (no function calling)"),
    "function_call": (lambda v: v in (None, "none", "auto"), '"none" (no function calling)'),
    "echo": (lambda v: v in (None, False), "false"),
    "suffix": (lambda v: v in (None, ""), "empty (no insertion)"),
    "best_of": (lambda v: v is None or type(v) is int and v == 1, "1 (use n)"),
}
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingParams names -> API fields


@dataclass
class Job:
    """One HTTP request: its engine requests (n choices per prompt), and how to answer."""

    rid: str
    chat: bool
    requests: list[Request]
    prompts: int
    stream: bool
    include_usage: bool
    logprobs: bool
    image_url: str | None = None
    texts: list[str] = field(default_factory=list)
    explain: bool = False  # "dynllava": {"explain": true}: each choice carries a `dynllava` object
    image_size: tuple[int, int] | None = None  # the decoded image's (width, height)


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported field {unknown[0]!r}: this server does not implement it", unknown[0])
    for name, (ok, what) in _ONLY_DEFAULT.items():
        if name in body and not ok(body[name]):
            raise APIError(400, f"{name}={body[name]!r} is not supported: this server accepts only {what}", name)


def _optional(body: dict, name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise APIError(400, f"{name} must be {what}, got {value!r}", name)
    return value


def _utf8(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{where} is not valid Unicode text (a lone surrogate at {exc.start})", where) from exc
    return text


def _params(body: dict, cfg: ServerConfig, chat: bool) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else \
        body.get("max_tokens")
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    if type(max_tokens) is not int or not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise APIError(400, f"max_tokens must be null or an integer in [1, {cfg.max_tokens_limit}], got "
                            f"{max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop) > cfg.max_stop or any(len(s) > cfg.max_stop_chars for s in stop):
        raise APIError(400, f"at most {cfg.max_stop} stop strings of at most {cfg.max_stop_chars} characters",
                       "stop")
    for s in stop:
        _utf8(s, "stop")
    top_k = body.get("top_k")
    kwargs = {"temperature": body.get("temperature"), "top_p": body.get("top_p"),
              "top_k": 0 if top_k in (None, -1) else top_k,  # vLLM: -1 = off
              "repetition_penalty": body.get("repetition_penalty"), "seed": body.get("seed"), "stop": tuple(stop),
              "ignore_eos": body.get("ignore_eos"), "frequency_penalty": body.get("frequency_penalty"),
              "presence_penalty": body.get("presence_penalty"), "logit_bias": _logit_bias(body.get("logit_bias"))}
    for key, default in (("temperature", 1.0), ("top_p", 1.0), ("repetition_penalty", 1.0), ("ignore_eos", False),
                         ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        if kwargs[key] is None:
            kwargs[key] = default
    logprobs = body.get("logprobs")
    if chat:
        if logprobs not in (None, True, False):
            raise APIError(400, f"logprobs must be true or false, got {logprobs!r}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        kwargs["logprobs"] = (top or 0) if logprobs else None
    else:
        kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(max_new_tokens=max_tokens, **kwargs)
    except DynLlavaError as exc:
        name = exc.message.split("invalid sampling parameter ")[-1].split("=")[0]
        name = "top_logprobs" if chat and name == "logprobs" else _PARAM_NAMES.get(name, name)
        raise APIError(400, exc.message.replace("invalid sampling parameter ", "invalid "), name) from exc


def _logit_bias(value: Any) -> tuple[tuple[int, Any], ...]:
    """OpenAI's {"token id": bias} (ids as strings, as JSON keys are) as (id, bias) pairs; SamplingParams checks the
    rest."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() for k in value):
        raise APIError(400, 'logit_bias must map token ids (as strings, e.g. {"50256": -100}) to numbers',
                       "logit_bias")
    return tuple((int(k), v) for k, v in value.items())


def _messages(body: dict) -> tuple[list[dict[str, str]], str | None]:
    """The conversation as (role, text) turns, and the image URL if any."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out, image = [], None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{where} must be an object", "messages")
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}.role {role!r} is not supported (system, developer, user, assistant; no "
                                "tool calling)", "messages")
        extra = sorted(set(msg) - {"role", "content", "name"} - ({"refusal"} if role == "assistant" else set()))
        if extra:
            raise APIError(400, f"{where}.{extra[0]} is not supported", "messages")
        content = msg.get("content")
        if isinstance(content, str):
            text = _utf8(content, f"{where}.content")
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
                    texts.append(_utf8(part["text"], f"{where}.content[{j}].text"))
                elif kind == "image_url" and role == "user" and set(part) <= {"type", "image_url"}:
                    if image is not None:
                        raise APIError(400, "LLaVA-1.5 takes at most one image per conversation", "messages")
                    url = part.get("image_url")
                    if isinstance(url, dict):
                        if not set(url) <= {"url", "detail"} or url.get("detail") not in (None, "auto", "low",
                                                                                           "high"):
                            raise APIError(400, f"{where}.content[{j}].image_url takes url and detail "
                                                "(auto, low, high)", "messages")
                        url = url.get("url")
                    if not isinstance(url, str):
                        raise APIError(400, f"{where}.content[{j}].image_url.url must be a string", "messages")
                    image = url
                else:
                    raise APIError(400, f"{where}.content[{j}] is not a supported content part (text; image_url in "
                                        "user messages)", "messages")
            text = "\n".join(texts)
        else:
            raise APIError(400, f"{where}.content must be a string or a list of parts", "messages")
        if role in ("user", "assistant"):  # LLaVA-1.5's template has its own fixed system prompt
            out.append({"role": role, "content": text})
    if not out or out[0]["role"] != "user" or out[-1]["role"] != "user":
        raise APIError(400, "the conversation must start and end with a user message", "messages")
    return out, image


def _prompts(body: dict, cfg: ServerConfig) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise APIError(400, "prompt must be a non-empty string or a list of non-empty strings (token ids are not "
                            "supported)", "prompt")
    return [_utf8(p, "prompt") for p in prompts]


def _extension(body: dict) -> bool:
    """The `dynllava` request object: {"explain": true|false}; returns explain."""
    ext = body.get("dynllava")
    if ext is None:
        return False
    if not isinstance(ext, dict) or set(ext) - {"explain"} or type(ext.get("explain")) not in (type(None), bool):
        raise APIError(400, f"dynllava must be an object like {{\"explain\": true}}, got {json.dumps(ext)[:80]}",
                       "dynllava")
    return bool(ext.get("explain"))


def parse_job(body: dict, cfg: ServerConfig, chat: bool) -> Job:
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    explain = _extension(body)
    model = body.get("model")
    if model is not None and model != cfg.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {cfg.model_name!r}", "model",
                       code="model_not_found")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = _optional(body, "stream_options", dict, "an object")
    if options is not None:
        if not stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if set(options) - {"include_usage"} or options.get("include_usage") not in (None, True, False):
            raise APIError(400, "stream_options takes include_usage (true or false) only", "stream_options")
    _optional(body, "user", str, "a string")
    n = body.get("n")
    n = 1 if n is None else n
    params = _params(body, cfg, chat)
    if chat:
        messages, image = _messages(body)
        texts = []
    else:
        messages, image, texts = None, None, _prompts(body, cfg)
    prompts = 1 if chat else len(texts)
    if type(n) is not int or not 1 <= n or n * prompts > cfg.max_choices:
        raise APIError(400, f"n must be an integer >= 1 with n x prompts <= {cfg.max_choices}, got n={n!r}", "n")
    chars = sum(len(m["content"]) for m in messages) if chat else max(map(len, texts))
    if chars > cfg.max_prompt_chars:
        raise APIError(400, f"the prompt has {chars} characters; at most {cfg.max_prompt_chars} are accepted (and "
                            "the model's context is shorter still)", "messages" if chat else "prompt")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    requests = []
    for p in range(prompts):
        for i in range(n):
            choice = p * n + i
            seed = params.seed if params.seed is None or n == 1 else params.seed + i  # choice i: seed + i
            try:
                choice_params = params if seed == params.seed else dataclasses.replace(params, seed=seed)
            except DynLlavaError as exc:
                raise APIError(400, exc.message, "seed") from exc
            requests.append(Request(prompt=None if chat else texts[p], messages=messages, params=choice_params,
                                    request_id=rid if n * prompts == 1 else f"{rid}-{choice}"))
    return Job(rid, chat, requests, prompts, bool(stream), bool(options and options.get("include_usage")),
               params.logprobs is not None, image, texts, explain)


# ---------------------------------------------------------------------- answers
def _reason(out: RequestOutput) -> str:
    return {"cancelled": "stop"}.get(out.finish_reason, out.finish_reason)


def _usage(outputs: list[RequestOutput], n: int) -> dict[str, Any]:
    firsts = [o for i, o in enumerate(outputs) if i % n == 0]  # each prompt once
    prompt = sum(o.stats.prompt_tokens for o in firsts)
    completion = sum(o.stats.generated_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            # OpenAI's field: prompt tokens taken from the prefix cache (`serve --prefix-cache-mb`)
            "prompt_tokens_details": {"cached_tokens": sum(o.stats.cached_tokens for o in firsts)}}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in e.top]}
                        for e in entries]}


def _completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


# ---------------------------------------------------------------------- the app
class _Guard:
    """Pure ASGI (it keeps `receive` untouched, so disconnects are seen): API key and body size on /v1/ routes."""

    def __init__(self, app, cfg: ServerConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = Headers(scope=scope)
            if self.cfg.api_key and not _authorized(headers.get("authorization"), self.cfg.api_key):
                response = _error(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  kind="authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
            size = headers.get("content-length")
            if size and size.isdigit() and int(size) > self.cfg.max_body_bytes:
                response = _error(413, f"request body larger than {self.cfg.max_body_bytes} bytes")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _authorized(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def build_app(engine: Engine, cfg: ServerConfig) -> FastAPI:
    loop = EngineLoop(engine)
    metrics = Metrics(engine, stats=lambda: loop.stats)
    loop.on_token, loop.on_finish, loop.on_error = metrics.on_token, metrics.on_finish, metrics.on_error
    decoders = asyncio.Semaphore(cfg.image_decoders)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()  # whatever is still running (after the server's drain) is cancelled and its KV freed

    app = FastAPI(title="dynllava", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.loop, app.state.metrics = engine, loop, metrics
    app.add_middleware(_Guard, cfg=cfg)

    @app.exception_handler(APIError)
    async def _api_error(_: HttpRequest, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.headers, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_: HttpRequest, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__}); the server logged the details")

    async def _body(request: HttpRequest) -> dict:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():  # bounded even without a Content-Length (chunked bodies)
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise APIError(413, f"request body larger than {cfg.max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect as exc:  # nobody will read the answer
            raise APIError(400, "the client went away before sending the whole body") from exc
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def _image(url: str):
        async with decoders:  # a few at a time, in threads: decoding must not stall the event loop
            try:
                return await asyncio.to_thread(load_image_url, url, cfg.allowed_media_dir, cfg.max_image_bytes,
                                               cfg.max_image_pixels, cfg.max_image_aspect,
                                               engine.image_aspect_ratio == "pad")
            except MediaError as exc:
                raise APIError(exc.status, str(exc), "messages") from exc

    async def _watch_disconnect(request: HttpRequest, rids: list[str]) -> None:
        """Cancel the job's requests when the client goes away (non-streaming, and streaming before the first
        chunk; a started stream notices on its next write)."""
        with contextlib.suppress(Exception):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    for rid in rids:
                        loop.cancel(rid)
                    return

    async def _run(request: HttpRequest, chat: bool):
        job = parse_job(await _body(request), cfg, chat)
        if loop.waiting + len(job.requests) > cfg.max_waiting:
            metrics.rejected.labels("429").inc()
            raise APIError(429, "the server is busy; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        if job.image_url is not None:
            image = await _image(job.image_url)
            job.image_size = image.size
            for r in job.requests:
                r.image = image
        out: asyncio.Queue = asyncio.Queue()
        rids = [r.request_id for r in job.requests]
        try:
            for i, r in enumerate(job.requests):
                loop.submit(r, out, i)
        except RequestError as exc:
            for rid in rids:
                loop.cancel(rid)
            metrics.rejected.labels(str(exc.status)).inc()
            raise APIError(exc.status, exc.message) from exc
        watcher = asyncio.create_task(_watch_disconnect(request, rids))
        handed_over = False
        try:
            if job.stream:
                first = await _first(out, len(rids))
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                handed_over = True
                return StreamingResponse(_sse(job, out, first, rids), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await _collect(job, out)
        finally:
            watcher.cancel()
            if not handed_over:  # an error, a cancelled handler (shutdown): nothing may keep running
                for rid in rids:
                    loop.cancel(rid)

    async def _first(out: asyncio.Queue, count: int) -> list[Delta]:
        """Wait until every choice has produced something (so a refusal is still an HTTP status)."""
        buffered, seen = [], set()
        while len(seen) < count:
            delta = await out.get()
            if delta.error is not None:
                raise APIError(delta.error.status, delta.error.message)
            buffered.append(delta)
            seen.add(delta.index)
        return buffered

    def _explained(job: Job, output: RequestOutput) -> dict:
        return explain(output, engine.tokenizer, job.image_size, engine.image_processor,
                       engine.image_aspect_ratio).to_dict()

    async def _collect(job: Job, out: asyncio.Queue) -> dict:
        count = len(job.requests)
        outputs: dict[int, RequestOutput] = {}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(count)}
        while len(outputs) < count:
            delta = await out.get()
            if delta.error is not None:
                raise APIError(delta.error.status, delta.error.message)
            if delta.logprob is not None:
                logprobs[delta.index].append(delta.logprob)
            if delta.output is not None:
                outputs[delta.index] = delta.output
        choices = []
        for i in range(count):
            o = outputs[i]
            if job.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                                "logprobs": _chat_logprobs(logprobs[i]) if job.logprobs else None,
                                "finish_reason": _reason(o)})
            else:
                choices.append({"index": i, "text": o.text,
                                "logprobs": _completion_logprobs(logprobs[i]) if job.logprobs else None,
                                "finish_reason": _reason(o)})
            if job.explain:
                choices[-1]["dynllava"] = _explained(job, o)
        n = count // job.prompts
        return {"id": job.rid, "object": "chat.completion" if job.chat else "text_completion",
                "created": int(time.time()), "model": cfg.model_name, "choices": choices,
                "usage": _usage([outputs[i] for i in range(count)], n)}

    async def _sse(job: Job, out: asyncio.Queue, first: list[Delta], rids: list[str]) -> AsyncIterator[str]:
        count, created = len(rids), int(time.time())
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        offsets = [0] * count

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": job.rid, "object": kind, "created": created, "model": cfg.model_name, "choices": choices}
            if job.include_usage:
                body["usage"] = None
            body.update(extra)
            return "data: " + json.dumps(body) + "\n\n"

        def choice(index: int, text: str | None, reason: str | None, entry: TokenLogprob | None = None) -> dict:
            if job.chat:
                c = {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason}
                if job.logprobs:
                    c["logprobs"] = _chat_logprobs([entry]) if entry else None
            else:
                c = {"index": index, "text": text or "", "finish_reason": reason}
                if job.logprobs:
                    c["logprobs"] = _completion_logprobs([entry], offsets[index]) if entry else None
                    offsets[index] += len(entry.token) if entry else 0
            return c

        outputs: dict[int, RequestOutput] = {}
        pending = deque(first)
        try:
            if job.chat:
                for i in range(count):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                  **({"logprobs": None} if job.logprobs else {})}])
            while len(outputs) < count:
                delta = pending.popleft() if pending else await out.get()
                if delta.error is not None:
                    yield _error_event(delta.error.status, delta.error.message)
                    yield "data: [DONE]\n\n"
                    return
                if delta.text or delta.logprob is not None:
                    yield chunk([choice(delta.index, delta.text, None, delta.logprob)])
                if delta.output is not None:
                    outputs[delta.index] = delta.output
                    last = choice(delta.index, None, _reason(delta.output))
                    if job.explain:
                        last["dynllava"] = _explained(job, delta.output)
                    yield chunk([last])
            if job.include_usage:
                yield chunk([], usage=_usage([outputs[i] for i in range(count)], count // job.prompts))
            yield "data: [DONE]\n\n"
        finally:
            if len(outputs) < count:  # the client went away or a choice failed: free the others' blocks
                for rid in rids:
                    loop.cancel(rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _run(request, chat=False)

    def _model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "dynllava"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", "model", code="model_not_found")
        return _model_card()

    @app.get("/health")
    async def health():
        stats = loop.stats
        status = "error" if not loop.alive else "draining" if loop.draining else "ok"
        body = {"status": status, "running": stats.running, "waiting": loop.waiting, "swapped": stats.swapped,
                "kv_blocks_used": stats.blocks_used, "kv_bytes_used": stats.kv_bytes_used,
                "prefix_cache_bytes": stats.prefix_cache_bytes, "errors": loop.errors,
                "last_error": loop.last_error}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    add_chat_page(app)

    return app

