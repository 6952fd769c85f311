"""kill -9 in the middle of an epoch, resume from last.ckpt: the same result as a run never interrupted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY
from cots.checkpoints import CheckpointError, read_checkpoint
from cots.train import train

COMMON = ("trainer.deterministic=true", "trainer.limit_val_batches=0", "trainer.check_val_every_n_epoch=null",
          "trainer.max_epochs=-1", "data.synthetic.num_train=64", "callbacks.model_checkpoint.every_n_train_steps=3",
          "callbacks.model_checkpoint.monitor=null")


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_the_uninterrupted_run(make_cfg, tmp_path, data_dir):
    _, full = train(make_cfg(*COMMON, "trainer.max_steps=60"))
    run_dir = tmp_path / "crashed"
    overrides = [*TINY, *COMMON, "trainer.max_steps=1000", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float summation order
    proc = subprocess.Popen([sys.executable, "-m", "cots.train", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for a checkpoint inside the first epoch (12 steps), then kill
        if last.is_file() and read_checkpoint(last)["global_step"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = read_checkpoint(last)  # never truncated: saves are written to a temporary file and renamed
    assert 6 <= checkpoint["global_step"] < 60, checkpoint["global_step"]
    _, resumed = train(make_cfg(*COMMON, "trainer.max_steps=60", f"ckpt_path={last}"))
    assert resumed["trainer"].global_step == 60
    expected, got = full["module"].state_dict(), resumed["module"].state_dict()
    diffs = {k: (expected[k].float() - got[k].float()).abs().max().item() for k in expected}
    worst = max(diffs, key=diffs.get)
    print(f"largest absolute difference after kill -9 and resume: {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
    for key in ("model.momentum_encoder.image_proj.weight", "model.feature_queue.text.data",
                "objective.amf.similarity_queue.data"):
        assert key in got
    opt_full = full["trainer"].optimizers[0].state_dict()
    opt_resumed = resumed["trainer"].optimizers[0].state_dict()
    assert opt_full["param_groups"][0]["lr"] == pytest.approx(opt_resumed["param_groups"][0]["lr"])


def test_truncated_checkpoint_is_named_in_the_error(tmp_path, make_cfg):
    _, objects = train(make_cfg("trainer.max_steps=1"))
    good = tmp_path / "good.ckpt"
    objects["trainer"].save_checkpoint(good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        read_checkpoint(cut)
