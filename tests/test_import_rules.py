"""Import direction between the packages, read from the source with ``ast`` (nothing is imported).

* ``cots.data`` (what a training run reads) imports nothing from ``cots.prepare`` (offline
  builders) or ``cots.models``, directly or through another ``cots`` module.
* ``cots_dvae`` (the dVAE) imports nothing from ``cots``: the direction is ``cots`` -> ``cots_dvae``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"cots": ROOT / "cots", "cots_dvae": ROOT / "tokenizers" / "cots_dvae"}
DATA_MUST_NOT_REACH = ("cots.prepare", "cots.models")


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported_names(module: str) -> set[str]:
    """Every dotted name ``module`` imports (at any depth of its code), relative imports resolved.

    ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (``c`` may be a submodule).
    """
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def project_imports(module: str) -> set[str]:
    """The project modules ``module`` imports, with the packages above them (their ``__init__`` runs too)."""
    found = set()
    for name in imported_names(module):
        parts = name.split(".")
        found.update(prefix for i in range(1, len(parts) + 1) if (prefix := ".".join(parts[:i])) in MODULES)
    return found


def reachable(start: str) -> dict[str, list[str]]:
    """Project modules reachable from ``start`` by imports, each with one import chain leading to it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for name in sorted(project_imports(current)):
            if name not in chains:
                chains[name] = chains[current] + [name]
                todo.append(name)
    return chains


DATA_MODULES = sorted(m for m in MODULES if _is_within(m, "cots.data"))
DVAE_MODULES = sorted(m for m in MODULES if _is_within(m, "cots_dvae"))


def test_the_packages_are_where_the_rules_expect_them():
    for module in (
        "cots.data.datamodule",
        "cots.data.token_cache",
        "cots.prepare.cli",
        "cots.prepare.dvae_cli",
        "cots.prepare.token_cache_builder",
        "cots.local_paths",
        "cots_dvae.arch",
    ):
        assert module in MODULES, module
    assert not (ROOT / "tokenizers" / "__init__.py").exists(), "tokenizers/ would shadow Hugging Face's tokenizers"


@pytest.mark.parametrize("module", DATA_MODULES)
def test_data_layer_imports_no_builder_and_no_model_code(module):
    bad = {
        name: chain
        for name, chain in reachable(module).items()
        if any(_is_within(name, prefix) for prefix in DATA_MUST_NOT_REACH)
    }
    shortest = sorted((" -> ".join(chain) for chain in bad.values()), key=len)
    assert not bad, "\n".join(shortest[:5])


@pytest.mark.parametrize("module", DVAE_MODULES)
def test_dvae_package_imports_nothing_from_cots(module):
    bad = sorted(name for name in imported_names(module) if _is_within(name, "cots"))
    assert not bad, f"{module} imports {bad}: cots imports cots_dvae, never the other way"


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    """The walker finds a function-level import two modules away (so the tests above can fail)."""
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("def f():\n    from cots.data import second\n")
    second.write_text("from ..models import two_stream\n")
    monkeypatch.setitem(MODULES, "cots.data.first", first)
    monkeypatch.setitem(MODULES, "cots.data.second", second)
    chain = reachable("cots.data.first")["cots.models.two_stream"]
    assert chain == ["cots.data.first", "cots.data.second", "cots.models.two_stream"]
