"""Runs an Engine's step loop in a background thread and hands each request's tokens to asyncio consumers.

The engine is not thread-safe: every call on it (add, cancel, step, take) happens on the loop thread; the asyncio
side only submits requests, asks for cancellations and reads per-request queues.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from dynllava.errors import DynLlavaError
from dynllava.runtime.engine import Engine
from dynllava.runtime.sequence import Request, RequestOutput, Status


@dataclass
class Delta:
    token_id: int | None
    text: str
    output: RequestOutput | None = None  # set when the request finished
    error: DynLlavaError | None = None  # set when the request was refused


@dataclass
class _Pending:
    request: Request
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    sent: str = ""
    last_token_at: float | None = None


class EngineLoop:
    def __init__(self, engine: Engine, on_token=None, on_finish=None):
        self.engine = engine
        self.on_token, self.on_finish = on_token, on_finish  # metrics hooks: (gap seconds), (RequestOutput)
        self._submit: queue.Queue = queue.Queue()
        self._cancel: queue.Queue = queue.Queue()
        self._active: dict[str, _Pending] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynllava-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def waiting(self) -> int:
        return self._submit.qsize() + len(self.engine.scheduler.waiting)

    def submit(self, request: Request) -> asyncio.Queue:
        """Queue a request; its Deltas arrive on the returned asyncio queue."""
        out: asyncio.Queue = asyncio.Queue()
        self._submit.put(_Pending(request, asyncio.get_running_loop(), out))
        self._wake.set()
        return out

    def cancel(self, request_id: str) -> None:
        self._cancel.put(request_id)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread
    def _send(self, pending: _Pending, delta: Delta) -> None:
        pending.loop.call_soon_threadsafe(pending.out.put_nowait, delta)

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            while not self._submit.empty():
                pending = self._submit.get()
                try:
                    rid = engine.add_request(pending.request)
                except DynLlavaError as exc:
                    self._send(pending, Delta(None, "", error=exc))
                    continue
                self._active[rid] = pending
            while not self._cancel.empty():
                rid = self._cancel.get()
                if rid in self._active and rid in engine.sequences:
                    engine.cancel(rid)
                    self._finish(rid)
            if not engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for seq, token in engine.step():
                pending = self._active.get(seq.request_id)
                if pending is None:
                    continue
                now = time.perf_counter()
                if pending.last_token_at is not None and self.on_token:
                    self.on_token(now - pending.last_token_at)
                pending.last_token_at = now
                done = seq.status == Status.FINISHED
                self._send(pending, Delta(token, seq.text[len(pending.sent):]))
                pending.sent = seq.text
                if done:
                    self._finish(seq.request_id)

    def _finish(self, request_id: str) -> None:
        pending = self._active.pop(request_id)
        output = self.engine.take(request_id)
        if self.on_finish:
            self.on_finish(output)
        self._send(pending, Delta(None, "", output=output))
