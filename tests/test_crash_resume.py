"""Crash recovery: last.ckpt on a schedule whatever is monitored, and kill -9 then resume = the uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY
from omegaconf import open_dict

from cots.callbacks import RecoveryCheckpoint
from cots.checkpoints import CheckpointError, read_checkpoint
from cots.train import train

# Dropout and drop-path on: a resume must continue every rank's random streams, not just the weights.
COMMON = (
    "trainer.deterministic=true",
    "trainer.limit_val_batches=0",
    "trainer.check_val_every_n_epoch=null",
    "trainer.max_epochs=-1",
    "data.synthetic.num_train=64",
    "callbacks.recovery_checkpoint.every_n_steps=3",
    "model.encoder.text_tower.dropout=0.1",
    "model.encoder.image_tower.drop_path_rate=0.1",
)
DDP = ("trainer=ddp_spawn_cpu", "data.batch_size=8")  # 2 processes x 8 = the same global batch of 16


class RandomStreams(L.Callback):
    """Writes a fingerprint of each rank's torch random state at every training batch to ``rank{r}.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.fingerprints: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.fingerprints.append(hash(bytes(torch.get_rng_state().numpy())))

    def on_train_end(self, trainer, module) -> None:
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.fingerprints))


def _with_streams(cfg, out_dir: Path):
    with open_dict(cfg):
        cfg.callbacks.streams = {"_target_": f"{__name__}.RandomStreams", "out_dir": str(out_dir)}
    return cfg


