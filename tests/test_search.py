"""``cots-index`` / ``cots-search`` end to end on a folder the tests make, with the tiny run's model.

Also: incremental updates (only added and changed files are encoded, and the result equals a fresh build), a model
mismatch refused naming both models, exact top-k against brute force, FAISS against exact, safe path resolution,
an interrupted build leaving the previous index usable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import HOUR_NS, IMAGES, age, write_image
from PIL import Image

import cots
from cots.retriever import Retriever, UnreadableImage
from cots.search import MissingFaiss, ModelMismatch, SearchError, UnsafePath
from cots.search import faiss_backend as faiss_kinds
from cots.search.build import build_index
from cots.search.cli import index_main, search_main
from cots.search.exact import rows_per_chunk, top_k
from cots.search.index import SearchIndex
from cots.search.layout import locked
from cots.search.searcher import Searcher

SKIPPED = {"empty_file": 1, "undecodable": 2}
INDEX_KEYS = {
    "format",
    "format_version",
    "generation",
    "files",
    "model",
    "embed_dim",
    "count",
    "dtype",
    "root",
    "source",
    "change_detection",
    "scanned_at_ns",
    "skipped",
    "other_files",
    "faiss",
    "last_update",
    "created_at",
    "updated_at",
    "software",
}


@pytest.fixture(scope="module")
def other_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The tiny run's checkpoint with one weight changed: another model (another checksum)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name = next(k for k, v in state["state_dict"].items() if "encoder" in k and v.is_floating_point())
    state["state_dict"][name] = state["state_dict"][name] + 0.01
    path = tmp_path_factory.mktemp("other") / "other.ckpt"
    torch.save(state, path)
    return path


def _rows_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    index = SearchIndex.open(index_dir)
    return {rel: np.asarray(index.embeddings[i], dtype=np.float32) for i, rel in enumerate(index.paths)}


# -- cots-index / cots-search ---------------------------------------------------------------------------
def test_cots_index_indexes_a_folder_and_counts_what_it_skips(folder, checkpoint, model, tmp_path, capsys):
    out = tmp_path / "index"
    assert index_main([str(checkpoint), str(folder), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"indexed 7 images of {folder}" in printed and model.model_id in printed
    assert "7 encoded (7 added, 0 changed), 0 unchanged, 0 removed" in printed
    assert "skipped  3: empty_file 1, undecodable 2" in printed and "ignored  1 files" in printed

    info = json.loads((out / "index.json").read_text())
    assert set(info) == INDEX_KEYS and info["format_version"] == 1 and info["generation"] == 1
    assert info["model"] == {
        "path": str(checkpoint.resolve()),
        "model_id": model.model_id,
        "checksum": model.checksum,
        "dtype": "float32",
        "embed_dim": 32,
    }
    assert (info["count"], info["embed_dim"], info["dtype"]) == (7, 32, "float16")
    assert info["skipped"] == SKIPPED and info["other_files"] == 1 and info["faiss"] is None
    assert info["source"] == {"kind": "folder", "path": str(folder)} and info["root"] == str(folder)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "index.json", "embeddings-000001.npy", "paths-000001.json", "fingerprints-000001.json"]
    )
    index = SearchIndex.open(out)
    assert index.paths == sorted(IMAGES) and index.count == len(index) == 7
    assert isinstance(index.embeddings, np.memmap) and index.embeddings.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    recorded = json.loads((out / info["files"]["fingerprints"]).read_text())["skipped"]
    assert [(rel, reason) for rel, reason, _ in recorded] == [
        ("a/fake.jpg", "undecodable"),
        ("corrupt.png", "undecodable"),
        ("empty.png", "empty_file"),
    ]
    # the rows are the model's embeddings of the files, stored in float16
    expected = model.encode_images([folder / rel for rel in index.paths]).numpy()
    np.testing.assert_allclose(index.embeddings.astype(np.float32), expected, atol=2e-3)


@pytest.fixture
def indexed(folder, model, tmp_path) -> Path:
    out = tmp_path / "index"
    build_index(model, folder, out)
    return out


def test_cots_search_by_text_and_by_image(indexed, folder, model, capsys):
    assert search_main([str(indexed), "a red circle", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == {"text": "a red circle"} and result["count"] == 7 and result["model_id"] == model.model_id
    hits = result["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and set(hits[0]) == {"rank", "id", "path", "score", "file"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for hit in hits:
        assert Path(hit["file"]) == folder / hit["path"] and Path(hit["file"]).is_file()
    expected = Searcher(indexed, model=model).text("a red circle", k=3)
    assert [(h["id"], h["path"]) for h in hits] == [(h.id, h.path) for h in expected]
    text = model.encode_texts(["a red circle"])[0]
    for hit in hits:  # the score is the dot product of the caption's and the image's embeddings
        image = model.encode_images([folder / hit["path"]])[0]
        assert hit["score"] == pytest.approx(float(text @ image), abs=2e-3)

    assert search_main([str(indexed), "--image", str(folder / "a/b/green.jpg"), "-k", "1", "--json"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)["hits"]
    assert hit["path"] == "a/b/green.jpg" and hit["score"] == pytest.approx(1.0, abs=2e-3)

    assert search_main([str(indexed), "a red circle", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('"a red circle": top 2 of 7 images under') and model.model_id in lines[0]
    assert [line.split()[2] for line in lines[1:]] == [h.path for h in expected[:2]]


def test_cli_errors_go_to_stderr(indexed, folder, checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        search_main([str(indexed)])  # neither a caption nor --image
    assert search_main([str(tmp_path / "nothing"), "a red circle"]) == 2
    assert "no search index at" in capsys.readouterr().err
    assert search_main([str(indexed), "--image", str(folder / "corrupt.png")]) == 2
    assert "corrupt.png (undecodable)" in capsys.readouterr().err
    assert index_main([str(checkpoint), str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no folder or manifest" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("someone's file")
    assert index_main([str(checkpoint), str(folder), "--out", str(tmp_path / "busy"), "--quiet"]) == 2
    assert "not an index" in capsys.readouterr().err


def test_import_cots_search_loads_no_torch():
    code = "import sys, cots.search, cots.search.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- the Python API ------------------------------------------------------------------------------------
def test_image_queries_by_path_pil_and_bytes_and_neighbours(indexed, folder, model):
    searcher = Searcher(indexed, model=model)
    path = folder / "rgba.png"  # transparency composited on white, from a path, a PIL image or bytes alike
    by_path = searcher.image(path, k=7)
    assert len(by_path) == 7 and by_path[0].path == "rgba.png"
    assert searcher.image(Image.open(path), k=7) == by_path
    assert searcher.image(path.read_bytes(), k=7) == by_path
    with pytest.raises(UnreadableImage, match="undecodable"):
        searcher.image(b"not an image")
    item = searcher.index.id_of("a/red.png")
    neighbours = searcher.neighbours(item, k=3)
    assert len(neighbours) == 3 and item not in [h.id for h in neighbours]
    assert [h.id for h in neighbours] == [
        h.id for h in searcher.search_vectors(searcher.index.vectors([item]), 4)[0][1:]
    ]
    assert len(searcher.neighbours(item, k=50)) == 6
    with pytest.raises(IndexError):
        searcher.neighbours(7)
    assert len(searcher.texts(["red", "blue"], k=2)) == 2 and len(searcher.text("red", k=100)) == 7


def test_the_recorded_model_is_loaded_when_none_is_given(indexed, model):
    searcher = Searcher(indexed)
    assert searcher.model.checksum == model.checksum and searcher.model is not model
    assert searcher.text("red", k=3) == Searcher(indexed, model=model).text("red", k=3)


def test_a_model_mismatch_is_refused_naming_both(indexed, folder, model, other_checkpoint, capsys):
    other = cots.load(other_checkpoint)
    assert other.checksum != model.checksum
    with pytest.raises(ModelMismatch) as caught:
        Searcher(indexed, model=other)
    for name in (model.model_id, model.checksum, other.model_id, other.checksum):
        assert name in str(caught.value)
    with pytest.raises(ModelMismatch, match=other.model_id):
        build_index(other, folder, indexed)  # an update with another model
    assert search_main([str(indexed), "red", "--model", str(other_checkpoint)]) == 2
    assert model.model_id in capsys.readouterr().err
    report = build_index(other, folder, indexed, rebuild=True)
    assert report.mode == "rebuild" and report.encoded == 7 and SearchIndex.open(indexed).checksum == other.checksum


# -- incremental updates --------------------------------------------------------------------------------
def _spy(monkeypatch, model: Retriever) -> dict:
    """Record the files ``prepare_image`` reads and the rows ``encode_images`` embeds."""
    seen = {"files": [], "rows": 0}
    prepare, encode = model.prepare_image, model.encode_images

    def prepare_spy(item):
        if isinstance(item, (str, Path)):
            seen["files"].append(Path(item).name)
        return prepare(item)

    def encode_spy(items, batch_size=None):
        result = encode(items, batch_size)
        seen["rows"] += result.shape[0]
        return result

    monkeypatch.setattr(model, "prepare_image", prepare_spy)
    monkeypatch.setattr(model, "encode_images", encode_spy)
    return seen


def test_an_update_encodes_only_added_and_changed_files_and_equals_a_fresh_build(
    indexed, folder, model, tmp_path, monkeypatch
):
    before = SearchIndex.open(indexed)
    write_image(folder / "a/new.png", (0, 200, 200))
    (folder / "bmp/yellow.bmp").unlink()
    write_image(folder / "a/b/green.jpg", (90, 90, 90), size=(50, 20))
    (folder / "empty.png").write_bytes((folder / "a/red.png").read_bytes())  # was empty: now an image
    for rel in ("a/new.png", "a/b/green.jpg", "empty.png"):
        age(folder / rel, HOUR_NS // 2)  # changed half an hour ago (well after the recorded mtimes)
    seen = _spy(monkeypatch, model)
    report = build_index(model, folder, indexed)
    assert sorted(seen["files"]) == ["empty.png", "green.jpg", "new.png"] and seen["rows"] == 3
    assert (report.added, report.changed, report.removed, report.unchanged) == (2, 1, 1, 5)
    assert report.mode == "update" and report.skipped == {"undecodable": 2}  # undecodable files not read again
    after = SearchIndex.open(indexed)
    # unchanged and changed files keep their ids; the removal shifts the ids after it; added files come last
    assert after.paths == [p for p in before.paths if p != "bmp/yellow.bmp"] + ["a/new.png", "empty.png"]
    assert sorted(p.name for p in indexed.glob("*-00000*")) == [
        "embeddings-000002.npy",
        "fingerprints-000002.json",
        "paths-000002.json",
    ]

    fresh_dir = tmp_path / "fresh"
    build_index(model, folder, fresh_dir)
    updated, fresh = _rows_by_path(indexed), _rows_by_path(fresh_dir)
    assert updated.keys() == fresh.keys()
    for rel in fresh:
        np.testing.assert_allclose(updated[rel], fresh[rel], atol=1e-3)
    for query in ("a red circle", "grey"):
        ours = {h.path: h.score for h in Searcher(indexed, model=model).text(query, k=100)}
        theirs = {h.path: h.score for h in Searcher(fresh_dir, model=model).text(query, k=100)}
        assert ours.keys() == theirs.keys()
        assert all(ours[p] == pytest.approx(theirs[p], abs=2e-3) for p in ours)

    seen["files"].clear()
    report = build_index(model, folder, indexed)  # nothing changed: nothing read
    assert seen["files"] == [] and (report.encoded, report.removed, report.unchanged) == (0, 0, 8)
    assert SearchIndex.open(indexed).paths == after.paths


def test_hash_mode_ignores_touch_and_sees_same_size_edits(indexed, folder, model, monkeypatch):
    build_index(model, folder, indexed, use_hash=True)  # records the hashes (size and mtime unchanged)
    assert json.loads((indexed / "index.json").read_text())["change_detection"] == "sha256"
    seen = _spy(monkeypatch, model)
    age(folder / "a/red.png", HOUR_NS // 2)  # touched: same content
    same_size = folder / "gif/anim.gif"
    content = same_size.read_bytes()
    write_image(same_size, (1, 2, 3))
    if len(same_size.read_bytes()) != len(content):  # make the edit keep the size and the mtime
        same_size.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    age(same_size, HOUR_NS)
    report = build_index(model, folder, indexed, use_hash=True)
    assert report.changed == 1 and seen["files"] == ["anim.gif"]
    seen["files"].clear()
    age(folder / "a/red.png", HOUR_NS // 4)
    assert build_index(model, folder, indexed).changed == 1 and seen["files"] == ["red.png"]  # without --hash


def test_a_manifest_is_indexed_in_its_order_and_its_bad_entries_counted(folder, model, tmp_path):
    entries = ["bmp/yellow.bmp", "a/red.png", "a/../a/red.png", "../outside.png", "missing.png", "a/fake.jpg"]
    manifest = folder / "gallery.json"
    manifest.write_text(json.dumps([{"image": rel, "caption": "x"} for rel in entries]))
    report = build_index(model, manifest, tmp_path / "index")
    index = SearchIndex.open(tmp_path / "index")
    assert index.paths == ["bmp/yellow.bmp", "a/red.png"] and index.root == folder
    assert report.skipped == {"duplicate": 1, "missing_file": 1, "outside_root": 1, "undecodable": 1}
    assert index.info["source"] == {"kind": "manifest", "path": str(manifest)}


# -- safety: paths, interruptions, concurrent builds ------------------------------------------------------
def test_resolve_refuses_ids_out_of_range_and_never_leaves_the_root(indexed, folder, tmp_path):
    index = SearchIndex.open(indexed)
    assert index.resolve(0) == (folder / index.paths[0]).resolve()
    assert index.resolve(np.int64(6)).is_relative_to(folder)
    for bad in (-1, 7, 10**12):
        with pytest.raises(IndexError):
            index.resolve(bad)
    for bad in (True, 1.5, "3", None):
        with pytest.raises(TypeError):
            index.resolve(bad)
    outside = tmp_path / "secret.png"
    write_image(outside, (1, 1, 1))
    link = folder / "a/red.png"
    link.unlink()
    link.symlink_to(outside)  # replaced by a symlink leading out after indexing
    with pytest.raises(UnsafePath, match="outside the indexed root"):
        index.resolve(index.id_of("a/red.png"))
    for tampered in ("../secret.png", str(outside), "a/../../secret.png", ""):
        index.paths[0] = tampered  # as if paths-<gen>.json had been edited
        with pytest.raises(UnsafePath):
            index.resolve(0)


def test_an_interrupted_build_leaves_the_previous_index_usable(indexed, folder, model, monkeypatch):
    expected = Searcher(indexed, model=model).text("red", k=7)
    write_image(folder / "a/new.png", (0, 200, 200))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("cots.search.layout.os.replace", killed)  # the data files are written, index.json is not
    with pytest.raises(KeyboardInterrupt):
        build_index(model, folder, indexed)
    monkeypatch.undo()
    assert (indexed / "embeddings-000002.npy").exists()  # the unfinished generation
    assert Searcher(indexed, model=model).text("red", k=7) == expected
    assert build_index(model, folder, indexed).added == 1
    assert not (indexed / "embeddings-000002.npy").exists() and (indexed / "embeddings-000003.npy").exists()


def test_a_second_build_at_once_is_refused(indexed, folder, model):
    with locked(indexed), pytest.raises(SearchError, match="another cots-index is writing"):
        build_index(model, folder, indexed)


# -- exact top-k ----------------------------------------------------------------------------------------
def _brute_force(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix, each row sorted by score descending then id ascending."""
    scores = queries.astype(np.float32) @ gallery.astype(np.float32).T
    ids = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, ids, 1), ids


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_exact_top_k_equals_a_brute_force_argsort_ties_included(dtype):
    """Small integer vectors: every dot product is exact in float32, and many tie (across chunk boundaries)."""
    rng = np.random.default_rng(0)
    gallery = rng.integers(-1, 2, size=(203, 6)).astype(dtype)
    queries = rng.integers(-1, 2, size=(9, 6)).astype(np.float32)
    for k in (1, 5, 17, 203, 500):
        want_scores, want_ids = _brute_force(queries, gallery, k)
        for chunk_rows in (1, 7, 50, 202, None):
            scores, ids = top_k(torch.from_numpy(queries), gallery, k, chunk_rows=chunk_rows)
            assert np.array_equal(ids.numpy(), want_ids), (k, chunk_rows)
            assert np.array_equal(scores.numpy(), want_scores)


