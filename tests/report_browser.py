"""Open a page in Debian's headless Chromium (through chromedriver and selenium) and report what a reader would
see: console errors, images that did not load, a full-page screenshot.

Chromium is a system package: when it is missing and the tests run as root on Debian, :func:`chromium_paths`
installs it (``apt-get install -y chromium chromium-driver``); otherwise the test fails saying exactly that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def chromium_paths() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths, installing the Debian packages first when possible."""
    def found() -> tuple[str | None, str | None]:
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

    browser, driver = found()
    if (browser is None or driver is None) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", "-c", INSTALL], check=False, capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        browser, driver = found()
    if browser is None or driver is None:
        pytest.fail(f"the report's browser check needs Debian's chromium and chromedriver; install them: {INSTALL}")
    return browser, driver


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    title: str = ""

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["w"] == 0 or i["h"] == 0]


def check_page(page: Path, screenshot: Path, width: int = 1200) -> PageCheck:
    """Load ``page`` from disk, wait for it, collect console errors and every image's natural size, and save a
    full-page screenshot to ``screenshot``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(page).resolve().as_uri())
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null))).then(done);")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight,"
            " complete: i.complete}));")
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(width, min(max(height, 600), 16000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        return PageCheck(console_errors=errors, images=images, title=driver.title)
    finally:
        driver.quit()
