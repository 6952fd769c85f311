"""bench/evidence.py: resumable multi-seed runs, their records, and the tables built from them.

The runs are the real path (``cots.train.train`` on the tiny synthetic settings of conftest.TINY),
with fixed steps instead of a calibrated budget; the table arithmetic is checked on records whose
values are chosen so that the mean and standard deviation are known.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
from conftest import TINY

from cots.checkpoints import read_checkpoint
from cots.data.manifest import ManifestError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import evidence  # noqa: E402


class CrashAt(L.Callback):
    """Fails the run at optimizer step ``step``, as a session that ends mid-run would stop it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"stopped at step {trainer.global_step}")


def tiny_table(data_dir: Path, rows: tuple[evidence.Row, ...] | None = None, galleries=None) -> evidence.Table:
    return evidence.Table(
        "tiny",
        "tiny runs",
        rows or (evidence.Row("contrastive", ("objective=contrastive_only",)),),
        seeds=(0, 1),
        base=(
            *TINY,
            f"paths.data_dir={data_dir}",
            "callbacks.model_checkpoint.monitor=null",
            "callbacks.model_checkpoint.save_top_k=0",
        ),
        splits={"test": evidence.Split(None, galleries or {"shapes": "test.json"})},
    )


def test_interrupted_run_resumes_and_finished_runs_are_skipped(tmp_path, data_dir, monkeypatch):
    table = tiny_table(data_dir)
    results, logs = tmp_path / "results", tmp_path / "logs"
    budget = evidence.Budget(steps=4)
    crash = f"+callbacks.crash={{_target_:{CrashAt.__module__}.CrashAt,step:3}}"
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        evidence.run_table(table, "test", [0], budget, results, logs, extra=[crash], checkpoint_every=2)
    run_dir = logs / "tiny" / "contrastive__seed0"
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not evidence.record_path(results, table, "test", table.rows[0], 0).exists()

    # code changed since the run started: the sitting refuses to resume it, naming the run folder
    started_on = evidence.code_fingerprint()
    monkeypatch.setattr(evidence, "code_fingerprint", lambda: "f" * 64)
    with pytest.raises(SystemExit, match=f"(?s){run_dir} was started on other code.*'contrastive' seed 0"):
        evidence.run_table(table, "test", [0, 1], budget, results, logs, checkpoint_every=2)
    monkeypatch.setattr(evidence, "code_fingerprint", lambda: started_on)

    # the next sitting resumes seed 0 from its last.ckpt and runs seed 1 from scratch
    outcome = evidence.run_table(table, "test", [0, 1], budget, results, logs, checkpoint_every=2)
    assert outcome == [("contrastive", 0, "resumed"), ("contrastive", 1, "ran")]
    record = json.loads(evidence.record_path(results, table, "test", table.rows[0], 0).read_text())
    assert record["global_step"] == 4 and record["steps"] == 4 and record["resumed"]
    assert [(s["start_step"], s["end_step"]) for s in record["sittings"]] == [(0, 3), (2, 4)]
    assert record["train_minutes"] == pytest.approx(sum(s["seconds"] for s in record["sittings"]) / 60)
    assert "seed=0" in record["overrides"] and record["galleries"]["shapes"]["images"] == 64
    assert record["code"] == started_on
    assert 0.0 <= record["galleries"]["shapes"]["rsum"] <= 600.0
    assert not (run_dir / "checkpoints").exists()  # crash-recovery files go once the record is written
    fresh = json.loads(evidence.record_path(results, table, "test", table.rows[0], 1).read_text())
    assert not fresh["resumed"] and len(fresh["sittings"]) == 1

    # a third sitting finds both records and trains nothing
    monkeypatch.setattr(evidence, "train", lambda cfg: pytest.fail("a finished run was trained again"))
    outcome = evidence.run_table(table, "test", [0, 1], budget, results, logs, checkpoint_every=2)
    assert outcome == [("contrastive", 0, "skipped"), ("contrastive", 1, "skipped")]


def write_record(
    results: Path, table: evidence.Table, row: evidence.Row, seed: int, rsum: dict[str, float], **extra
) -> None:
    galleries = {
        name: {"rsum": value, "manifest": f"/d/test_{name}.json", "images": 10, "captions": 10}
        for name, value in rsum.items()
    }
    record = {
        "row": row.name,
        "row_slug": row.slug,
        "seed": seed,
        "steps": 7,
        "galleries": galleries,
        "train_minutes": 2.0,
        "budget_minutes": 1.5,
        "budget_seconds": 90.0,
        "commit": "abc",
        **extra,
    }
    evidence.write_json_atomic(evidence.record_path(results, table, "test", row, seed), record)


