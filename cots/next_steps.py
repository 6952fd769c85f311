"""What a finished run prints last: the commands that take its weights out of the trainer (README "Use the model").

    cots-export  <run>/checkpoints/last.ckpt exports/<task> --onnx      # the online encoder, no Hydra, no pickle
    cots-index   exports/<task> <images> --out indexes/<task>           # embed a folder of images
    cots-search  indexes/<task> "<query>" -k 5                           # search it from the shell
    cots-serve   indexes/<task>                                         # or from a page on localhost

Paths are printed relative to the working directory when they are under it, and the programs with the folder
of the Python that ran the training (``.venv/bin/`` after ``make train``), so each line runs as printed.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

PROGRAMS = ("cots-export", "cots-index", "cots-search", "cots-serve")


def _shown(path: Path | str) -> str:
    """``path`` relative to the working directory when it is under it; quoted for a POSIX shell."""
    path = Path(path).absolute()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


def program(name: str) -> str:
    """``name`` as it runs from here: beside this Python when installed there (a venv's bin/), else bare."""
    beside = Path(sys.executable).parent / name
    return _shown(beside) if beside.is_file() and os.access(beside, os.X_OK) else name


def use_the_model_commands(checkpoint: Path, images: Path | str, query: str, task_name: str) -> list[str]:
    """The four commands, with this run's checkpoint and the folder (or manifest) of images to index."""
    export, index = Path("exports") / task_name, Path("indexes") / task_name
    return [
        f"{program('cots-export')} {_shown(checkpoint)} {_shown(export)} --onnx",
        f"{program('cots-index')} {_shown(export)} {_shown(images)} --out {_shown(index)}",
        f"{program('cots-search')} {_shown(index)} {shlex.quote(query)} -k 5",
        f"{program('cots-serve')} {_shown(index)}",
    ]


def print_use_the_model(checkpoint: Path, images: Path | str, query: str, task_name: str) -> None:
    print("\nUse the model (README, 'Use the model'): export it, index the images, search them, serve a page")
    for line in use_the_model_commands(checkpoint, images, query, task_name):
        print(f"  {line}")
