"""bench/search.py: its ``--quick`` path in-process, so that the benchmark of the search back ends cannot rot.

Two tiny sizes through the real code path (rows written as ``cots-index`` writes them, ``ExactBackend`` over
the memory map, FAISS flat / HNSW / IVF as ``faiss_backend`` plans and builds them); a few seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import search as search_bench  # noqa: E402  (bench/search.py)

pytest.importorskip("faiss")  # installed by `make test` (the Makefile installs the faiss extra)


def test_quick_search_bench_measures_every_back_end_at_every_size(tmp_path, capsys):
    out = tmp_path / "search.md"
    work = tmp_path / "work"
    extra = ["--search-params", "hnsw:efSearch=128"]
    result = search_bench.main(["--quick", "--in-process", "--out", str(out), "--work-dir", str(work), *extra])

    rows = result["rows"]
    backends = [*search_bench.BACKENDS[:3], "faiss hnsw efSearch=128", search_bench.BACKENDS[3]]
    assert [(r["size"], r["backend"]) for r in rows] == [
        (size, backend) for size in (1000, 4000) for backend in backends
    ]
    for row in rows:
        assert row["status"].startswith("measured"), row
        assert 0.0 <= row["recall"] <= 1.0 and 0.0 <= row["batch_recall"] <= 1.0
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["batch_qps"] > 0
    for row in rows:
        if row["backend"] in ("exact", "faiss flat"):  # both exact: equal top-10 (no ties in continuous data)
            assert row["recall"] == 1.0 and row["batch_recall"] == 1.0
    assert all(row["build_s"] >= 0 for row in rows if row["backend"] in search_bench.BACKENDS)
    specs = [r["spec"] for r in rows if r["size"] == 4000 and r["spec"]]
    assert [spec["factory"] for spec in specs] == ["Flat", "HNSW32,Flat", "HNSW32,Flat", "IVF63,Flat"]
    assert [spec["search_params"] for spec in specs[1:3]] == [{"efSearch": 64}, {"efSearch": 128}]
    for check in result["checks"]:  # exact's ground truth against a brute-force torch.topk
        assert check["brute_force_identical_lists"] == 1.0 and check["brute_force_recall"] == 1.0

    table = out.read_text()
    assert "| 4,000 | faiss ivf | IVF63,Flat | nprobe=16 |" in table and "clustered" in table
    assert "| 1,000 | exact | chunked matmul |" in table and table in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["recall"] == 1.0
    assert "| 1,000 | faiss hnsw efSearch=128 | HNSW32,Flat | efSearch=128 |" in table
    assert not (work / "1000").exists()  # the indexes are removed unless --keep


def test_a_failing_phase_is_reported_in_its_row_not_faked(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no memory for this index")

    monkeypatch.setitem(search_bench.PHASES, "build", broken)
    result = search_bench.main(["--quick", "--in-process", "--sizes", "1000", "--queries", "5", "--out", ""])
    hnsw = next(r for r in result["rows"] if r["backend"] == "faiss hnsw")
    assert hnsw["status"] == "build failed: RuntimeError: no memory for this index" and "recall" not in hnsw
    assert next(r for r in result["rows"] if r["backend"] == "exact")["recall"] == 1.0