def test_table_mean_std_and_seed_values_come_from_the_records(tmp_path):
    rows = (evidence.Row("base"), evidence.Row("more", vs="base"), evidence.Row("google only", vendor="google"))
    table = tiny_table(tmp_path, rows, {"google": "test_google.json", "twitter": "test_twitter.json"})
    results = tmp_path / "results"
    base = {0: (100.0, 90.0), 1: (110.0, 96.0), 2: (120.0, 93.0)}
    for seed, (google, twitter) in base.items():
        write_record(results, table, rows[0], seed, {"google": google, "twitter": twitter})
    noisy = {"filtered_noisy": 5.0, "filtered_clean": 5.0, "kept_noisy": 1.0, "kept_clean": 9.0}
    write_record(results, table, rows[1], 0, {"google": 130.0, "twitter": 100.0}, amf_precision=0.5, amf_counts=noisy)
    write_record(results, table, rows[1], 2, {"google": 140.0, "twitter": 104.0}, amf_precision=0.7, amf_counts=noisy)
    # on clean data everything AMF drops is clean: its precision against injected noise is undefined, not 0
    clean = {"filtered_noisy": 0.0, "filtered_clean": 7.0, "kept_noisy": 0.0, "kept_clean": 93.0}
    write_record(results, table, rows[0], 0, {"google": 100.0, "twitter": 90.0}, amf_precision=0.0, amf_counts=clean)
    write_record(results, table, rows[2], 0, {"google": 150.0, "twitter": 60.0})
    write_record(results, table, rows[2], 1, {"google": 160.0, "twitter": 80.0})

    markdown, summaries = evidence.build_table(table, "test", results, seeds=[0, 1, 2])
    assert "Built by `python bench/evidence.py table tiny --seeds 0 1 2` from 7 records" in markdown
    first, second, vendor = summaries
    assert first["n"] == 3 and first["missing"] == []
    assert first["rsum"]["google"]["mean"] == pytest.approx(110.0)
    assert first["rsum"]["google"]["std"] == pytest.approx(10.0)  # sample std (n - 1)
    assert first["rsum"]["twitter"]["std"] == pytest.approx(statistics.stdev([90.0, 96.0, 93.0]))
    assert first["rsum"]["google"]["per_seed"] == {0: 100.0, 1: 110.0, 2: 120.0}
    assert second["n"] == 2 and second["missing"] == [1]
    assert second["rsum"]["google"]["per_seed"] == {0: 130.0, 1: None, 2: 140.0}
    assert second["amf_precision"][0] == pytest.approx(0.6)
    assert first["amf_precision"] == (None, None)
    assert vendor["in_minus_cross"][0] == pytest.approx(85.0)  # (90 + 80) / 2, within each run
    assert vendor["in_minus_cross"][1] == pytest.approx(statistics.stdev([90.0, 80.0]))
    lines = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "110.0 ± 10.0" in lines["base"] and "0: 100.0 / 90.0" in lines["base"]
    assert "135.0 ± 7.1" in lines["more"] and "1: – / –" in lines["more"] and "2/3" in lines["more"]
    # Δ vs base: "more" lacks seed 1, so the per-seed differences over seeds 0 and 2 (30 and 20), ± their
    # standard error; the difference of the rows' means would be the same 25 here by luck, its error not
    assert "+25.0 ± 5.0 (seeds 0 2)" in lines["more"]
    # each gallery against the same gallery of the other row, in the table's gallery order (Twitter: +10, +11)
    assert "| +25.0 ± 5.0 (seeds 0 2) | +10.5 ± 0.5 (seeds 0 2) |" in lines["more"]
    write_record(results, table, rows[1], 1, {"google": 100.0, "twitter": 90.0})  # now the same seeds as base
    markdown, _ = evidence.build_table(table, "test", results, seeds=[0, 1, 2])
    lines = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    # same seeds: +30, -10, +20 seed against seed, no seeds named (Welch's unpaired error: 13.3)
    assert "+13.3 ± 12.0 |" in lines["more"]


