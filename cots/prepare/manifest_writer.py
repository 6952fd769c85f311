"""Write image-text manifests (the JSON list that :mod:`cots.data.manifest` reads).

Writing belongs to the offline builders (the emoji set, tests that make fixtures); a training
run only reads manifests.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_manifest(path: str | Path, entries: list[dict]) -> None:
    """Write a JSON manifest atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(entries, ensure_ascii=False, indent=0), encoding="utf-8")
    tmp.replace(path)
