"""Running the HTTP app under uvicorn with a bounded drain on SIGTERM / Ctrl-C.

On the signal the server stops accepting connections and refuses new requests (503), lets the requests in flight
finish for up to `drain_seconds`, then stops those still running: a stream gets an SSE error event, a waiting
client a 503 JSON, and their KV blocks are freed. uvicorn's own graceful-shutdown timeout is a backstop a few
seconds later, so the process always exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

DEFAULT_DRAIN_SECONDS = 30.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_seconds: float = DEFAULT_DRAIN_SECONDS):
        super().__init__(config)
        self.drain_seconds = drain_seconds

    async def shutdown(self, sockets=None) -> None:
        state = getattr(self.config.app, "state", None)
        loop = getattr(state, "loop", None)  # the app's EngineLoop (dynllava.serve.openai.build_app)
        timer = None
        if loop is not None:
            loop.drain()
            timer = asyncio.get_running_loop().call_later(
                self.drain_seconds, loop.cancel_all,
                f"the server is shutting down and the {self.drain_seconds:g} s drain is over; the request was stopped")
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()


def make_server(app, host: str = "127.0.0.1", port: int = 8000, drain_seconds: float = DEFAULT_DRAIN_SECONDS,
                **config) -> DrainingServer:
    config.setdefault("log_level", "warning")
    return DrainingServer(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_seconds + 5,
                                         **config), drain_seconds)


def run(app, host: str = "127.0.0.1", port: int = 8000, drain_seconds: float = DEFAULT_DRAIN_SECONDS,
        **config) -> None:
    make_server(app, host, port, drain_seconds, **config).run()


@contextlib.contextmanager
def serving_in_thread(app, drain_seconds: float = 5.0, **config) -> Iterator[tuple[str, DrainingServer]]:
    """Serve `app` on 127.0.0.1 (a free port) in a thread, as `dynllava serve` does; yields (base URL, server).
    For the serving benchmark and the server's tests."""
    server = make_server(app, "127.0.0.1", 0, drain_seconds, **config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