def test_delta_between_rows_pairs_the_seeds_both_have():
    def row(per_seed):
        values = [v for v in per_seed.values() if v is not None]
        std = statistics.stdev(values) if len(values) > 1 else None
        return {"mean": statistics.fmean(values) if values else None, "std": std, "per_seed": per_seed}

    lucky_seed_missing = row({0: 10.0, 1: None, 2: 30.0})
    base = row({0: 0.0, 1: 100.0, 2: 0.0})  # seed 1 is this row's lucky seed
    # the difference of the means, 20 - 33.3, would read -13.3; seed against seed it is +10 and +30
    assert evidence.delta(lucky_seed_missing, base) == "+20.0 ± 10.0 (seeds 0 2)"
    assert evidence.delta(row({1: 5.0}), base) == "-95.0 (seed 1)"  # one seed in common: no error bar
    assert evidence.delta(row({3: 5.0}), base) == "– (no seed in common)"
    assert evidence.delta(row({7: 5.0}), row({7: 2.0})) == "+3.0"  # one seed each, the same one: nothing named
    assert evidence.delta(row({0: None}), base) == "–"  # a row without records


def test_vilem_accuracies_are_tabled_from_the_first_gallery(tmp_path):
    rows = (evidence.Row("cmlm"), evidence.Row("vilem", vs="cmlm"))
    table = tiny_table(tmp_path, rows, {"google": "test_google.json", "twitter": "test_twitter.json"})
    results = tmp_path / "results"
    write_record(results, table, rows[0], 0, {"google": 100.0, "twitter": 90.0})
    for seed, det in ((0, 84.0), (1, 86.0)):
        write_record(results, table, rows[1], seed, {"google": 100.0, "twitter": 90.0})
        path = evidence.record_path(results, table, "test", rows[1], seed)
        record = json.loads(path.read_text())
        record["galleries"]["google"].update(vilem_det_acc=det, vilem_det_majority=80.0, vilem_cor_acc=50.0 + seed)
        record["galleries"]["twitter"].update(vilem_det_acc=0.0, vilem_det_majority=0.0, vilem_cor_acc=0.0)
        evidence.write_json_atomic(path, record)
    markdown, summaries = evidence.build_table(table, "test", results, seeds=[0, 1])
    assert "Built by `python bench/evidence.py table tiny` from" in markdown  # the table's own seeds: no --seeds
    assert summaries[0]["vilem_det_acc"] == (None, None)
    assert summaries[1]["vilem_det_acc"][0] == pytest.approx(85.0)  # the Google gallery's, not Twitter's
    assert "ViLEM detection % (majority), Google" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("| vilem "))
    assert "85.0 ± 1.4 (80.0)" in line and "50.5 ± 0.7" in line


def test_steps_follow_the_budget_and_each_row_timing():
    step_times = {"timings": {"demo": {"median_ms": 1500.0, "date": "d"}, "slow": {"median_ms": 1800.0, "date": "d"}}}
    budget = evidence.Budget(seconds=450 * 1.5, step_times=step_times)
    table = evidence.Table("t", "t", (evidence.Row("a", timing="demo"), evidence.Row("b", timing="slow")))
    assert budget.plan(table, table.rows[0])["steps"] == 450
    assert budget.plan(table, table.rows[1])["steps"] == 375  # 675 s / 1.8 s: a costlier step buys fewer
    # a compiled row pays its one-time compilation from the same budget: (675 s - 90 s) / 1.2 s
    step_times["timings"]["compiled"] = {"median_ms": 1200.0, "startup_s": 90.0, "date": "d"}
    assert budget.plan(table, evidence.Row("c", timing="compiled"))["steps"] == 488
    # a table calibrated in its own sitting takes its budget from its own demo timing
    assert evidence.default_budget_seconds(step_times, "slow") == pytest.approx(450 * 1.8)
    tuning = evidence.TABLES["tuning"]
    assert tuning.budget_timing == tuning.timing(tuning.rows[0])
    with pytest.raises(SystemExit, match="calibrate"):
        budget.plan(table, evidence.Row("c"))
    # a row whose step follows its batches (length buckets) pays for its long batches: steps x mean step
    step_times["timings"]["buckets"] = {"median_ms": 900.0, "mean_ms": 1125.0, "date": "d"}
    assert budget.plan(table, evidence.Row("d", timing="buckets"))["steps"] == 750
    assert budget.plan(table, evidence.Row("d", timing="buckets", step_statistic="mean"))["steps"] == 600
    with pytest.raises(SystemExit, match="no mean step"):
        budget.plan(table, evidence.Row("d", timing="demo", step_statistic="mean"))
    with pytest.raises(ValueError, match="step_statistic must be"):
        evidence.Row("e", step_statistic="p90")


