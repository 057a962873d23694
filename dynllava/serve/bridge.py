"""Runs an Engine's step loop in a background thread and hands each request's tokens to asyncio consumers.

The engine is not thread-safe: every call on it (add, cancel, step, take) happens on the loop thread; the asyncio
side only submits requests, asks for cancellations and reads per-request queues.

The loop never dies of a request: a refused request gets an error Delta; an exception in a step fails only the
requests of that step (Engine.guarded_step: their KV blocks are freed, each gets an error Delta) and the loop
carries on; an exception anywhere else in the loop fails the requests in flight and the loop carries on. Errors are
counted (`errors`, `last_error`, the on_error hook) for /health and the metrics. Text is streamed without a tail
that could still become a stop string, so the streamed text always adds up to the final text.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from dynllava.errors import DynLlavaError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sequence import Request, RequestOutput, Sequence, Status

log = logging.getLogger("dynllava.serve")


class RequestError(Exception):
    """Why a request got no (complete) answer; status is the HTTP status it maps to (400 refused, 500 failed in
    the engine, 503 the server is stopping)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class TokenLogprob:
    token: str  # the token's text
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # the top alternatives (text, log-probability)


@dataclass
class Delta:
    token_id: int | None
    text: str
    output: RequestOutput | None = None  # set when the request ended (finished, cancelled or failed)
    error: RequestError | None = None  # set when the request was refused or failed
    index: int = 0  # the submit() index (several requests may share one queue)
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs


@dataclass
class _Pending:
    request: Request
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    index: int = 0
    sent: str = ""
    logprobs_sent: int = 0
    last_token_at: float | None = None


