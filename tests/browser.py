"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for the page tests and the README's
screenshot. `make browser` installs it; where it is absent the page tests skip, unless CONFORMALSAM_REQUIRE_BROWSER
is set (CI sets it), where they fail."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
# no connections of its own: this machine's network is closed, and a test must not reach out
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic")


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    absent = [p for p in (CHROMIUM, DRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("the selenium package")
    return f"not installed: {', '.join(absent)} (make browser)" if absent else None


@contextmanager
def chromium(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def images(driver) -> list[tuple[str, bool]]:
    """(src as written, loaded) of every image of the page shown."""
    return [tuple(x) for x in driver.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")]


def screenshot(page: Path, png: Path, width: int = 1280) -> None:
    """The whole page (not just the window) as a PNG."""
    import base64

    with chromium(width) as driver:
        driver.get(page.resolve().as_uri())
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        png.write_bytes(base64.b64decode(shot["data"]))


def required() -> bool:
    return bool(os.environ.get("CONFORMALSAM_REQUIRE_BROWSER"))


if __name__ == "__main__":  # `make screenshot`: the README's picture of the page, from the demo's work folder
    import sys

    from PIL import Image

    page, png = Path(sys.argv[1]), Path(sys.argv[2])
    full = png.with_suffix(".full.png")
    screenshot(page, full, width=1400)
    with Image.open(full) as shot:
        top = shot.convert("RGB").crop((0, 0, shot.width, min(shot.height, 2300)))
    full.unlink()
    top = top.resize((1100, round(top.height * 1100 / top.width)), Image.LANCZOS)
    top.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
