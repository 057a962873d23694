"""The chat page of `dynllava serve` in a real headless Chromium (tests/browser.py): it loads, takes an image, asks
with the API key, streams the answer in, draws the kept patches the response names (read back from the canvas's
pixels) and marks the answer's tokens; a bad key, an oversized image and an overloaded server show their errors.
Screenshots go to test-artifacts/chat-page/ (the path is printed)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image

from dynllava.runtime.engine import Engine
from tests.browser import artifacts_dir, canvas_image, chrome
from tests.overlay import cell_ratios, render_box
from tests.serve_helpers import chat, data_url, running_server

pytest.importorskip("uvicorn")

KEY = "page-test-key"
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def driver():
    d = chrome()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots():
    path = artifacts_dir("chat-page")
    for old in path.glob("*.png"):
        old.unlink()
    return path


def _server(official_dir, **cfg):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir, max_batch=4)
    return running_server(build_app(engine, ServerConfig(model_name="tiny", **cfg)))


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def _set(driver, element_id: str, value: str) -> None:
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def _ask(driver, question: str) -> None:
    _set(driver, "prompt", question)
    _by_id(driver, "send").click()


def _error_shown(driver) -> str:
    _wait(driver, lambda d: _by_id(d, "error").is_displayed())
    return _by_id(driver, "error").text


def _drop_file(driver, element_id: str, path) -> None:
    """Drop a file onto an element as a user's drag and drop does (a DataTransfer holding the file)."""
    driver.execute_script("""
        const [id, name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: 'image/png'}));
        const target = document.getElementById(id);
        for (const type of ['dragenter', 'dragover', 'drop'])
          target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
        """, element_id, path.name, base64.b64encode(path.read_bytes()).decode())


def _open(driver, url: str) -> None:
    driver.get(url + "/")
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def test_chat_page_streams_an_answer_and_draws_what_was_kept(driver, shots, official_dir, tmp_path, capsys):
    with capsys.disabled():
        print(f"\nchat page screenshots: {shots}")
    example = official_dir / "example.png"
    with _server(official_dir, api_key=KEY, max_image_pixels=200 * 200) as (url, _):
        _open(driver, url)
        assert driver.title == "dynllava chat" and not _by_id(driver, "error").is_displayed()
        driver.save_screenshot(str(shots / "01-loaded.png"))

        _by_id(driver, "file").send_keys(str(example))
        _wait(driver, lambda d: "has-image" in _by_id(d, "drop-zone").get_attribute("class"))

        # no key, then a wrong one: the page says what is wrong
        _ask(driver, QUESTION)
        assert "API key" in _error_shown(driver)
        _set(driver, "api-key", "wrong")
        _ask(driver, QUESTION)
        assert "API key" in _error_shown(driver)
        driver.save_screenshot(str(shots / "02-bad-api-key.png"))

        # the answer streams in: record each text the answer shows while it runs
        _set(driver, "api-key", KEY)
        _set(driver, "max-tokens", "16")
        driver.execute_script("""
            window.shown = [];
            new MutationObserver((records) => {
              for (const r of records) for (const n of r.addedNodes)
                if (n.nodeType === Node.TEXT_NODE) window.shown.push(n.data);
            }).observe(document.getElementById('conversation'), {subtree: true, childList: true});""")
        _ask(driver, QUESTION)
        _wait(driver, lambda d: d.find_elements("css selector", ".message.assistant.done"))
        assert not _by_id(driver, "error").is_displayed(), _by_id(driver, "error").text
        driver.save_screenshot(str(shots / "03-answer.png"))

        # the same request through the API (what the page was told)
        body = {"messages": chat(QUESTION, data_url(example.read_bytes())), "max_tokens": 16, "temperature": 0,
                "top_p": 1, "top_k": 0, "dynllava": {"explain": True}}
        reply = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                           timeout=60).json()
        text, ext = reply["choices"][0]["message"]["content"], reply["choices"][0]["dynllava"]
        shown = [s for s in driver.execute_script("return window.shown") if s]
        assert shown[-1] == text and len(set(shown)) >= 2, shown  # streamed: several growing texts
        assert all(text.startswith(s) for s in shown)

        # the answer's tokens, each marked as the server decided
        spans = driver.find_elements("css selector", ".message.assistant.done span")
        assert [s.get_attribute("textContent") for s in spans] == ext["tokens"]
        assert [s.get_attribute("class") for s in spans] == \
            [{True: "kept", False: "dropped", None: "undecided"}[k] for k in ext["token_kept"]]

        # the overlay: exactly the kept patches are left bright, on the model's (padded) view of the image
        canvas = canvas_image(driver, "overlay")
        reference = render_box(Image.open(example).convert("RGB"), _box(ext["view"]), canvas.size)
        ratios = cell_ratios(canvas, reference, tuple(ext["image_grid"]))
        bright = [int(i) for i in np.flatnonzero(ratios > 0.65)]
        assert bright == ext["image_kept"] and len(bright) == 12, ratios.round(2)
        assert np.all((ratios > 0.85) | (ratios < 0.45)), ratios.round(2)  # bright or dimmed, nothing between
        canvas.save(shots / "03-overlay-canvas.png")
        assert f"image tokens kept {len(ext['image_kept'])}/64" in _by_id(driver, "image-stats").text

        # an image over the server's pixel limit, dropped onto the page: the page shows the 413
        big = tmp_path / "big.png"
        Image.new("RGB", (300, 300), (70, 110, 190)).save(big)
        _drop_file(driver, "drop-zone", big)
        _wait(driver, lambda d: not d.find_elements("css selector", ".message"))  # a new image: a new chat
        _ask(driver, QUESTION)
        message = _error_shown(driver)
        assert message.startswith("Image too large") and "exceeds the limit of 40000 pixels" in message
        driver.save_screenshot(str(shots / "04-image-too-large.png"))


def test_chat_page_says_when_the_server_is_overloaded(driver, shots, official_dir):
    with _server(official_dir, max_waiting=0) as (url, _):  # every request is one too many
        _open(driver, url)
        _ask(driver, "Hello")
        assert "overloaded" in _error_shown(driver)
        driver.save_screenshot(str(shots / "05-overloaded.png"))


def _box(view: dict):
    from dynllava.explain import ViewBox

    return ViewBox(view["left"], view["top"], view["width"], view["height"], tuple(view["fill"]))


def test_page_is_served_without_a_key_and_loads_nothing_from_elsewhere(official_dir):
    """No browser needed: /, its script and style come from the app (also behind --api-key, which guards /v1 only),
    every URL the page names is relative, and the API still needs the key."""
    import re

    with _server(official_dir, api_key=KEY) as (url, _):
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(refs) == ["static/app.js", "static/style.css"]
        for ref in refs:
            asset = httpx.get(f"{url}/{ref}")
            assert asset.status_code == 200 and asset.text
            assert not re.search(r"https?://|//[a-z]", asset.text.replace("// ", "")), ref  # no outside URL
        assert httpx.get(url + "/static/missing.js").json()["error"]["message"].startswith("Not Found")
        assert httpx.post(url + "/v1/chat/completions", json={"messages": chat("hi")}).status_code == 401
