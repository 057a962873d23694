"""Images that are small on the wire and huge in memory are refused from their header (413 in the server, one line
in the CLI); 16-bit and other modes are scaled to 8 bits, not clipped."""

from __future__ import annotations

import resource

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dynllava.cli import app as cli
from dynllava.errors import InputError
from dynllava.runtime.engine import Engine
from dynllava.runtime.processor import ImageTooLarge, open_image, preprocess_image, to_rgb
from dynllava.runtime.sequence import Request
from tests.serve_helpers import chat, data_url, png, png_header_only, running_server, wait_idle

LONG = {"15000x1": (15000, 1), "1x60000": (1, 60000), "100000x1": (100000, 1)}


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("size", list(LONG.values()), ids=list(LONG))
def test_long_thin_images_are_refused_before_padding(size):
    data = png(Image.new("L", size, 200))  # a few hundred bytes
    assert len(data) < 2000
    before = _max_rss_mib()
    with pytest.raises(ImageTooLarge, match="aspect ratio"):
        open_image(data)
    assert _max_rss_mib() - before < 100  # nothing near max(w, h)^2 was allocated


def test_padded_size_and_bombs_are_refused_from_the_header():
    with pytest.raises(ImageTooLarge, match=r"padded to a 5000x5000 square\) exceeds the limit of 16777216"):
        open_image(png(Image.new("L", (5000, 500))), max_pixels=4096 * 4096)
    open_image(png(Image.new("L", (5000, 500))), max_pixels=4096 * 4096, pad=False)  # 2.5 MP unpadded: fine
    with pytest.raises(ImageTooLarge, match="too large to decode safely"):  # PIL's bomb error at open
        open_image(png_header_only(30000, 30000))
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        open_image(png_header_only(9000, 9000))
    with pytest.raises(InputError, match="not a readable image"):
        open_image(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="corrupt"):
        open_image(png_header_only(64, 64))  # a header whose pixel data is missing


def test_a_pil_image_given_to_the_engine_is_checked_too(official_dir, loaded):
    with pytest.raises(ImageTooLarge):
        preprocess_image(loaded.image_processor, Image.new("RGB", (60000, 1)))
    engine = Engine.from_path(official_dir)
    with pytest.raises(ImageTooLarge):
        engine.add_request(Request(prompt="hi", image=Image.new("RGB", (1, 60000))))
    assert not engine.sequences


def test_16_bit_and_other_modes_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256 * 16).astype(np.uint16).reshape(16, 256)
    sixteen = Image.open(__import__("io").BytesIO(png(Image.fromarray(ramp))))
    assert sixteen.mode.startswith("I;16")
    rgb = np.asarray(open_image(png(Image.fromarray(ramp))))
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    assert (rgb == 255).mean() < 0.01  # PIL's own convert gives ~99.6% white
    assert (np.asarray(sixteen.convert("RGB")) == 255).mean() > 0.9  # (what we avoid)
    as_int = Image.fromarray(ramp.astype(np.int32), "I")
    assert np.abs(np.asarray(to_rgb(as_int))[..., 0].astype(int) - want).max() <= 1
    unit = Image.fromarray((ramp / 65535.0).astype(np.float32), "F")
    assert np.abs(np.asarray(to_rgb(unit))[..., 0].astype(int) - want).max() <= 1
    eight = Image.fromarray((ramp // 257).astype(np.uint8), "L")
    assert np.array_equal(np.asarray(to_rgb(eight)), np.asarray(eight.convert("RGB")))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]  # as LLaVA's convert('RGB')


def test_the_server_answers_413_and_keeps_serving(official_dir):
    from dynllava.serve.openai import ServerConfig, build_app

    engine = Engine.from_path(official_dir)
    with running_server(build_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        cases = [png(Image.new("L", LONG["15000x1"])), png(Image.new("L", LONG["1x60000"])),
                 png_header_only(30000, 30000), png_header_only(5000, 5000), png(Image.new("L", (4097, 100)))]
        for data in cases:
            response = httpx.post(url + "/v1/chat/completions", timeout=60,
                                  json={"messages": chat("What is it?", data_url(data)), "max_tokens": 4})
            assert response.status_code == 413, response.text
            assert response.json()["error"]["type"] == "invalid_request_error"
        sixteen = png(Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)))
        response = httpx.post(url + "/v1/chat/completions", timeout=60,
                              json={"messages": chat("What is it?", data_url(sixteen)), "max_tokens": 4})
        assert response.status_code == 200
        wait_idle(url)


@pytest.mark.parametrize("image, message", [
    (png(Image.new("L", LONG["100000x1"])), "aspect ratio"),
    (png_header_only(30000, 30000), "too large to decode safely"),
    (png_header_only(9000, 9000), "exceeds the limit"),
], ids=["100000x1", "30000x30000-bomb", "9000x9000"])
def test_the_cli_gives_one_line_and_exit_1(official_dir, tmp_path, image, message):
    path = tmp_path / "big.png"
    path.write_bytes(image)
    result = CliRunner().invoke(cli, ["generate", str(official_dir), "--image", str(path), "--prompt", "hi"])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