class EngineLoop:
    def __init__(self, engine: Engine, on_token=None, on_finish=None, on_error=None):
        self.engine = engine
        # metrics hooks: (gap seconds), (RequestOutput), (where: "add" | "step" | "loop")
        self.on_token, self.on_finish, self.on_error = on_token, on_finish, on_error
        self.errors = 0
        self.last_error: str | None = None
        self.stats = engine.stats()  # a snapshot taken on the loop thread (the engine's queues are not thread-safe)
        self._submit: queue.Queue = queue.Queue()
        self._cancel: queue.Queue = queue.Queue()
        self._active: dict[str, _Pending] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self.draining = False  # set by drain(): new requests are refused (503), those in flight carry on
        self._lock = threading.Lock()  # submit vs. the final drain on stop
        self._thread = threading.Thread(target=self._run, name="dynllava-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop: requests still running are cancelled (their KV freed) and end with a 503 error Delta."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout)

    def drain(self) -> None:
        """Refuse new requests from now on (503); those in flight carry on."""
        self.draining = True

    def cancel_all(self, message: str = "the server is shutting down; the request was stopped") -> None:
        """Stop every request in flight or queued; each ends with a 503 error Delta and its KV blocks are freed.
        Thread-safe and returns at once (the loop thread does the work)."""
        self._cancel.put(RequestError(message, 503))
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set() and not self._closed

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended."""
        return self._submit.qsize() + len(self._active)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running (waiting or swapped out)."""
        return self._submit.qsize() + len(self.engine.scheduler.waiting)

    def submit(self, request: Request, out: asyncio.Queue | None = None, index: int = 0) -> asyncio.Queue:
        """Queue a request; its Deltas (tagged with `index`) arrive on `out` (a new queue if None), returned."""
        out = out if out is not None else asyncio.Queue()
        with self._lock:
            if not self.alive or self._closed or self.draining:
                raise RequestError("the server is shutting down" if self._stop.is_set() or self.draining else
                                   "the engine loop is not running", 503)
            self._submit.put(_Pending(request, asyncio.get_running_loop(), out, index))
        self._wake.set()
        return out

    def cancel(self, request_id: str) -> None:
        self._cancel.put(request_id)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread
    def _send(self, pending: _Pending, delta: Delta) -> None:
        try:
            pending.loop.call_soon_threadsafe(pending.out.put_nowait, delta)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    def _error(self, where: str, exc: BaseException) -> str:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.errors += 1
        self.last_error = f"{where}: {message}"
        log.error("engine %s failed: %s", where, message, exc_info=exc)
        self._hook(self.on_error, where)
        return message

    @staticmethod
    def _hook(hook, *args) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # a metrics hook must not take the loop down
            log.exception("metrics hook failed")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._iterate()
                    self.stats = self.engine.stats()
                except Exception as exc:  # a fault outside a step (a bug): fail what is in flight, keep serving
                    message = self._error("loop", exc)
                    self._fail_all(RequestError(f"internal error in the engine loop ({message}); the request was "
                                                "stopped", 500))
        except BaseException as exc:  # the thread is dying (SystemExit, ...): nobody may wait on it for ever
            self._error("loop", exc)
            raise
        finally:
            self._close()
            self.stats = self.engine.stats()

    def _iterate(self) -> None:
        engine = self.engine
        while not self._submit.empty():
            self._admit(self._submit.get())
        while not self._cancel.empty():
            rid = self._cancel.get()
            if isinstance(rid, RequestError):  # cancel_all
                self._stop_all(rid)
            elif rid in self._active:
                if rid in engine.sequences:
                    engine.cancel(rid)
                self._end(rid)
        if not engine.has_unfinished():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        events, failed, exc = engine.guarded_step()
        error = None
        if exc is not None:
            message = self._error("step", exc)
            error = RequestError(f"internal error while generating ({message}); the request was stopped and the "
                                 "server carries on", 500)
        for seq, token in events:
            self._token(seq, token)
        for seq in failed:
            self._end(seq.request_id, error)

    def _admit(self, pending: _Pending) -> None:
        try:
            rid = self.engine.add_request(pending.request)
        except DynLlavaError as exc:
            self._send(pending, Delta(None, "", error=RequestError(exc.message), index=pending.index))
            return
        except Exception as exc:  # a bug in preparing the request: this request fails, the loop goes on
            message = self._error("add", exc)
            self._send(pending, Delta(None, "", error=RequestError(f"internal error preparing the request "
                                                                   f"({message})", 500), index=pending.index))
            return
        self._active[rid] = pending

    def _token(self, seq: Sequence, token: int) -> None:
        pending = self._active.get(seq.request_id)
        if pending is None:
            return
        now = time.perf_counter()
        if pending.last_token_at is not None:
            self._hook(self.on_token, now - pending.last_token_at)
        pending.last_token_at = now
        text = seq.stream_text()  # the final text once finished; before, without a possible stop-string start
        new = text[len(pending.sent):] if len(text) > len(pending.sent) else ""
        if new:
            pending.sent = text
        self._send(pending, Delta(token, new, index=pending.index, logprob=self._logprob(seq, pending)))
        if seq.status == Status.FINISHED:
            self._end(seq.request_id)

    def _logprob(self, seq: Sequence, pending: _Pending) -> TokenLogprob | None:
        records = getattr(seq.sampler, "logprobs", None)
        if not records or pending.logprobs_sent >= len(records):
            return None
        token, logprob, top = records[pending.logprobs_sent]
        pending.logprobs_sent += 1
        decode = self.engine.tokenizer.decode
        floor = lambda lp: max(lp, -9999.0)  # noqa: E731 - OpenAI's floor (JSON has no -inf)
        return TokenLogprob(decode([token]), floor(logprob), [(decode([t]), floor(lp)) for t, lp in top])

    def _end(self, request_id: str, error: RequestError | None = None) -> None:
        pending = self._active.pop(request_id, None)
        if pending is None:
            return
        output = None
        try:
            output = self.engine.take(request_id)
        except DynLlavaError:  # not finished (a loop fault): fail it so its blocks are freed
            try:
                self.engine.fail(request_id, error.message if error else "stopped")
                output = self.engine.take(request_id)
            except Exception:
                log.exception("could not free request %s", request_id)
        if output is not None:
            self._hook(self.on_finish, output)
            if error is None and output.finish_reason == "error":
                error = RequestError(f"internal error while generating ({output.error})", 500)
        self._send(pending, Delta(None, "", output=output, error=error, index=pending.index))

    def _fail_all(self, error: RequestError) -> None:
        for rid in list(self._active):
            try:
                if rid in self.engine.sequences:
                    self.engine.fail(rid, error.message)
            except Exception:
                log.exception("could not fail request %s", rid)
            self._end(rid, error)

    def _close(self) -> None:
        """On stop (or death): requests not yet admitted and those in flight end with a 503; their KV is freed."""
        with self._lock:
            self._closed = True
        try:
            self._stop_all(RequestError("the engine loop stopped; the request was stopped", 503))
        except Exception:
            log.exception("could not stop the requests in flight")

    def _stop_all(self, stopping: RequestError) -> None:
        while not self._submit.empty():
            pending = self._submit.get()
            self._send(pending, Delta(None, "", error=stopping, index=pending.index))
        for rid in list(self._active):
            try:
                if rid in self.engine.sequences:
                    self.engine.cancel(rid)
            except Exception:
                log.exception("could not cancel request %s", rid)
            self._end(rid, stopping)
