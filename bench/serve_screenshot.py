"""A screenshot of cots-serve's search page over the emoji index (``bench/results/serve_page.png``).

    python bench/serve_screenshot.py logs/<emoji_demo run>/checkpoints/last.ckpt data/emoji/images \\
        [--index logs/bench/emoji_index] [--query "a red heart"] [--out bench/results/serve_page.png]

Builds the index with ``cots-index`` (or brings it up to date), runs ``cots-serve INDEX --port 0``, opens the page
in headless Chromium (the system's, through Selenium and its chromedriver: ``apt-get install chromium
chromium-driver``), types the query, waits until every thumbnail has loaded and saves the window as a PNG
(palette-quantised to stay small).
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

LOADED = """const images = [...document.querySelectorAll('#results figure img')];
return images.length > 0 && images.every((img) => img.complete && img.naturalWidth > 0);"""


def serve(index: Path) -> tuple[subprocess.Popen, str]:
    """``cots-serve INDEX --port 0`` in the background, and the URL it prints."""
    command = [sys.executable, "-m", "cots.serve.cli", str(index), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if " at http" not in line:
        process.terminate()
        raise SystemExit(f"cots-serve did not start: {line!r}")
    print(line.strip())
    return process, line.rsplit(" at ", 1)[1].strip()


def screenshot(url: str, query: str, size: tuple[int, int]) -> bytes:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: "images, model" in d.find_element(By.ID, "about").text)
        driver.find_element(By.ID, "query").send_keys(query)
        driver.find_element(By.ID, "search").click()
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(LOADED))
        return driver.get_screenshot_as_png()
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the emoji demo's last.ckpt (or an export folder)")
    parser.add_argument("images", type=Path, help="the emoji images (data/emoji/images)")
    parser.add_argument("--index", type=Path, default=Path("logs/bench/emoji_index"), help="built when missing")
    parser.add_argument("--query", default="a red heart")
    parser.add_argument("--size", type=int, nargs=2, default=(1100, 820), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_page.png"))
    args = parser.parse_args()

    index_command = [sys.executable, "-m", "cots.search.cli", "index", str(args.checkpoint), str(args.images)]
    subprocess.run([*index_command, "--out", str(args.index), "--quiet"], check=True)
    process, url = serve(args.index)
    try:
        png = screenshot(url, args.query, tuple(args.size))
    finally:
        process.terminate()
        process.wait(timeout=30)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
