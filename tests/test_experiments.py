"""Every shipped experiment composes, resolves, and builds its optimizer (no model, no data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cots.train import CONF_DIR

EXPERIMENTS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_resolves_and_builds_its_optimizer(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # what a CLI run sets before the config is read
    try:
        body = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])  # Hydra's node needs a launch
        OmegaConf.to_container(body, resolve=True)  # a broken interpolation raises here
    finally:
        HydraConfig.instance().cfg = None  # no Hydra run left behind for the other tests
    assert cfg.task_name == name
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = instantiate(cfg.optim.optimizer)(params)  # an unknown AdamW option raises here
    assert optimizer.defaults["lr"] == cfg.optim.optimizer.lr
    compile_options = cfg.module.get("compile")
    assert compile_options is None or isinstance(OmegaConf.to_container(compile_options), dict)


def test_paper_scale_experiment_runs_compiled_towers_and_fused_adamw():
    """What bench/results/step_paper_* measured as the fast configuration (1.3x the eager step)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=cots_vitb384"])
    assert cfg.module.compile is not None
    assert instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(3))]).defaults["fused"] is True
