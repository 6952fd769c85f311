"""Two CPU processes (ddp_spawn, gloo) against one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cots.train import train


class RecordRun(L.Callback):
    """Writes each rank's per-step losses, final queues and parameters to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module) -> None:
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
        torch.save({"losses": self.losses, "state": state}, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _run(make_cfg, out_dir: Path, *overrides: str) -> None:
    cfg = make_cfg(
        "trainer.max_steps=10",
        "trainer.deterministic=true",
        "trainer.limit_val_batches=0",
        "trainer.check_val_every_n_epoch=null",
        "~callbacks.model_checkpoint",
        *overrides,
    )
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordRun", "out_dir": str(out_dir)}
    train(cfg)


@pytest.mark.slow
def test_ddp_spawn_matches_one_process_and_ranks_hold_identical_queues(make_cfg, tmp_path):
    _run(make_cfg, tmp_path / "single", "data.batch_size=16")
    _run(make_cfg, tmp_path / "ddp", "trainer=ddp_spawn_cpu", "data.batch_size=8")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))

    for key in ("feature_queue.image.data", "feature_queue.text.data", "feature_queue.image.ptr"):
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key  # identical on both ranks
        torch.testing.assert_close(rank0["state"][key], single["state"][key], atol=1e-5, rtol=0)
    assert int(rank0["state"]["feature_queue.image.filled"]) == 64  # queue_size 64 < 10 steps x 16
    # the mean of the two ranks' local losses is the single-process loss of the same global batch
    ddp_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"], strict=False)]
    assert len(ddp_losses) == len(single["losses"]) == 10
    loss_gap = max(abs(a - b) for a, b in zip(ddp_losses, single["losses"], strict=False))
    worst = max((rank0["state"][k].float() - single["state"][k].float()).abs().max().item() for k in single["state"])
    print(
        f"DDP 2x8 vs 1x16 over 10 steps: largest loss difference {loss_gap:.3g}, largest state difference {worst:.3g}"
    )
    assert loss_gap < 1e-5
    assert worst < 1e-4, worst
