"""The folder of images that the search and serve tests index: seven good images and the files an index skips.

Imported by ``conftest.py`` (the ``folder`` fixture) and by tests that write more images (``write_image``, ``age``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from PIL import Image

IMAGES = {  # relative path -> (colour, PIL mode); nested folders, every indexed format, an upper-case extension
    "a/red.png": ((220, 20, 20), "RGB"),
    "a/b/green.jpg": ((20, 200, 40), "RGB"),
    "a/b/c/blue.webp": ((30, 40, 210), "RGB"),
    "gif/anim.gif": ((240, 200, 10), "RGB"),
    "bmp/yellow.bmp": ((250, 240, 20), "RGB"),
    "Upper.PNG": ((120, 0, 160), "RGB"),
    "rgba.png": ((10, 120, 10, 90), "RGBA"),
}
HOUR_NS = 3600 * 10**9


def write_image(path: Path, colour, mode: str = "RGB", size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, colour)
    image.paste(Image.new(mode, (size[0] // 2, size[1] // 2), (255,) * len(colour)), (5, 5))  # not a flat image
    image.save(path)


def age(path: Path, ns_ago: int) -> None:
    """Set a file's mtime into the past: a file written just before a scan counts as changed (racy) next time."""
    when = time.time_ns() - ns_ago
    os.utime(path, ns=(when, when))


def make_folder(root: Path) -> Path:
    """Seven images in nested folders, a truncated PNG, a text file named .jpg, an empty .png, a .txt, hidden files."""
    for rel, (colour, mode) in IMAGES.items():
        write_image(root / rel, colour, mode)
    (root / "corrupt.png").write_bytes((root / "a/red.png").read_bytes()[:60])
    (root / "a/fake.jpg").write_text("not a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image by extension")
    write_image(root / ".cache/hidden.png", (0, 0, 0))
    write_image(root / ".hidden.png", (0, 0, 0))
    for path in root.rglob("*"):
        if path.is_file():
            age(path, HOUR_NS)
    return root
