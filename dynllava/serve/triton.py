"""The Engine as a decoupled (streaming) model in NVIDIA Triton Inference Server, through PyTriton.

Inputs (per request, no Triton-side batching: the engine batches continuously across concurrent requests):
`prompt` (bytes [1]), optional `image` (encoded image bytes [1]), `max_tokens` (int32 [1]), `temperature`
(float32 [1]), `seed` (int64 [1]). Each response carries one token: `text` (bytes [1], the new text) and
`token_id` (int64 [1]).
Call it with a decoupled client (gRPC streaming), e.g. pytriton's DecoupledModelClient or tritonclient.grpc.
A refused or failed request ends with one error line (never a Python traceback); the engine loop is the same
guarded one as the HTTP server's (an engine fault fails only the requests of its step).
"""

from __future__ import annotations

import io
import logging
import os
import sysconfig
from typing import Any

import numpy as np

from dynllava.errors import DynLlavaError, InputError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request, Sequence
from dynllava.serve.bridge import EngineLoop, RequestError
from dynllava.serve.media import MediaError, decode_image

MODEL_NAME = "dynllava"
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded, and padded to a square
MAX_TOKENS_LIMIT = 4096
log = logging.getLogger("dynllava.serve")


class TritonRequestError(Exception):
    """The one error a client sees: PyTriton sends `traceback.format_exception(None, e, e.__traceback__)`, so this
    exception reports no traceback, only its own line."""

    def __init__(self, message: str):
        super().__init__(message)

    @property
    def __traceback__(self):  # what PyTriton formats; the interpreter keeps the real one internally
        return None

    @__traceback__.setter
    def __traceback__(self, value) -> None:
        pass


def _scalar(req, name: str, default: Any) -> Any:
    # req: a pytriton Request (a mapping of input name -> array)
    value = req[name] if name in req.keys() else None
    if value is None or value.size == 0:
        return default
    first = value.reshape(-1)[0]
    return first.item() if hasattr(first, "item") else first  # object arrays hold bytes as they are


def _request(req) -> Request:
    prompt = _scalar(req, "prompt", b"")
    try:
        prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
    except UnicodeDecodeError as exc:
        raise InputError("input 'prompt' is not UTF-8 text") from exc
    if not prompt:
        raise InputError("input 'prompt' is empty")
    image_bytes = _scalar(req, "image", b"")
    image = None
    if image_bytes:
        if not isinstance(image_bytes, bytes):
            raise InputError("input 'image' must hold encoded image bytes")
        try:
            image = decode_image(image_bytes, MAX_IMAGE_PIXELS)
        except MediaError as exc:
            raise InputError(str(exc)) from exc
    max_tokens = int(_scalar(req, "max_tokens", 64))
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InputError(f"input 'max_tokens' must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}")
    seed = _scalar(req, "seed", None)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=float(_scalar(req, "temperature", 0.0)),
                            seed=None if seed is None else int(seed))
    return Request(prompt=prompt, image=image, params=params)


def make_infer_fn(loop: EngineLoop):
    async def infer(requests):
        # one request per call (batching is off): stream one response per token. Every failure reaches the client
        # as one line (TritonRequestError), never a Python traceback.
        for req in requests:
            rid = None
            finished = False
            try:
                request = _request(req)
                rid = request.request_id = f"triton-{Sequence.new_id()}"
                queue = loop.submit(request)
                while True:
                    delta = await queue.get()
                    if delta.error is not None:
                        finished = True
                        raise TritonRequestError(delta.error.message)
                    if delta.token_id is not None:
                        yield [{"text": np.array([delta.text.encode()], dtype=np.object_),
                                "token_id": np.array([delta.token_id], dtype=np.int64)}]
                    if delta.output is not None:
                        finished = True
                        break
            except TritonRequestError:
                raise
            except (DynLlavaError, RequestError) as exc:
                raise TritonRequestError(getattr(exc, "message", str(exc))) from None
            except Exception as exc:  # a bug: the client gets one line, the log the traceback
                log.error("Triton request failed", exc_info=exc)
                raise TritonRequestError(f"internal error ({type(exc).__name__}: {exc})") from None
            finally:
                if rid is not None and not finished:  # the call was cancelled: free the request's blocks
                    loop.cancel(rid)

    return infer


def _python_libdir_on_path() -> None:
    """Triton's Python backend stub links libpython; with a pyenv Python it must find this interpreter's."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in paths.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{paths}" if paths else libdir


def start_triton(engine: Engine, http_port: int, grpc_port: int, metrics_port: int, model_name: str = MODEL_NAME):
    """Start Triton with the engine bound as a decoupled model; returns (triton, engine loop). Stop both with
    `triton.stop(); loop.stop()`."""
    try:
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise InputError("PyTriton is not installed", hint="pip install 'dynllava[triton]' (nvidia-pytriton)") from exc
    _python_libdir_on_path()
    loop = EngineLoop(engine)
    loop.start()
    triton = Triton(config=TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                                        http_address="127.0.0.1", grpc_address="127.0.0.1"))
    triton.bind(
        model_name=model_name, infer_func=make_infer_fn(loop),
        inputs=[Tensor(name="prompt", dtype=np.bytes_, shape=(1,)),
                Tensor(name="image", dtype=np.bytes_, shape=(1,), optional=True),
                Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
                Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True),
                Tensor(name="seed", dtype=np.int64, shape=(1,), optional=True)],
        outputs=[Tensor(name="text", dtype=np.bytes_, shape=(1,)), Tensor(name="token_id", dtype=np.int64, shape=(1,))],
        config=ModelConfig(batching=False, decoupled=True),
        strict=False,
    )
    triton.run()
    return triton, loop


def image_bytes(path) -> bytes:
    """Encoded bytes of an image file (what the `image` input takes)."""
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
