"""Training on img2dataset shards in place: the same weights as the manifest path fed the same batches, in one
and two processes; exact resume after kill -9 of a 2-process run; streaming from a local HTTP server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import TINY
from omegaconf import open_dict
from test_crash_resume import _ddp_spawn_threads, _kill_mid_run, _largest_difference
from webdata_helpers import http_server, img2dataset_folder, shard_pairs_to_manifest

from cots.checkpoints import read_checkpoint
from cots.prepare.cli import main as cots_data
from cots.train import train

# 66 samples in the shards (13 of them bad): 4 steps of 16 per epoch, on 1 or 2 processes.
STEPS_PER_EPOCH = 4
COMMON = (
    "trainer.deterministic=true",
    "trainer.limit_val_batches=0",
    "trainer.check_val_every_n_epoch=null",
    "trainer.max_epochs=-1",
    "module.max_skip_fraction=0.5",  # a fifth of these shards is bad on purpose
    "data.num_workers=2",
    "data.shuffle_buffer=8",
    "model.encoder.text_tower.dropout=0.1",
    "model.encoder.image_tower.drop_path_rate=0.1",
)
DDP = ("trainer=ddp_spawn_cpu", "data.batch_size=8")  # 2 processes x 8 = the global batch of 16


@pytest.fixture(scope="session")
def i2d(tmp_path_factory) -> Path:
    return img2dataset_folder(tmp_path_factory)


STEPS = 12  # three epochs: two epoch boundaries
_SHARD_RUNS: dict[int, tuple[dict, Path]] = {}  # world size -> (state dict, folder of recorded batches)


def _shard_run(make_cfg, tmp_path: Path, i2d: Path, world: int) -> tuple[dict, Path]:
    """STEPS steps on the img2dataset shards on ``world`` processes, recording every rank's batches and writing
    last.ckpt every 3 steps (which changes nothing); run once per world size for the tests of this module."""
    if world not in _SHARD_RUNS:
        record = tmp_path / f"batches-{world}"
        cfg = make_cfg(
            *COMMON,
            *(DDP if world == 2 else ()),
            f"data.train_shards={i2d}",
            f"trainer.max_steps={STEPS}",
            "callbacks.recovery_checkpoint.every_n_steps=3",
        )
        with open_dict(cfg):
            cfg.callbacks.record = {"_target_": "webdata_helpers.RecordBatches", "out_dir": str(record)}
        _, objects = train(cfg)
        if world == 1:  # (a ddp_spawn parent runs no loop of its own)
            assert objects["trainer"].num_training_batches == STEPS_PER_EPOCH
        _SHARD_RUNS[world] = ({k: v.clone() for k, v in objects["module"].state_dict().items()}, record)
    return _SHARD_RUNS[world]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_trains_to_the_weights_of_the_manifest_path_fed_the_same_batches(make_cfg, tmp_path, i2d, world):
    """The comparison, defined: the shard run's batches (per rank, the sample ids of every step, bad samples
    already replaced by the stream) are recorded; the manifest path then trains on a manifest of the same pairs
    (``shard_pairs_to_manifest``: every sample of the shards as a file, in sample-id order) with a sampler
    that replays that order, each crop seeded by the same (seed, epoch, sample). Same batches, same crops, same
    tokenizer (trained on the same captions in the same order): the weights after 12 steps (two epoch
    boundaries) must agree to 1e-6, on one process and on two."""
    expected, record = _shard_run(make_cfg, tmp_path, i2d, world)
    batches = [json.loads((record / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(len(b) == STEPS for b in batches)
    manifest = shard_pairs_to_manifest(i2d, tmp_path / "manifest")
    _, replayed = train(
        make_cfg(
            *COMMON,
            *(DDP if world == 2 else ()),
            f"data.train_manifest={manifest}",
            "data._target_=webdata_helpers.ReplayDataModule",
            f"+data.replay={record}",
            f"+data.steps_per_epoch={STEPS_PER_EPOCH}",
            f"trainer.max_steps={STEPS}",
        )
    )
    worst, diff = _largest_difference(expected, replayed["module"].state_dict())
    print(f"{world} process(es): img2dataset shards vs the manifest of the same pairs: largest difference {diff:.3g}")
    assert diff <= 1e-6, (worst, diff)


@pytest.mark.slow
def test_ddp_kill_9_mid_epoch_on_img2dataset_shards_then_resume_exactly(make_cfg, tmp_path, data_dir, i2d):
    """The node-failure drill on the 2-process loopback run: kill -9 the whole process group after a mid-epoch
    last.ckpt, resume with ckpt_path=, and end on the uninterrupted run's weights."""
    expected, _ = _shard_run(make_cfg, tmp_path, i2d, 2)
    common = (*COMMON, *DDP, f"data.train_shards={i2d}", "callbacks.recovery_checkpoint.every_n_steps=3")
    overrides = [*TINY, *common, f"trainer.max_steps={STEPS}", f"paths.data_dir={data_dir}"]
    last = _kill_mid_run(overrides, tmp_path / "crashed", at_step=7, threads=_ddp_spawn_threads())
    step = read_checkpoint(last)["global_step"]
    assert step == 6 and step % STEPS_PER_EPOCH, step  # inside an epoch
    _, resumed = train(make_cfg(*common, f"trainer.max_steps={STEPS}", f"ckpt_path={last}"))
    worst, diff = _largest_difference(expected, resumed["module"].state_dict())
    print(f"2-process DDP on img2dataset shards: kill -9 at step {step}, resumed: largest difference {diff:.3g}")
    assert diff <= 1e-6, (worst, diff)


@pytest.mark.slow
def test_trains_from_a_local_http_server_as_from_the_folder(make_cfg, tmp_path, i2d):
    """The same shards over http://127.0.0.1 (range reads, index written elsewhere with --out) train to the
    same weights as from the folder: same counts, same sample ids, same crops."""
    expected, _ = _shard_run(make_cfg, tmp_path, i2d, 1)
    with http_server(i2d) as server:
        url = f"{server.url}/{{00000..00004}}.tar"
        index = tmp_path / "http-index.json"
        assert cots_data(["index-shards", url, "--out", str(index), "--workers", "1"]) == 0
        server.requests.clear()
        _, remote = train(
            make_cfg(
                *COMMON,
                f"trainer.max_steps={STEPS}",
                f"data.train_shards='{url}'",
                f"data.train_shards_index={index}",
            )
        )
        tar_gets = [r for r in server.requests if r[0] == "GET" and r[1].endswith(".tar")]
    assert tar_gets and all(r[2] for r in tar_gets), tar_gets  # every read of a shard was a range request
    worst, diff = _largest_difference(expected, remote["module"].state_dict())
    assert diff <= 1e-6, (worst, diff)


def test_the_full_objective_trains_on_img2dataset_shards(make_cfg, i2d):
    """CMVM reads the dVAE's tokens of each shard crop (online: the step tokenizes the crop's dVAE view) and CMLM
    the masked captions: every term of the full objective is computed and finite on shards as they are."""
    from test_mvlm_training import ONLINE_TOKENS, with_tokens

    cfg = with_tokens(
        make_cfg(*COMMON, "objective=mvlm", f"data.train_shards={i2d}", "trainer.max_steps=2"), ONLINE_TOKENS
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    for name in ("cmvm", "cmvm_acc", "cmlm", "cmlm_acc", "inst", "loss"):
        assert math.isfinite(metrics[f"train/{name}"]), name
    assert abs(metrics["train/cmvm"] - math.log(ONLINE_TOKENS["vocab_size"])) < 1.0  # a fresh head over the codes
