"""``cots-serve`` in a real browser: the command runs on a free port, headless Chromium (the system's, driven by
Selenium through its chromedriver) opens the page, types a query, sees thumbnails that loaded, clicks "more like
this" and sees the results change; the API's errors are shown on the page. Also the real server (uvicorn) answers
raw traversal paths, a 10,000-character query and a foreign Host header with a 4xx.

Without chromium and chromedriver (``apt-get install chromium chromium-driver``; .ci/run installs them) the browser
tests skip, and fail when the environment variable ``CI`` is set.
"""

from __future__ import annotations

import http.client
import os
import queue
import shutil
import subprocess
import sys
import threading
from urllib.parse import quote, urlsplit

import pytest
from image_files import IMAGES, make_folder

from cots.search.build import build_index

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
STARTUP_S = 180  # the command imports torch and loads the model before it prints its URL
WAIT_S = 60


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) from $CHROMIUM / $CHROMEDRIVER or the PATH, or None."""
    browser = os.environ.get("CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """``cots-serve INDEX --port 0`` over the test folder, as a subprocess; yields the URL it prints."""
    root = make_folder(tmp_path_factory.mktemp("browser") / "photos")
    build_index(model, root, root.parent / "index")
    command = [sys.executable, "-m", "cots.serve.cli", str(root.parent / "index"), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=STARTUP_S)
        except queue.Empty:
            pytest.fail(f"cots-serve printed nothing in {STARTUP_S} s")
        assert first.startswith("cots-serve: 7 images of ") and " at http://127.0.0.1:" in first, first
        yield first.rsplit(" at ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def require_chromium() -> tuple[str, str]:
    """:func:`find_chromium`'s pair; without one, a skip, or a failure when ``CI`` is set."""
    found = find_chromium()
    if found is None:
        message = "no chromium + chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and there is {message}")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def browser():
    found = require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)  # --no-sandbox: CI runs as root
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)  # no driver download
    yield driver
    driver.quit()


def _loaded_thumbnails(driver) -> list[str] | None:
    """The paths (alt) of the result thumbnails when every one of them has loaded (naturalWidth > 0), else None."""
    return driver.execute_script(
        """const images = [...document.querySelectorAll('#results figure img')];
        if (!images.length || !images.every((img) => img.complete && img.naturalWidth > 0)) return null;
        return images.map((img) => img.alt);"""
    )


def _search(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "search").click()


def test_the_page_searches_and_shows_more_like_this(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(server)
    assert browser.title == "COTS image search"
    wait.until(lambda d: "7 images" in d.find_element(By.ID, "about").text)
    _search(browser, "a red circle")
    first = wait.until(_loaded_thumbnails)
    assert len(first) == 7 and sorted(first) == sorted(IMAGES)  # k=12 by default, 7 indexed
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("“a red circle”: top 7 of 7 images")
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#results .score")]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert browser.find_element(By.ID, "error").is_displayed() is False

    clicked = first[0]
    browser.find_elements(By.CSS_SELECTOR, "#results .more")[0].click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(f"more like {clicked}"))
    after = wait.until(_loaded_thumbnails)
    assert after != first and clicked not in after and len(after) == 6


def test_the_page_shows_the_apis_errors(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(server)
    error = browser.find_element(By.ID, "error")
    _search(browser, "   ")
    wait.until(lambda d: error.is_displayed())
    assert error.text.startswith("the query is empty")

    browser.execute_script("document.getElementById('query').value = 'a'.repeat(10000)")
    browser.find_element(By.ID, "search").click()
    wait.until(lambda d: "10,000 characters" in error.text)

    _search(browser, "a blue square")  # a good query clears the error
    wait.until(_loaded_thumbnails)
    assert not error.is_displayed()


def _raw(url: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` byte for byte (http.client normalises nothing) from the real server."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
    try:
        connection.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_real_server_refuses_paths_long_queries_and_foreign_hosts(server):
    for path in ("/files/..%2f..%2fetc%2fpasswd", "/files/../../etc/passwd", "/files/%2e%2e", "/files//etc/passwd"):
        status, body = _raw(server, path)
        assert status == 404 and b"root:" not in body, path
    assert _raw(server, "/files/0")[0] == 200
    status, body = _raw(server, "/api/search?q=" + quote("a" * 10_000))
    assert status == 422 and b"10,000 characters" in body
    status, body = _raw(server, "/api/search?q=" + quote("é" * 10_000))  # 60,000 bytes of URL: h11's own 4xx
    assert 400 <= status < 500
    assert _raw(server, "/api/info", host="attacker.example")[0] == 400
    assert _raw(server, "/api/info", host=f"localhost:{urlsplit(server).port}")[0] == 200


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "find_chromium", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set and there is no chromium"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        require_chromium()