def _kill_mid_run(overrides: list[str], run_dir: Path, at_step: int, threads: int | None = None) -> Path:
    """Run ``cots.train`` in its own process group until it kills the group with SIGKILL at ``at_step``.

    ``threads``: torch threads of the run (the float summation order): default this process's; a
    ddp_spawn run in this process gives each worker cpu_count // 2.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads or torch.get_num_threads()),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    kill = f"+callbacks.kill={{_target_:kill_switch.KillProcessGroupAt,step:{at_step}}}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cots.train", *overrides, kill, f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        returncode = proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, f"the run ended with {returncode} before it was killed at step {at_step}"
    return run_dir / "checkpoints" / "last.ckpt"


def _ddp_spawn_threads() -> int:
    """Torch threads of each ddp_spawn worker started from this process (Lightning's rule for 2 processes)."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) // 2))


def _largest_difference(expected: dict, got: dict) -> tuple[str, float]:
    assert expected.keys() == got.keys()
    diffs = {k: (expected[k].float() - got[k].float()).abs().max().item() for k in expected}
    worst = max(diffs, key=diffs.get)
    return worst, diffs[worst]


class LearningRates(L.Callback):
    """The first group's learning rate at the start of every optimizer step, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


STEPS_PER_EPOCH = 12  # COMMON's 64 synthetic images, 3 captions each: 192 pairs in batches of 16


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    [7, STEPS_PER_EPOCH],
    ids=["inside-an-epoch", "saved-at-the-last-batch-of-an-epoch"],
)
def test_kill_9_mid_epoch_then_resume_matches_the_uninterrupted_run(make_cfg, tmp_path, data_dir, kill_at):
    _, full = train(make_cfg(*COMMON, "trainer.max_steps=40"))
    overrides = [*TINY, *COMMON, "trainer.max_steps=40", f"paths.data_dir={data_dir}"]
    last = _kill_mid_run(overrides, tmp_path / "crashed", at_step=kill_at)
    checkpoint = read_checkpoint(last)  # never truncated: saves are written to a temporary file and renamed
    assert checkpoint["global_step"] == kill_at // 3 * 3, checkpoint["global_step"]  # every_n_steps=3
    epoch_loop = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert epoch_loop["is_last_batch"] == (kill_at % STEPS_PER_EPOCH == 0), epoch_loop
    _, resumed = train(make_cfg(*COMMON, "trainer.max_steps=40", f"ckpt_path={last}"))
    assert resumed["trainer"].global_step == 40
    worst, diff = _largest_difference(full["module"].state_dict(), resumed["module"].state_dict())
    print(
        f"one process, dropout and drop-path on: kill -9 after the save at step {checkpoint['global_step']}, "
        f"resumed: largest difference {diff:.3g} ({worst})"
    )
    assert diff <= 1e-6, (worst, diff)
    for key in (
        "model.momentum_encoder.image_proj.weight",
        "model.feature_queue.text.data",
        "amf.similarity_queue.data",
    ):
        assert key in resumed["module"].state_dict()
    opt_full = full["trainer"].optimizers[0].state_dict()
    opt_resumed = resumed["trainer"].optimizers[0].state_dict()
    assert opt_full["param_groups"][0]["lr"] == pytest.approx(opt_resumed["param_groups"][0]["lr"])


@pytest.mark.slow
def test_ddp_kill_9_then_resume_continues_each_ranks_own_random_stream(make_cfg, tmp_path, data_dir):
    _, full = train(_with_streams(make_cfg(*COMMON, *DDP, "trainer.max_steps=24"), tmp_path / "streams"))
    streams = [json.loads((tmp_path / "streams" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(a != b for a, b in zip(*streams, strict=False)), "both ranks drew the same dropout masks"
    overrides = [*TINY, *COMMON, *DDP, "trainer.max_steps=24", f"paths.data_dir={data_dir}"]
    last = _kill_mid_run(overrides, tmp_path / "crashed", at_step=7, threads=_ddp_spawn_threads())
    step = read_checkpoint(last)["global_step"]
    assert step == 6 and len(read_checkpoint(last)["cots"]["rng"]) == 2, step  # one random state per rank
    _, resumed = train(make_cfg(*COMMON, *DDP, "trainer.max_steps=24", f"ckpt_path={last}"))
    worst, diff = _largest_difference(full["module"].state_dict(), resumed["module"].state_dict())
    print(
        f"2-process DDP, dropout and drop-path on: largest difference after kill -9 at step {step} and resume "
        f"{diff:.3g} ({worst})"
    )
    assert diff <= 1e-6, (worst, diff)


def test_a_resume_with_a_longer_run_trains_its_first_step_at_the_longer_schedules_rate(make_cfg, tmp_path):
    """Extending a finished run (max_steps 12 -> 20): the step after the resume is the 20-step cosine's, not the
    rate the 12-step run's last scheduler step left in the optimizer (its schedule's end)."""
    rates = {}
    for name, overrides in (
        ("short", ("trainer.max_steps=12",)),
        ("extended", ("trainer.max_steps=20", f"ckpt_path={tmp_path / 'short' / 'checkpoints' / 'last.ckpt'}")),
        ("straight", ("trainer.max_steps=20",)),
    ):
        cfg = make_cfg(*COMMON, *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
            cfg.callbacks.rates = {"_target_": f"{__name__}.LearningRates"}
        _, objects = train(cfg)
        (callback,) = [c for c in objects["trainer"].callbacks if isinstance(c, LearningRates)]
        rates[name] = {**callback.by_step, "left": objects["trainer"].optimizers[0].param_groups[0]["lr"]}
    assert min(k for k in rates["extended"] if k != "left") == 12
    assert rates["short"]["left"] < 0.5 * rates["straight"][12]  # what the optimizer held when it was saved
    for step in (12, 13, 19):
        assert rates["extended"][step] == pytest.approx(rates["straight"][step], rel=1e-12), step


def test_last_ckpt_every_n_steps_under_the_default_callbacks_before_any_validation(make_cfg, tmp_path):
    """The default model_checkpoint monitors val/rsum and can save nothing yet; last.ckpt must not wait for it."""
    seen: dict[int, int] = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            last = tmp_path / "run" / "checkpoints" / "last.ckpt"
            if trainer.global_step in (21, 41, 59):
                seen[trainer.global_step] = read_checkpoint(last)["global_step"] if last.exists() else None

    cfg = make_cfg(
        "callbacks.recovery_checkpoint.every_n_steps=20",
        "trainer.val_check_interval=1000",
        "trainer.check_val_every_n_epoch=null",
        "trainer.max_epochs=-1",
        "trainer.max_steps=60",
    )
    assert cfg.callbacks.model_checkpoint.monitor == "val/rsum"
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": f"{__name__}.Probe"}
    globals()["Probe"] = Probe
    _, objects = train(cfg)
    assert seen == {21: 20, 41: 40, 59: 40}
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 60  # and at the end


def _fake_trainer(step: int = 0) -> SimpleNamespace:
    saved = []
    trainer = SimpleNamespace(
        global_step=step,
        sanity_checking=False,
        fast_dev_run=False,
        saved=saved,
        strategy=SimpleNamespace(broadcast=lambda value: value),
    )
    trainer.save_checkpoint = lambda path, weights_only=False: saved.append((trainer.global_step, str(path)))
    return trainer


def _run_batches(callback: RecoveryCheckpoint, trainer, steps: list[int]) -> list[int]:
    callback.on_train_start(trainer, None)
    for step in steps:
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_train_end(trainer, None)
    return [step for step, _ in trainer.saved]


def test_recovery_checkpoint_by_steps_by_minutes_and_at_optimizer_step_boundaries(tmp_path, monkeypatch):
    trainer = _fake_trainer()
    # accumulation: global_step stays at 3 for two batches; only the first batch of a new step may save
    assert _run_batches(RecoveryCheckpoint(str(tmp_path), every_n_steps=3), trainer, [1, 2, 3, 3, 4, 5, 6, 7]) == [
        3,
        6,
        7,
    ]
    clock = {"now": 0.0}
    monkeypatch.setattr("cots.callbacks.time.monotonic", lambda: clock["now"])
    callback = RecoveryCheckpoint(str(tmp_path), every_minutes=1.0)
    trainer = _fake_trainer()
    callback.on_train_start(trainer, None)
    for step in range(1, 9):
        clock["now"] += 25.0  # 25 s per step: a save every third step (75 s >= 60 s)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert [s for s, _ in trainer.saved] == [3, 6]
    assert trainer.saved[0][1] == str(tmp_path / "last.ckpt")
    resumed = _fake_trainer(step=6)  # a resumed run does not rewrite the step it resumed from
    assert _run_batches(RecoveryCheckpoint(str(tmp_path), every_n_steps=3), resumed, []) == []
    with pytest.raises(ValueError, match="every_n_steps"):
        RecoveryCheckpoint(str(tmp_path), every_n_steps=0)


def test_truncated_checkpoint_is_named_in_the_error(tmp_path, make_cfg):
    _, objects = train(make_cfg("trainer.max_steps=1"))
    good = tmp_path / "good.ckpt"
    objects["trainer"].save_checkpoint(good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        read_checkpoint(cut)