def test_add_missing_times_a_new_row_beside_its_reference_and_stores_it_scaled(tmp_path, monkeypatch):
    """A row added to a half-run table: only it and the table's budget timing are timed; the machine runs
    2x slower than when the reference was stored, so the new row is stored at half its measured step
    (the ratio of one sitting) and no stored timing changes, so no run already made changes its steps."""
    rows = (evidence.Row("demo"), evidence.Row("old"), evidence.Row("new"))
    table = evidence.Table("t", "t", rows, budget_timing="t/demo")
    monkeypatch.setattr(evidence, "TABLES", {"t": table})
    monkeypatch.setattr(evidence, "build_cfg", lambda *args: None)
    monkeypatch.setattr(evidence, "preflight", lambda *args: [])
    now_seconds = {"demo": 2.0, "old": 1.8, "new": 1.0}  # a step now; stored: demo 1000 ms, old 900 ms
    timed = []

    def timed_segment(table, row, overrides, run_dir):
        timed.append(row.name)
        seeds.append(next(o for o in overrides if o.startswith("seed=")))
        # 4 slow first steps; then every third step twice as long (long batches): median 1x, mean 1.3x
        return [now_seconds[row.name] * (1.5 if i < 4 else 2.0 if i % 3 == 0 else 1.0) for i in range(14)]

    seeds = []

    monkeypatch.setattr(evidence, "_timed_segment", timed_segment)
    stored = {"timings": {"t/demo": {"median_ms": 1000.0}, "t/old": {"median_ms": 900.0}, "elsewhere": {"x": 1}}}
    path = tmp_path / "step_times.json"
    evidence.write_json_atomic(path, stored)
    evidence.main(["calibrate", "t", "--add-missing", "--step-times", str(path), "--logs", str(tmp_path / "logs")])
    assert timed == ["demo", "demo", "new", "demo", "new", "demo", "new"]  # warm-up, then 3 rounds; not 'old'
    assert seeds == ["seed=42"] * 3 + ["seed=43"] * 2 + ["seed=44"] * 2  # other batches each round
    timings = json.loads(path.read_text())["timings"]
    assert {k: timings[k] for k in ("t/demo", "t/old", "elsewhere")} == stored["timings"]
    new = timings["t/new"]
    assert new["median_ms"] == pytest.approx(500.0)  # 1000 ms x (1.0 s / 2.0 s)
    assert new["round_medians_ms"] == pytest.approx([500.0] * 3)
    assert new["p10_ms"] == pytest.approx(500.0) and new["measured"]["median_ms"] == pytest.approx(1000.0)
    assert new["mean_ms"] == pytest.approx(650.0) and new["measured"]["mean_ms"] == pytest.approx(1300.0)
    assert new["scaled_by"]["factor"] == pytest.approx(0.5) and new["scaled_by"]["reference"] == "t/demo"
    assert new["calibrated_with"]["t/demo"]["median_ms"] == pytest.approx(2000.0)
    # nothing missing: nothing timed; a reference never stored: nothing to scale to
    timed.clear()
    evidence.main(["calibrate", "t", "--add-missing", "--step-times", str(path), "--logs", str(tmp_path / "logs")])
    assert timed == []
    evidence.write_json_atomic(path, {"timings": {}})
    with pytest.raises(SystemExit, match="t/demo"):
        evidence.main(["calibrate", "t", "--add-missing", "--step-times", str(path), "--logs", str(tmp_path)])
    # without --add-missing every timing is measured and stored as measured
    evidence.main(["calibrate", "t", "--step-times", str(path), "--logs", str(tmp_path / "logs")])
    assert {k: v["median_ms"] for k, v in json.loads(path.read_text())["timings"].items()} == pytest.approx(
        {"t/demo": 2000.0, "t/old": 1800.0, "t/new": 1000.0}
    )


def test_a_table_with_its_own_budget_plans_its_steps_from_it(tmp_path, capsys):
    """The tuning table trains at the open_clip reference's 283 s, not the demo's budget."""
    step_times = {"timings": {"tuning/contrastive": {"median_ms": 1000.0, "startup_s": 3.0, "date": "d"}}}
    evidence.write_json_atomic(tmp_path / "step_times.json", step_times)
    evidence.main(["list", "tuning", "--results", str(tmp_path)])
    listed = capsys.readouterr().out
    assert (
        "'contrastive only': objective=contrastive_only; timing tuning/contrastive: 1000 ms (median) -> 280 steps"
        in listed
    )
    assert "tuning/demo: not calibrated" in listed  # its budget does not need the demo's timing


