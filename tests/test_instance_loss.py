"""L_inst against the formula of METHOD §3, computed in float64 with plain loops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cots.losses.instance import instance_contrastive_loss


def reference_inst(zv, zt, kv, kt, pos, tau, w, valid):
    """- sum_i w_i log softmax_j(z_i . k_j / tau)[pos_i] / sum_i w_i over valid keys, both directions."""

    def direction(q, keys):
        total = 0.0
        for i in range(q.shape[0]):
            logits = [float(q[i] @ keys[j]) / tau for j in range(keys.shape[0]) if valid[j]]
            cols = [j for j in range(keys.shape[0]) if valid[j]]
            lse = math.log(sum(math.exp(x) for x in logits))
            total += float(w[i]) * -(logits[cols.index(int(pos[i]))] - lse)
        return total / float(w.sum())

    return (direction(zv, kt) + direction(zt, kv)) / 2


def test_matches_float64_reference_with_weights_and_empty_slots():
    g = torch.Generator().manual_seed(0)
    b, n, d = 6, 20, 8
    zv, zt = (F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    kv, kt = (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    pos = torch.tensor([3, 0, 5, 1, 2, 4])
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    valid = torch.ones(n, dtype=torch.bool)
    valid[14:] = False  # empty queue slots are not candidates
    tau = 0.07
    out = instance_contrastive_loss(zv, zt, kv, kt, pos, torch.tensor(tau), weights=weights, key_mask=valid)
    expected = reference_inst(zv, zt, kv, kt, pos, tau, weights, valid)
    assert math.isclose(float(out["loss"]), expected, rel_tol=1e-5)


def test_weights_select_pairs_and_global_weight_sum_rescales():
    g = torch.Generator().manual_seed(1)
    zv, zt = (F.normalize(torch.randn(4, 8, generator=g), dim=1) for _ in range(2))
    kv, kt = (F.normalize(torch.randn(10, 8, generator=g), dim=1) for _ in range(2))
    pos, tau = torch.arange(4), torch.tensor(0.1)
    full = instance_contrastive_loss(zv, zt, kv, kt, pos, tau)
    ones = instance_contrastive_loss(zv, zt, kv, kt, pos, tau, weights=torch.ones(4))
    torch.testing.assert_close(full["loss"], ones["loss"])
    only_first = instance_contrastive_loss(zv[:1], zt[:1], kv, kt, pos[:1], tau)
    masked = instance_contrastive_loss(zv, zt, kv, kt, pos, tau, weights=torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(masked["loss"], only_first["loss"])
    halved = instance_contrastive_loss(zv, zt, kv, kt, pos, tau, weights=torch.ones(4), weight_sum=torch.tensor(8.0))
    torch.testing.assert_close(halved["loss"], full["loss"] / 2)


def test_gradients_reach_online_parameters_only(make_cfg):
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = make_cfg()
    with open_dict(cfg):
        cfg.model.encoder.text_tower.vocab_size = 50
    model = instantiate(cfg.model)
    objective = instantiate(cfg.objective)
    images = torch.randn(4, 3, 32, 32)
    ids = torch.randint(5, 50, (4, 7))
    features = model(images, ids, torch.ones_like(ids))
    model.enqueue(features)  # a non-empty queue takes part in the loss
    features = model(images, ids, torch.ones_like(ids))
    objective(features)["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.log_temperature.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.parameters())
    assert not model.feature_queue.image.data.requires_grad
