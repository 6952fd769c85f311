"""Parameter groups: weight decay by parameter kind, learning-rate multipliers by name prefix."""

from __future__ import annotations

import functools

import pytest
import torch

from cots.optim import build_optimizer, param_groups
from cots.train import build_module


def _names(module, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in module.named_parameters() if id(p) in ids}


def test_without_scales_two_groups_decay_and_no_decay(make_cfg):
    model = build_module(make_cfg(), 200, None).model
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "lr" not in decay and "lr" not in no_decay
    assert "log_temperature" in _names(model, no_decay)
    assert all(not n.endswith(".bias") for n in _names(model, decay))


def test_lr_scale_sets_the_rate_of_the_longest_matching_prefix(make_cfg):
    model = build_module(make_cfg("model.encoder.text_tower.num_layers=2"), 200, None).model
    scales = {"encoder": {"text_tower": 0.2}, "encoder.text_tower.bert.encoder.layer.1": 0.5}
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), model, scales)
    rate = {}
    for group in optimizer.param_groups:
        for name in _names(model, group):
            rate[name] = group["lr"]
            assert group["weight_decay"] == (0.0 if name.endswith(".bias") else group["weight_decay"])
    assert rate["encoder.text_tower.bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(2e-4)
    assert rate["encoder.text_tower.bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(5e-4)
    assert rate["encoder.image_tower.vit.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3)
    assert rate["encoder.text_proj.weight"] == pytest.approx(1e-3)  # not under the prefix
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(rate) == trainable  # every trained parameter in exactly one group
    # The warm-up/cosine schedule keeps the ratio: it multiplies each group's own initial rate.
    with pytest.raises(ValueError, match="no parameter is named 'encoder.txt_tower'"):
        param_groups(model, 0.1, 1e-3, {"encoder.txt_tower": 0.2})


def test_lr_scale_reaches_the_trainer_from_the_config(make_cfg):
    module = build_module(make_cfg("+optim.lr_scale.encoder.text_tower=0.25", "optim.optimizer.lr=4e-4"), 200, None)
    optimizer = build_optimizer(module.optimizer_factory, module.model, module.lr_scale)
    rates = sorted({group["lr"] for group in optimizer.param_groups})
    assert rates == pytest.approx([1e-4, 4e-4])


def test_fused_adamw_trains_under_bf16_autocast_with_gradient_clipping(make_cfg):
    """Lightning refuses to clip for a fused optimizer under bf16-mixed; the module clips itself (exact: no scaler)."""
    from cots.train import train

    metrics, objects = train(
        make_cfg(
            "optim.optimizer.fused=true",
            "trainer.precision=bf16-mixed",
            "cpu_bf16_fallback=false",  # bf16 even where this CPU emulates it: the case under test
            "trainer.gradient_clip_val=1e-3",
            "trainer.max_steps=2",
        )
    )
    optimizer = objects["trainer"].optimizers[0]
    assert objects["trainer"].precision == "bf16-mixed"
    assert optimizer.defaults["fused"] is True and objects["trainer"].global_step == 2
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    assert grads and torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * 1.01  # clipped
