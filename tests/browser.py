"""Drive Debian's headless Chromium from tests (selenium + chromedriver), for any page mechvit writes.

    from tests.browser import chromium, open_page, skip_without_chromium

    @skip_without_chromium
    def test_page(tmp_path):
        with chromium() as driver:
            page = open_page(driver, path, ready="body[data-ready]")
            assert page.console_errors == [] and page.network == []
            assert broken_images(driver) == [] and broken_links(driver, path) == []

Selenium is always given ``Service('/usr/bin/chromedriver')``, so Selenium Manager never goes to the network;
the browser runs with a fresh profile and background networking off. ``page.network`` lists every request
whose URL is not ``file:``, ``data:``, ``blob:`` or ``about:`` (from the DevTools network log and the
page's own performance entries).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LOCAL_SCHEMES = ("file", "data", "blob", "about")


def chromium_available() -> bool:
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        return False
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return True


skip_without_chromium = pytest.mark.skipif(
    not chromium_available(),
    reason=f"needs {CHROMIUM}, {CHROMEDRIVER} (Debian chromium, chromium-driver) and selenium",
)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900) -> Iterator:
    """A headless Chromium WebDriver with console and network logging, closed (and its profile removed) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mechvit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get("about:blank")  # leave the start page (chrome:// resources) before logging counts
        driver.get_log("browser")
        driver.get_log("performance")
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class PageReport:
    url: str
    load_s: float  # navigation start to the ready condition, measured by the browser
    console_errors: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)  # non-local requests (should be empty)
    requests: list[str] = field(default_factory=list)  # every request URL seen (data: URLs in full)


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def open_page(driver, path: str | Path, ready: str | None = None, timeout: float = 60) -> PageReport:
    """Load ``path`` (a local file) and wait until the document is complete and ``ready`` (a CSS selector)
    matches; return its console errors and any request that left the machine."""
    from selenium.webdriver.support.ui import WebDriverWait

    url = Path(path).resolve().as_uri()
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get_log("performance")
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    if ready:
        wait.until(lambda d: d.execute_script("return !!document.querySelector(arguments[0])", ready))
    load_s = driver.execute_script("return performance.now() / 1000")
    time.sleep(0.2)  # let late console messages arrive
    return collect(driver, url, load_s)


def collect(driver, url: str = "", load_s: float = float("nan")) -> PageReport:
    """Console errors and requests logged since the last call (e.g. after clicking around)."""
    errors = [
        f"{e.get('level')}: {e.get('message')}"
        for e in driver.get_log("browser")
        if e.get("level") == "SEVERE"
    ]
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            requests.append(msg["params"]["request"]["url"])
    requests += driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat(performance.getEntriesByType('navigation').map(e => e.name))"
    )
    network = sorted({_short(u) for u in requests if urlparse(u).scheme not in LOCAL_SCHEMES})
    return PageReport(url, load_s, errors, network, sorted(set(requests)))


def broken_images(driver) -> list[str]:
    """``<img>`` elements that did not load (not complete, or zero natural width)."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => (i.currentSrc || i.src || '(no src)').slice(0, 80))"
    )


def broken_links(driver, page: str | Path) -> list[str]:
    """Links that do not resolve: a local file that does not exist, or an in-page ``#anchor`` with no element
    of that id. Links to other schemes (http, mailto) are returned too: an offline page should have none."""
    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => [a.getAttribute('href'), a.href])"
    )
    bad = []
    for raw, resolved in hrefs:
        u = urlparse(resolved)
        if raw.startswith("#"):
            frag = unquote(raw[1:])
            if frag and not driver.execute_script("return !!document.getElementById(arguments[0])", frag):
                bad.append(raw)
        elif u.scheme == "file":
            if not Path(unquote(u.path)).exists():
                bad.append(raw)
        elif u.scheme not in ("data", "blob"):
            bad.append(raw)
    return bad


def screenshot(driver, path: str | Path | None = None):
    """The viewport as an RGB numpy array (and written to ``path`` as PNG when given)."""
    import numpy as np
    from PIL import Image

    png = driver.get_screenshot_as_png()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