def test_budget_scale_multiplies_each_rows_steps(tmp_path, monkeypatch):
    """The GPU ablation (bench/gpu_evidence.sh) trains each row at 10x its CPU steps."""
    step_times = {"timings": {"tuning/contrastive": {"median_ms": 1000.0, "startup_s": 3.0, "date": "d"}}}
    evidence.write_json_atomic(tmp_path / "step_times.json", step_times)
    planned = []

    def run_table(table, split, seeds, budget, *args, **kwargs):
        planned.append(budget.plan(table, table.row("contrastive only")))
        return []

    monkeypatch.setattr(evidence, "run_table", run_table)
    args = ["run", "tuning", "--results", str(tmp_path), "--only", "contrastive only"]
    evidence.main(args)
    evidence.main([*args, "--budget-scale", "10"])
    assert [p["steps"] for p in planned] == [280, 2827]  # (283 s - 3 s) / 1 s; (2830 s - 3 s) / 1 s


def test_the_precision_line_covers_the_reference_row_borrowed_from_another_table(tmp_path, monkeypatch):
    galleries = {"google": "test_google.json", "twitter": "test_twitter.json"}
    demo = evidence.Row("demo")
    ref_table = replace(tiny_table(tmp_path, (demo,), galleries), name="tinyref")
    monkeypatch.setitem(evidence.TABLES, "tinyref", ref_table)
    table = replace(tiny_table(tmp_path, (evidence.Row("one vendor"),), galleries), reference=("tinyref", "demo"))
    results = tmp_path / "results"
    rsum = {"google": 100.0, "twitter": 90.0}
    write_record(results, table, table.rows[0], 0, rsum, precision="32-true", machine={"cpu": "AMD EPYC"})
    write_record(results, ref_table, demo, 0, rsum, precision="32-true", machine={"cpu": "AMD EPYC"})
    markdown, _ = evidence.build_table(table, "test", results)
    assert "Not every run trained alike" not in markdown
    write_record(results, ref_table, demo, 1, rsum, precision="bf16-mixed", machine={"cpu": "Xeon"})
    markdown, _ = evidence.build_table(table, "test", results)
    assert (
        "Not every run trained alike: 32-true on AMD EPYC: demo (reference: tinyref) seed 0, one_vendor seed 0; "
        "bf16-mixed on Xeon: demo (reference: tinyref) seed 1." in markdown
    )


def test_vendor_manifest_keeps_only_that_vendors_images(tmp_path):
    source = tmp_path / "emoji" / "train_names.json"
    source.parent.mkdir()
    entries = [
        {"image": "images/google/1f600.png", "caption": "grinning face"},
        {"image": "images/twitter/1f600.png", "caption": "grinning face"},
        {"image": "images/google/1f601.png", "caption": "beaming face"},
        {"image": "images/googlex/1f602.png", "caption": "not google"},
    ]
    source.write_text(json.dumps(entries))
    out = tmp_path / "run" / "train_google.json"
    assert evidence.vendor_manifest(source, "google", out) == 2
    kept = json.loads(out.read_text())
    assert [Path(e["image"]) for e in kept] == [
        source.parent / "images/google/1f600.png",
        source.parent / "images/google/1f601.png",
    ]
    assert [e["caption"] for e in kept] == ["grinning face", "beaming face"]
    with pytest.raises(ManifestError, match="apple"):
        evidence.vendor_manifest(source, "apple", out)


def test_the_table_names_runs_that_trained_in_another_precision_or_on_another_cpu(tmp_path):
    rows = (evidence.Row("off"), evidence.Row("on", vs="off"))
    table = tiny_table(tmp_path, rows, {"google": "test_google.json", "twitter": "test_twitter.json"})
    results = tmp_path / "results"
    avx512 = {"cpu": "Xeon (AVX512-BF16)"}
    for seed in (0, 1):
        write_record(results, table, rows[0], seed, {"google": 100.0, "twitter": 90.0}, machine=avx512)
    write_record(results, table, rows[1], 0, {"google": 100.0, "twitter": 90.0}, machine=avx512)
    markdown, _ = evidence.build_table(table, "test", results)
    assert "Not every run trained alike" not in markdown  # all alike: nothing to say
    # an older record names its precision only through its overrides; a newer one records it
    write_record(
        results, table, rows[1], 1, {"google": 1.0, "twitter": 1.0},
        overrides=["seed=1", "trainer.precision=32-true"], machine={"cpu": "AMD EPYC"},
    )  # fmt: skip
    markdown, _ = evidence.build_table(table, "test", results)
    assert (
        "Not every run trained alike: the experiment's on Xeon (AVX512-BF16): off seed 0, off seed 1, on seed 0; "
        "32-true on AMD EPYC: on seed 1." in markdown
    )
    assert (
        evidence.precision_of({"precision": "bf16-mixed", "overrides": ["trainer.precision=32-true"]}) == "bf16-mixed"
    )