def test_exact_top_k_on_unit_vectors_keeps_within_its_memory_budget():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((5000, 64)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = torch.from_numpy(gallery[:3] + 0.1 * rng.standard_normal((3, 64)).astype(np.float32))

    class Recorder(np.ndarray):
        blocks: list[int] = []

        def __getitem__(self, item):
            if isinstance(item, slice):
                Recorder.blocks.append(len(range(*item.indices(self.shape[0]))))
            return np.asarray(self)[item]

    budget_mb = 0.25
    rows = rows_per_chunk(3, 64, 4, budget_mb)
    assert rows == int(0.25 * 2**20) // (64 * 8 + 3 * 13)
    scores, ids = top_k(queries, gallery.view(Recorder), 10, memory_budget_mb=budget_mb)
    assert max(Recorder.blocks) == rows < 5000 and sum(Recorder.blocks) == 5000
    want_scores, want_ids = _brute_force(queries.numpy(), gallery, 10)
    assert np.array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-6)
    assert top_k(queries, gallery[:0], 5)[1].shape == (3, 0)


# -- FAISS ----------------------------------------------------------------------------------------------
def test_faiss_flat_equals_exact_and_a_stored_index_is_used(indexed, folder, model):
    pytest.importorskip("faiss")  # installed by `make test` (the Makefile installs the faiss extra)
    rng = np.random.default_rng(2)
    gallery = rng.standard_normal((3000, 32)).astype(np.float16)
    gallery /= np.linalg.norm(gallery.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    queries = torch.from_numpy(rng.standard_normal((5, 32)).astype(np.float32))
    flat = faiss_kinds.FaissBackend(faiss_kinds.build(gallery, faiss_kinds.plan("flat", 3000)), {})
    scores, ids = flat.top_k(queries, 20)
    want_scores, want_ids = top_k(queries, gallery, 20)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)

    exact = Searcher(indexed, model=model).text("red", k=7)
    assert [h.id for h in Searcher(indexed, model=model, backend="faiss").text("red", k=7)] == [h.id for h in exact]
    report = build_index(model, folder, indexed, faiss="ivf")  # stored; nprobe covers every cell of 7 rows
    assert report.info["faiss"] == {"kind": "ivf", "factory": "IVF3,Flat", "search_params": {"nprobe": 3}}
    searcher = Searcher(indexed, model=model, backend="faiss")
    assert searcher._backend.index.nlist == 3
    assert [h.id for h in searcher.text("red", k=7)] == [h.id for h in exact]


def test_without_faiss_the_error_names_the_extra(indexed, model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(MissingFaiss, match=r"pip install -e \.\[faiss\]"):
        Searcher(indexed, model=model, backend="faiss")
    assert search_main([str(indexed), "red", "--backend", "faiss"]) == 2
    assert "pip install -e .[faiss]" in capsys.readouterr().err


def test_a_float32_index_and_a_dtype_change(indexed, folder, model):
    report = build_index(model, folder, indexed, dtype="float32")
    assert report.mode.startswith("rebuild (float16 rows") and report.encoded == 7
    index = SearchIndex.open(indexed)
    assert index.embeddings.dtype == np.float32
    expected = model.encode_images([folder / rel for rel in index.paths])
    torch.testing.assert_close(torch.from_numpy(np.asarray(index.embeddings)), expected, atol=1e-6, rtol=0)
