"""L_task against the formula of METHOD §5 (float64 loops), its zero, its directions and its gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cots.losses.task import TASK_DIRECTIONS, task_kl_loss


def reference_task(zv, zt, mv, mt, qv, qt, tau, valid, direction, w):
    """sum_i w_i KL(p_i || q_i) / sum_i w_i with p, q softmaxes over [own key ; valid queue rows]."""

    def dist(q, own, queue):
        logits = [float(q @ own) / tau] + [float(q @ queue[j]) / tau for j in range(queue.shape[0]) if valid[j]]
        top = max(logits)
        z = sum(math.exp(x - top) for x in logits)
        return [math.exp(x - top) / z for x in logits]

    def kl(p, q):
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=False) if a > 0)

    total = 0.0
    for i in range(zv.shape[0]):
        p_i2t, p_t2i = dist(zv[i], mt[i], qt), dist(zt[i], mv[i], qv)
        value = {
            "i2t||t2i": kl(p_i2t, p_t2i),
            "t2i||i2t": kl(p_t2i, p_i2t),
            "symmetric": (kl(p_i2t, p_t2i) + kl(p_t2i, p_i2t)) / 2,
        }[direction]
        total += float(w[i]) * value
    return total / float(w.sum())


def _unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("direction", TASK_DIRECTIONS)
def test_matches_float64_reference_with_weights_and_empty_slots(direction):
    g = torch.Generator().manual_seed(0)
    b, k, d, tau = 5, 12, 8, 0.1
    zv, zt, mv, mt = (_unit(b, d, generator=g) for _ in range(4))
    qv, qt = _unit(k, d, generator=g), _unit(k, d, generator=g)
    valid = torch.ones(k, dtype=torch.bool)
    valid[9:] = False  # slots never written: not candidates
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    out = task_kl_loss(zv, zt, mv, mt, qv, qt, torch.tensor(tau), valid, direction, weights=w)
    expected = reference_task(zv, zt, mv, mt, qv, qt, tau, valid, direction, w)
    assert expected > 0
    assert math.isclose(float(out["loss"]), expected, rel_tol=1e-4), (float(out["loss"]), expected)
    assert torch.isfinite(out["kl"]).all()


def test_directions_differ_and_symmetric_is_their_mean():
    g = torch.Generator().manual_seed(1)
    args = [_unit(4, 8, generator=g) for _ in range(4)] + [_unit(10, 8, generator=g) for _ in range(2)]
    losses = {d: float(task_kl_loss(*args, torch.tensor(0.05), direction=d)["loss"]) for d in TASK_DIRECTIONS}
    assert losses["i2t||t2i"] != pytest.approx(losses["t2i||i2t"])
    assert losses["symmetric"] == pytest.approx((losses["i2t||t2i"] + losses["t2i||i2t"]) / 2)
    with pytest.raises(ValueError, match="direction"):
        task_kl_loss(*args, torch.tensor(0.05), direction="both")


@pytest.mark.parametrize("direction", TASK_DIRECTIONS)
def test_zero_for_identical_distributions_positive_otherwise(direction):
    g = torch.Generator().manual_seed(2)
    z, m, q = _unit(6, 8, generator=g), _unit(6, 8, generator=g), _unit(16, 8, generator=g)
    valid = torch.arange(16) < 11
    same = task_kl_loss(z, z, m, m, q, q, torch.tensor(0.07), valid, direction)
    assert abs(float(same["loss"])) < 1e-6
    other = task_kl_loss(z, _unit(6, 8, generator=g), m, m, q, q, torch.tensor(0.07), valid, direction)
    assert float(other["loss"]) > 1e-3
    # an empty queue leaves one candidate: both distributions are one-hot
    empty = task_kl_loss(
        z, _unit(6, 8, generator=g), m, m, q, q, torch.tensor(0.07), torch.zeros(16, dtype=torch.bool), direction
    )
    assert float(empty["loss"]) == 0.0


def _tiny_model(make_cfg, *overrides):
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = make_cfg(*overrides)
    with open_dict(cfg):
        cfg.model.encoder.text_tower.vocab_size = 50
    torch.manual_seed(0)
    return instantiate(cfg.model), instantiate(cfg.objective)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 50, (4, 7), generator=g)
    return torch.randn(4, 3, 32, 32, generator=g), ids, torch.ones_like(ids)


def test_gradients_reach_both_towers_and_the_temperature(make_cfg):
    model, _ = _tiny_model(make_cfg)
    images, ids, mask = _batch()
    model.enqueue(model(images, ids, mask))  # a non-empty queue: otherwise the KL is 0 identically
    features = model(images, ids, mask)
    image_queue, text_queue, valid = features.keys.queue()
    loss = task_kl_loss(
        features.image.embedding,
        features.text.embedding,
        features.image_momentum,
        features.text_momentum,
        image_queue,
        text_queue,
        features.temperature,
        valid,
    )["loss"]
    assert float(loss) > 0
    loss.backward()
    for tower in (
        model.encoder.image_tower,
        model.encoder.image_proj,
        model.encoder.text_tower,
        model.encoder.text_proj,
    ):
        assert sum(float(p.grad.abs().sum()) for p in tower.parameters() if p.grad is not None) > 0, tower
    assert model.log_temperature.grad is not None and float(model.log_temperature.grad) != 0
    assert all(p.grad is None for p in model.momentum_encoder.parameters())


def test_objective_switches_weight_and_fixed_temperature(make_cfg, monkeypatch):
    model, objective = _tiny_model(make_cfg, "objective.task.weight=0.5", "objective.task.temperature=0.2")
    images, ids, mask = _batch()
    model.enqueue(model(images, ids, mask))
    features = model(images, ids, mask)
    terms = objective(features)
    assert terms["loss"].item() == pytest.approx(terms["inst"].item() + 0.5 * terms["task"].item(), rel=1e-6)
    image_queue, text_queue, valid = features.keys.queue()

    def task_at(tau: float) -> float:
        return task_kl_loss(
            features.image.embedding,
            features.text.embedding,
            features.image_momentum,
            features.text_momentum,
            image_queue,
            text_queue,
            torch.tensor(tau),
            valid,
        )["loss"].item()

    assert terms["task"].item() == pytest.approx(task_at(0.2), rel=1e-6)  # tau_task = 0.2, not the model's tau
    assert task_at(0.2) != pytest.approx(task_at(float(model.temperature())), rel=1e-3)

    import cots.objective

    monkeypatch.setattr(cots.objective, "task_kl_loss", lambda *a, **k: pytest.fail("computed while switched off"))
    model, objective = _tiny_model(make_cfg, "objective=contrastive_only")
    terms = objective(model(images, ids, mask))
    assert "task" not in terms and not objective.amf.enabled


def test_the_objectives_task_term_leaves_the_learned_temperature_to_l_inst(make_cfg):
    """Both distributions flatten as tau grows, so a KL with gradient into tau would push it to its bound."""
    from cots.training_step import TrainingStep

    model, objective = _tiny_model(make_cfg)  # temperature: null = the model's tau
    images, ids, mask = _batch()
    batch = {"images": images, "input_ids": ids, "attention_mask": mask}
    model.enqueue(model(images, ids, mask))
    terms = TrainingStep.from_config(objective)(model, batch).terms
    assert float(terms["task"]) > 0
    terms["task"].backward(retain_graph=True)
    assert model.log_temperature.grad is None or float(model.log_temperature.grad) == 0
    assert sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None) > 0
    terms["inst"].backward()
    assert float(model.log_temperature.grad) != 0  # L_inst still learns it


def test_temperature_is_put_back_in_range_after_each_optimizer_step(make_cfg):
    """A tau initialised (or pushed) past 0.5 has zero gradient under the value clamp; the parameter clamp frees it."""
    from cots.train import train

    _, objects = train(make_cfg("model.temperature=0.9", "trainer.max_steps=2", "trainer.limit_val_batches=0"))
    tau = objects["module"].model.log_temperature.exp().item()
    assert tau <= 0.5 + 1e-6, tau
