"""A run that tested its weights ends by printing the export / index / search / serve commands, and each printed
line runs as printed (``use_the_model`` in the config; ``make train`` sets it for the emoji demo)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from cots.export.cli import main as cots_export
from cots.next_steps import PROGRAMS, use_the_model_commands
from cots.search.cli import index_main, search_main
from cots.serve.cli import parser as serve_parser


def printed_commands(tiny_run: Path) -> list[list[str]]:
    lines = (tiny_run / "stdout.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Use the model"))
    return [shlex.split(line) for line in lines[start + 1 : start + 1 + len(PROGRAMS)]]


def test_the_tiny_run_prints_the_four_commands_over_its_own_checkpoint(tiny_run):
    commands = printed_commands(tiny_run)
    assert [Path(argv[0]).name for argv in commands] == list(PROGRAMS)
    export, index, search, serve = commands
    assert Path(export[1]).resolve() == (tiny_run / "checkpoints" / "last.ckpt").resolve()  # the tested weights
    assert index[1] == export[2] and search[1] == index[index.index("--out") + 1] == serve[1]
    assert search[2] == "a red circle"


def test_the_printed_commands_run_as_printed(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # exports/ and indexes/ are written under the working directory
    export, index, search, serve = printed_commands(tiny_run)
    assert cots_export(export[1:]) == 0
    assert (tmp_path / export[2] / "model.safetensors").is_file()
    assert index_main([*index[1:], "--quiet"]) == 0
    assert "indexed 64 images" in capsys.readouterr().out
    assert search_main([*search[1:], "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and hits[0]["score"] >= hits[-1]["score"]
    assert serve_parser().parse_args(serve[1:]).index == Path(index[index.index("--out") + 1])


def test_paths_are_shown_relative_to_the_working_directory_and_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my images").mkdir()
    export, index, search, serve = use_the_model_commands(
        tmp_path / "logs" / "run" / "last.ckpt", tmp_path / "my images", "a dog's ball", "demo"
    )
    assert export.split()[1:] == ["logs/run/last.ckpt", "exports/demo", "--onnx"]
    assert shlex.split(index)[1:] == ["exports/demo", "my images", "--out", "indexes/demo"]
    assert shlex.split(search)[1:] == ["indexes/demo", "a dog's ball", "-k", "5"]
    assert shlex.split(serve)[1:] == ["indexes/demo"]
