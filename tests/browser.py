"""A headless Chromium driven by Selenium for the chat page's test: the distribution's chromium and chromedriver
(Debian: `apt-get install chromium chromium-driver`, which `make setup` does as root), never a downloaded driver.
Without them the test is skipped with the reason."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install chromium chromium-driver (`make setup` does it when run as root)"
ARTIFACTS = Path(os.environ.get("DYNLLAVA_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def chrome():
    """A headless Chrome(ium) WebDriver on the system's browser and chromedriver; skips the test without them."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("a Chromium browser", browser), ("chromedriver", driver)) if not p)
        pytest.skip(f"no browser test: {missing} not found on PATH; install with {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def canvas_image(driver, element_id: str) -> Image.Image:
    """The canvas's pixels (its backing store, not a screenshot)."""
    url = driver.execute_script(f"return document.getElementById({element_id!r}).toDataURL('image/png')")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def artifacts_dir(name: str) -> Path:
    path = ARTIFACTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path
