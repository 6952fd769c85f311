"""Shared fixtures: the real Hydra config, composed and shrunk for CPU tests; the tiny run's model; a folder of
images to index (``image_files.py``)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from image_files import make_folder
from omegaconf import DictConfig, open_dict

import cots
from cots.retriever import Retriever
from cots.train import CONF_DIR, train

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tiny towers and a small synthetic set: every test that trains starts from these.
TINY = [
    "experiment=smoke",
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=64",
    "data.synthetic.num_test=64",
    # one folder per size, so that tests asking for other sizes do not rebuild each other's data
    "data.synthetic.out_dir=${paths.data_dir}/synthetic-${data.synthetic.num_train}-${data.synthetic.num_val}",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "model.queue_size=64",
    "model.encoder.embed_dim=32",
    "model.encoder.image_tower.embed_dim=48",
    "model.encoder.image_tower.depth=1",
    "model.encoder.text_tower.hidden_size=48",
    "model.encoder.text_tower.num_layers=1",
    "data.text_tokenizer.vocab_size=200",
    "trainer.max_steps=4",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~logger.tensorboard",
    "test=false",
]


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One synthetic data folder for the whole session (built on first use)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path):
    """compose(overrides) -> the real train config on tiny settings, writing under tmp_path."""

    def _make(*overrides: str, config_name: str = "train") -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name=config_name, overrides=[*TINY, *overrides] if config_name == "train" else list(overrides)
            )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(data_dir)
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    return _make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """A run folder of the tiny towers trained for 2 steps, validated at step 2, then tested (as cots-train does):
    ``checkpoints/last.ckpt``, ``retrieval.json``. Shared by the tests of ``cots.load`` and ``cots-export``."""
    root = tmp_path_factory.mktemp("tiny_run")
    overrides = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", "test=true"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(root / "logs")
        cfg.use_the_model = {"images": cfg.data.test_manifest, "query": "a red circle"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(cfg)
    (root / "run" / "stdout.txt").write_text(printed.getvalue())  # what cots-train printed (tests of next_steps)
    return root / "run"


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Path:
    """The tiny run's ``last.ckpt``: the model the search and serve tests index with."""
    return tiny_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def model(checkpoint) -> Retriever:
    return cots.load(checkpoint)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Seven images in nested folders and the files an index skips (``image_files.make_folder``)."""
    return make_folder(tmp_path / "photos")
