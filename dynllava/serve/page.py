"""The chat page of `dynllava serve`: static HTML + JS + CSS (dynllava/serve/static, no build step, nothing
fetched from elsewhere) at / and /static/. The page talks to the server's own /v1/chat/completions, so it needs
no route of its own and follows `--api-key` like any client (it sends the key the user types)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def add_chat_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
