"""Download npm packages with ``npm pack``, cache the tarballs and extract them.

Cache layout under ``cache_dir`` (default ``~/.cache/cots/npm``, see :func:`default_cache_dir`)::

    <name>-<version>.tgz         the tarball exactly as ``npm pack`` wrote it
    <name>-<version>.integrity   its Subresource-Integrity string ("sha512-<base64>")
    <name>-<version>/package/    the extracted files (only the requested prefixes)
    <name>-<version>/.cots-extracted.json   what was extracted, from which tarball

A cached tarball is reused only while its sha512 matches the recorded (or pinned)
integrity; otherwise it is fetched again. Node's ``npm`` is needed only to fetch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# `npm pack` of a 75 MB tarball takes seconds; this only guards against a hung client.
NPM_TIMEOUT_S = 900
_MARKER = ".cots-extracted.json"


class NpmError(RuntimeError):
    """npm is missing, ``npm pack`` failed, or a tarball fails its integrity check."""


@dataclass(frozen=True)
class NpmPackage:
    """One pinned package version.

    ``integrity`` is the registry's ``dist.integrity`` ("sha512-<base64>"); when given,
    a download that does not match is rejected. When ``None``, the value ``npm pack``
    reports on the first download is recorded and checked on every reuse.
    """

    name: str
    version: str
    integrity: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def stem(self) -> str:
        # Scoped names ("@scope/pkg") must not create sub-folders in the cache.
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


def default_cache_dir() -> Path:
    """``$COTS_CACHE/npm`` if set, else ``$XDG_CACHE_HOME/cots/npm``, else ``~/.cache/cots/npm``."""
    root = os.environ.get("COTS_CACHE")
    if root:
        return Path(root).expanduser() / "npm"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cots" / "npm"


def require_npm() -> str:
    """Path of the ``npm`` executable; raises :class:`NpmError` with a clear message if absent."""
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError(
            "`npm` (Node.js's package manager) is not on PATH; it is needed to download the "
            "emoji and CLDR packages. Install Node.js/npm (e.g. `apt-get install npm`) and retry."
        )
    return npm


def sha512_integrity(path: Path) -> str:
    """Subresource-Integrity string of a file: ``"sha512-" + base64(sha512(bytes))``."""
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def fetch_package(pkg: NpmPackage, cache_dir: Path, include: tuple[str, ...] = ()) -> Path:
    """Download (or reuse) ``pkg`` and return its extracted ``package/`` folder.

    ``include``: tarball path prefixes to extract (e.g. ``"package/img/google/64/"``);
    empty extracts everything. Restricting it keeps the cache small: the image
    packages are ~75 MB, mostly sprite sheets that the builder does not read.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball, integrity = fetch_tarball(pkg, cache_dir)
    return _extract(tarball, integrity, cache_dir / pkg.stem, include)


def fetch_tarball(pkg: NpmPackage, cache_dir: Path) -> tuple[Path, str]:
    """Return ``(tarball path, verified integrity)``, running ``npm pack`` only when needed."""
    tarball = cache_dir / f"{pkg.stem}.tgz"
    record = cache_dir / f"{pkg.stem}.integrity"
    expected = pkg.integrity or (record.read_text().strip() if record.is_file() else None)
    if tarball.is_file() and expected:
        if sha512_integrity(tarball) == expected:
            log.info("using cached %s", tarball)
            return tarball, expected
        log.warning("cached %s fails its integrity check; fetching it again", tarball)
    integrity = _npm_pack(pkg, cache_dir, tarball)
    _write_atomic(record, integrity + "\n")
    return tarball, integrity


def _npm_pack(pkg: NpmPackage, cache_dir: Path, tarball: Path) -> str:
    """Run ``npm pack <spec> --json`` in a scratch folder, verify, move the tarball to ``tarball``."""
    npm = require_npm()
    log.info("fetching %s with npm pack", pkg.spec)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pack-") as scratch:
        # cwd is the destination: `--pack-destination` is missing from npm < 7.18.
        cmd = [npm, "pack", pkg.spec, "--json"]
        try:
            proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise NpmError(f"`npm pack {pkg.spec}` did not finish within {NPM_TIMEOUT_S} s") from err
        if proc.returncode != 0:
            raise NpmError(f"`npm pack {pkg.spec}` failed with exit code {proc.returncode}:\n{proc.stderr.strip()}")
        report = _parse_pack_json(pkg, proc.stdout)
        written = Path(scratch) / report.get("filename", f"{pkg.stem}.tgz")
        if not written.is_file():
            raise NpmError(f"`npm pack {pkg.spec}` reported success but wrote no {written.name}")
        actual = sha512_integrity(written)
        reported = report.get("integrity")
        if reported and reported != actual:
            raise NpmError(f"{pkg.spec}: tarball sha512 {actual} differs from npm's report {reported}")
        if pkg.integrity and pkg.integrity != actual:
            raise NpmError(
                f"{pkg.spec}: downloaded tarball has integrity {actual}, expected the pinned {pkg.integrity}"
            )
        os.replace(written, tarball)
    return actual


def _parse_pack_json(pkg: NpmPackage, stdout: str) -> dict:
    """The first object of ``npm pack --json`` output (a list with one object per spec)."""
    # Some npm versions print notices before the JSON; start at the first '['.
    start = stdout.find("[")
    try:
        data = json.loads(stdout[start:] if start >= 0 else stdout)
        return data[0] if isinstance(data, list) else data
    except (json.JSONDecodeError, IndexError, KeyError) as err:
        raise NpmError(f"`npm pack {pkg.spec} --json` printed no JSON report: {stdout[:500]!r}") from err


def _extract(tarball: Path, integrity: str, dest: Path, include: tuple[str, ...]) -> Path:
    """Extract ``include`` prefixes of ``tarball`` into ``dest`` unless already done for it."""
    want = {"tarball": tarball.name, "integrity": integrity, "include": sorted(include)}
    marker = dest / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return dest / "package"
    log.info("extracting %s", tarball.name)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extract-"))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            # One streaming pass: getmembers() + extractall() would gunzip the tarball twice.
            for member in tar:
                if not include or member.name.startswith(include):
                    # The "data" filter refuses absolute paths, links out of the tree and devices.
                    tar.extract(member, scratch, filter="data")
        if not (scratch / "package").is_dir():
            raise NpmError(f"{tarball}: no 'package/' folder among the extracted files {list(include)}")
        (scratch / _MARKER).write_text(json.dumps(want))
        if dest.exists():
            shutil.rmtree(dest)
        scratch.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest / "package"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
