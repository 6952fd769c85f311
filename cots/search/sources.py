"""What an index covers: the image files under a folder, or the images a manifest lists.

Every file is named by its path relative to the indexed root (POSIX separators); nothing outside the root is
ever indexed, so that an index id can only lead to a file under the root (:meth:`SearchIndex.resolve`).

* A folder: every file whose extension is in :data:`cots.search.IMAGE_EXTENSIONS` (any case), recursively,
  sorted by relative path. Hidden files and folders (a name starting with ``.``) are not entered, symlinked
  folders are not followed, and a symlinked file that leads outside the root is skipped as ``outside_root``.
  Files with other extensions are not read; their number is reported as ``other_files``.
* A manifest (``.json`` or ``.csv``, read by :func:`cots.data.manifest.load_manifest`): its images, in
  manifest order, relative to ``image_root`` (default: the manifest's folder), which becomes the indexed root.
  An entry outside that root is skipped as ``outside_root``, a second entry of the same file as ``duplicate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cots.data.manifest import ManifestError, load_manifest
from cots.search import IMAGE_EXTENSIONS, SearchError


@dataclass
class Listing:
    """The files of a source. ``files``: relative POSIX paths to index, in order; ``skipped``: (path, reason)
    for entries refused before reading; ``other_files``: files of a folder that are not images by extension."""

    root: Path  # absolute, symlinks resolved
    kind: str  # "folder" or "manifest"
    source: Path  # the folder or the manifest file, absolute
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path as listed, reason); never one of ``files``
    other_files: int = 0


def list_source(source: str | Path, image_root: str | Path | None = None) -> Listing:
    """A folder (recursive) or a manifest file (``.json`` / ``.csv``). Raises SearchError when it cannot be read."""
    source = Path(source)
    if source.is_dir():
        if image_root is not None:
            raise SearchError("--image-root applies to a manifest, not to a folder")
        return list_folder(source)
    if source.is_file():
        return list_manifest(source, image_root)
    raise SearchError(f"no folder or manifest at {source}")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder(folder: str | Path) -> Listing:
    """Image files under ``folder`` by extension, sorted by relative path."""
    root = Path(folder).resolve()
    listing = Listing(root=root, kind="folder", source=root)
    for directory, subdirs, names in os.walk(root):  # does not follow symlinked folders
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        here = Path(directory)
        for name in names:
            if name.startswith("."):
                continue
            if not is_image_name(name):
                listing.other_files += 1
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                listing.skipped.append((rel, "outside_root"))
            else:
                listing.files.append(rel)
    listing.files.sort()
    listing.skipped.sort()
    return listing


def list_manifest(manifest: str | Path, image_root: str | Path | None = None) -> Listing:
    """The images of a manifest in its order, relative to ``image_root`` (default: the manifest's folder)."""
    manifest = Path(manifest).resolve()
    root = Path(image_root).resolve() if image_root is not None else manifest.parent
    try:
        entries = load_manifest(manifest, root)
    except ManifestError as err:
        raise SearchError(str(err)) from err
    listing = Listing(root=root, kind="manifest", source=manifest)
    seen: set[str] = set()
    for entry in entries:
        rel = relative_inside(entry.image, root)
        if rel is None:
            listing.skipped.append((str(entry.image), "outside_root"))
        elif rel in seen:
            listing.skipped.append((str(entry.image), "duplicate"))  # as written: ``rel`` itself is indexed
        else:
            seen.add(rel)
            listing.files.append(rel)
    return listing


def relative_inside(path: str | Path, root: Path) -> str | None:
    """``path`` relative to ``root`` (POSIX, normalised), or None when it leaves the root (``..``, a symlink)."""
    lexical = Path(os.path.normpath(Path(root) / path))
    if lexical == root or not lexical.is_relative_to(root):
        return None
    if lexical.exists() and not lexical.resolve().is_relative_to(root):
        return None
    return lexical.relative_to(root).as_posix()


def is_safe_relative(rel: str) -> bool:
    """A stored path that names something under the root: relative, no ``..``, no empty or ``.`` parts."""
    pure = PurePosixPath(rel)
    return bool(rel) and not pure.is_absolute() and all(p not in ("", ".", "..") for p in pure.parts)
