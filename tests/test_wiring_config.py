"""Configured values, from the real Hydra config to what they change: temperatures, direction, weights, queue sizes,
AMF k, momentum and its schedule, ViLEM's edit ratio, and the data's text-mask probabilities and block-mask ratio."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from test_wiring_common import (
    MASK,
    SPECIAL_IDS,
    TEXT_VOCAB,
    assert_terms,
    encode,
    fill_queue,
    make_batch,
    reference_inst,
    reference_task,
    run_step,
    set_similarity_queue,
    spread_text_features,
)

from cots.masking import IGNORE_INDEX
from cots.train import build_module

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers: threads only add overhead


def test_model_objective_and_module_values_reach_what_they_set(make_cfg):
    """model.temperature, model.queue_size, objective.{inst,task}.weight, task.direction / temperature, amf.k /
    queue_size, module.momentum / momentum_schedule: each changes its term, its state or the EMA."""
    cfg = make_cfg(
        "model.temperature=0.2",
        "model.queue_size=24",
        "objective.inst.weight=2.0",
        "objective.task.weight=0.5",
        "objective.task.direction=symmetric",
        "objective.task.temperature=0.3",
        "objective.amf.k=2.5",
        "objective.amf.queue_size=10",
        "module.momentum=0.8",
        "module.momentum_schedule=cosine",
    )
    torch.manual_seed(0)
    module = build_module(cfg, TEXT_VOCAB, None)
    model, training_step = module.model, module.step
    spread_text_features(model.encoder.text_tower)  # captions' features that differ (see the helper)
    model.momentum_encoder.load_state_dict(model.encoder.state_dict())
    assert model.feature_queue.size == 24 and training_step.amf.similarity_queue.size == 10
    queue_v, queue_t = fill_queue(model, 9)
    set_similarity_queue(training_step, mean=0.3, std=0.2)  # full: the filter is active
    batch = make_batch()
    step = run_step(model, training_step, batch)
    assert float(step.decision.threshold) == pytest.approx(0.3 - 2.5 * 0.2, abs=1e-6)
    enc = encode(model, batch)
    keep = enc.positive_similarity >= 0.3 - 2.5 * 0.2
    expected = {
        **reference_inst(enc, queue_v, queue_t, 0.2, weights=keep),
        "task": reference_task(enc, queue_v, queue_t, 0.3, "symmetric", weights=keep),
    }
    expected["loss"] = 2.0 * expected["inst"] + 0.5 * expected["task"]
    assert_terms(step.terms, expected)

    # the cosine schedule from 0.8: m = 1 - 0.2 (cos(pi step / total) + 1) / 2 = 0.9 half way
    module._trainer = SimpleNamespace(global_step=5, estimated_stepping_batches=10)
    with torch.no_grad():
        for param in model.momentum_encoder.parameters():
            param.add_(0.1)
    before = {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}
    module.optimizer_step(0, 0, torch.optim.SGD(model.encoder.parameters(), lr=0.0), lambda: None)
    online = dict(model.encoder.named_parameters())
    m = 1 - 0.2 * (math.cos(math.pi * 0.5) + 1) / 2
    for name, param in model.momentum_encoder.named_parameters():
        torch.testing.assert_close(
            param.detach(), m * before[name] + (1 - m) * online[name].detach(), rtol=0, atol=1e-6, msg=name
        )


def test_vilem_ratio_from_the_config_sets_the_edits_per_caption(make_cfg):
    """objective.vilem.ratio=0.5: a caption of n words gets floor(n/2) or ceil(n/2) edits (at least one)."""
    cfg = make_cfg(
        "objective=vilem",
        "objective.vilem.ratio=0.5",
        "objective.vilem.layers=1",
        "objective.amf.enabled=false",
        "objective.task.enabled=false",
    )
    with open_dict(cfg):
        cfg.data.text_mask = {"mask_prob": 0.15, "replace_prob": 0.8, "random_prob": 0.1}
    module = build_module(cfg, TEXT_VOCAB, None, MASK, SPECIAL_IDS)
    batch = make_batch(batch=8)
    edited, _ = run_step(module.model, module.step, batch).errors
    words = (batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], torch.tensor(SPECIAL_IDS))).sum(1)
    edits = edited.replaced.sum(1)
    assert ((edits >= torch.floor(words / 2).clamp(min=1)) & (edits <= torch.ceil(words / 2).clamp(min=1))).all()


def _training_batch(make_cfg, text_mask: dict, mask_ratio: float) -> tuple[dict, list[int], int]:
    """One training batch of the synthetic set with data.text_mask and a block mask of ``mask_ratio`` (4 x 4 grid)."""
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.data.image_tokens = {
            "source": "online",
            "dvae_input_size": 32,
            "vocab_size": 64,
            "weights": None,
            "random_dvae": {"n_hid": 8, "n_blk_per_group": 1, "seed": 0},
            "block_mask": {"mask_ratio": mask_ratio, "min_num_patches": 1},
        }
        cfg.data.text_mask = text_mask
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    tokenizer = datamodule.text_tokenizer
    return next(iter(datamodule.train_dataloader())), list(tokenizer.special_ids), tokenizer.mask_id


@pytest.mark.parametrize(
    "mask_prob,replace_prob,random_prob,mask_ratio",
    [
        (1.0, 1.0, 0.0, 0.25),  # every word -> [MASK]
        (0.5, 0.0, 1.0, 0.5),  # half the words -> a random word
        (0.5, 0.0, 0.0, 0.25),  # half the words predicted, all kept
    ],
)
def test_data_text_mask_and_block_mask_reach_the_training_batches(
    make_cfg, mask_prob, replace_prob, random_prob, mask_ratio
):
    """data.text_mask.{mask,replace,random}_prob and data.image_tokens.block_mask.mask_ratio: the batch's
    mlm_input_ids / mlm_labels and patch_mask follow them exactly."""
    text_mask = {"mask_prob": mask_prob, "replace_prob": replace_prob, "random_prob": random_prob}
    batch, special, mask_id = _training_batch(make_cfg, text_mask, mask_ratio)
    ids, labels, masked = batch["input_ids"], batch["mlm_labels"], batch["mlm_input_ids"]
    words = batch["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(special))  # B x L
    chosen = labels != IGNORE_INDEX
    n = words.sum(1)
    assert not (chosen & ~words).any() and torch.equal(labels[chosen], ids[chosen])
    counts = chosen.sum(1)
    assert ((counts >= torch.floor(mask_prob * n).clamp(min=1)) & (counts <= torch.ceil(mask_prob * n))).all()
    if replace_prob == 1.0:
        assert (masked[chosen] == mask_id).all()
    elif random_prob == 1.0:
        replaced = masked[chosen]
        assert not torch.isin(replaced, torch.tensor(special)).any()
        assert (replaced != ids[chosen]).float().mean() > 0.9  # a random word is rarely the original
    else:
        assert torch.equal(masked, ids)
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert batch["patch_mask"].shape == (16, 16)
    assert batch["patch_mask"].sum(1).tolist() == [round(mask_ratio * 16)] * 16
