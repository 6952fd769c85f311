"""Fuzz: a manifest full of broken images and captions trains through; too many stops with a clear message."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cots.guards import RunGuardError
from cots.train import train


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid small PNG whose IHDR claims width x height (a decompression bomb by declaration)."""
    Image.new("RGB", (8, 8), "red").save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # type + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def build_fuzz_set(root: Path, good: int = 48) -> tuple[Path, dict[str, int]]:
    """Good images plus one of every kind of bad input; returns the manifest and the expected skip reasons."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"good{i}.png")
        entries.append({"image": f"good{i}.png", "caption": f"a picture number {i % 7}"})
    # usable but unusual formats: CMYK, palette, 16-bit, grey, grey+alpha, RGBA
    Image.new("CMYK", (30, 20), (0, 100, 200, 0)).save(root / "cmyk.jpg")
    Image.new("P", (20, 20), 3).save(root / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / "sixteen.png")
    Image.new("L", (20, 20), 128).save(root / "grey.png")
    Image.new("LA", (20, 20), (128, 10)).save(root / "grey_alpha.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(root / "rgba.png")
    for name in ("cmyk.jpg", "palette.png", "sixteen.png", "grey.png", "grey_alpha.png", "rgba.png"):
        entries.append({"image": name, "caption": f"an unusual {name}"})
    # unusable images
    Image.new("RGB", (64, 64), "blue").save(root / "whole.jpg")
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:200])
    Image.new("RGB", (64, 64), "blue").save(root / "whole.png")
    (root / "truncated.png").write_bytes((root / "whole.png").read_bytes()[:60])
    (root / "empty.png").write_bytes(b"")
    _png_declaring(root / "bomb.png", 20000, 20000)
    bad = {
        "truncated.jpg": "undecodable",
        "truncated.png": "undecodable",
        "empty.png": "undecodable",
        "missing.png": "missing_file",
        "bomb.png": "too_large",
    }
    for name in bad:
        entries.append({"image": name, "caption": f"broken {name}"})
    # unusable captions (on good images)
    entries += [
        {"image": "good0.png", "caption": ""},
        {"image": "good1.png", "caption": "   \t "},
        {"image": "good2.png", "caption": " ".join(["word"] * 10_000)},
        {"image": "good3.png", "caption": "MARKER"},
    ]
    raw = json.dumps(entries).encode().replace(b"MARKER", b"caf\xe9 \xff\xfe latin-1")  # not UTF-8
    (root / "train.json").write_bytes(raw)
    expected = {}
    for reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    return root / "train.json", expected


def _cfg(make_cfg, manifest: Path, *overrides: str):
    return make_cfg(
        "data.synthetic=null",
        f"data.train_manifest={manifest}",
        f"data.val_manifest={manifest}",
        "data.test_manifest=null",
        "data.batch_size=8",
        "trainer.limit_val_batches=0",
        "trainer.check_val_every_n_epoch=null",
        *overrides,
    )


def test_training_runs_through_bad_inputs_and_counts_them_per_reason(make_cfg, tmp_path):
    manifest, expected = build_fuzz_set(tmp_path / "fuzz")
    # about 8% of the pairs are unusable: allowed up to 30% here
    _, objects = train(
        _cfg(make_cfg, manifest, "trainer.max_steps=14", "trainer.max_epochs=-1", "module.max_skip_fraction=0.3")
    )
    module = objects["module"]
    print(
        f"fuzz run: {module.samples_seen} samples trained on, skipped {dict(module.skipped)}, "
        f"dropped {dict(objects['datamodule'].train_set.dropped)}"
    )
    assert objects["trainer"].global_step == 14
    assert set(module.skipped) == set(expected)  # every unusable kind was met and named
    pairs = objects["datamodule"].train_set
    assert pairs.dropped["empty_caption"] == 2  # "" and whitespace only
    assert any("\ufffd" in caption for caption in pairs.captions())  # the non-UTF-8 caption is kept, repaired
    logged = objects["trainer"].callback_metrics
    assert any(key.startswith("data/skipped_") for key in logged)


def test_too_many_unusable_samples_stop_the_run_naming_the_limit(make_cfg, tmp_path):
    manifest, _ = build_fuzz_set(tmp_path / "fuzz", good=8)
    with pytest.raises(RunGuardError, match="max_skip_fraction"):
        train(
            _cfg(make_cfg, manifest, "trainer.max_steps=40", "trainer.max_epochs=-1", "module.max_skip_fraction=0.05")
        )


def test_non_finite_losses_are_skipped_then_stop_the_run(make_cfg, monkeypatch):
    from cots.training_step import TrainingStep

    original = TrainingStep.__call__
    calls = {"n": 0}

    def poisoned(self, model, batch):
        step = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] in (2, 3) or calls["n"] >= 6:
            step.terms["loss"] = step.terms["loss"] * float("nan")
        return step

    monkeypatch.setattr(TrainingStep, "__call__", poisoned)
    with pytest.raises(RunGuardError, match="consecutive non-finite"):
        train(make_cfg("trainer.max_steps=30", "module.max_nonfinite_steps=4", "~callbacks.model_checkpoint"))
    assert calls["n"] == 9  # 2 skipped, 2 good, then 4 in a row stop it


def _training_state(trainer, module) -> dict:
    """Everything an update could move: weights, EMA twins, queues, AMF queue, tau, optimizer and scheduler."""
    import copy

    return {
        "tensors": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
    }


def _changed(before: dict, after: dict) -> set[str]:
    import torch

    changed = {k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])}
    groups = {".".join(k.split(".")[:2]) for k in changed}  # model.encoder, amf.similarity_queue, ...
    opt_b, opt_a = before["optimizer"]["state"], after["optimizer"]["state"]
    if opt_b.keys() != opt_a.keys() or any(
        not torch.equal(torch.as_tensor(opt_b[p][f]), torch.as_tensor(opt_a[p][f])) for p in opt_b for f in opt_b[p]
    ):
        groups.add("optimizer")
    if before["scheduler"] != after["scheduler"]:
        groups.add("scheduler")
    return groups


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_skipped_non_finite_step_changes_nothing_but_counts_as_a_step(make_cfg, monkeypatch, accumulate):
    """A NaN loss in any micro-batch cancels its optimizer step: weights, EMA, queues, optimizer state and the
    schedule stay as they were; global_step still counts the batch(es) it consumed."""
    import lightning as L
    from omegaconf import open_dict

    from cots.training_step import TrainingStep

    original = TrainingStep.__call__
    calls = {"n": 0}
    poisoned_call = 2 * accumulate + 1  # the first micro-batch of the third optimizer step

    def poisoned(self, model, batch):
        step = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == poisoned_call:
            step.terms["loss"] = step.terms["loss"] * float("nan")
        return step

    windows: dict[str, set[str]] = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx % accumulate == 0:
                self.before = _training_state(trainer, module)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % accumulate == 0:
                window = "poisoned" if batch_idx // accumulate == 2 else f"clean{batch_idx // accumulate}"
                windows[window] = _changed(self.before, _training_state(trainer, module))

    monkeypatch.setattr(TrainingStep, "__call__", poisoned)
    globals()["Probe"] = Probe
    cfg = make_cfg(
        "trainer.max_steps=5",
        f"trainer.accumulate_grad_batches={accumulate}",
        "objective.amf.queue_size=16",
        "optim.scheduler.warmup_steps=3",
    )
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": f"{__name__}.Probe"}
    _, objects = train(cfg)
    moved = {
        "model.encoder",
        "model.momentum_encoder",
        "model.feature_queue",
        "model.log_temperature",
        "amf.similarity_queue",
        "optimizer",
        "scheduler",
    }
    assert windows["clean1"] == moved  # a test of this test: a normal step moves every piece
    assert windows["poisoned"] == set()
    assert objects["trainer"].global_step == 5 and calls["n"] == 5 * accumulate  # the skipped step counted


def test_a_checkpoint_of_non_finite_weights_is_refused(make_cfg, tmp_path):
    import torch

    _, objects = train(make_cfg("trainer.max_steps=2"))
    with torch.no_grad():
        next(objects["module"].model.encoder.parameters()).fill_(float("nan"))
    with pytest.raises(RunGuardError, match="non-finite weights"):
        objects["trainer"].save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
