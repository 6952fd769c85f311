"""Pair groups (``data.pair_groups``): pairs of one group are positives of each other in L_inst."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cots.data.datasets import Collate, ImageTextPairs, caption_group, pair_groups
from cots.data.manifest import ManifestEntry
from cots.losses.instance import instance_contrastive_loss, positive_targets
from cots.queues import NO_GROUP, PairedFeatureQueue
from cots.train import train


def reference_grouped(q, keys, own, query_groups, key_groups, tau, valid):
    """Mean over queries of the mean of -log softmax over each query's positives, float64 loops."""
    total = 0.0
    for i in range(q.shape[0]):
        cols = [j for j in range(keys.shape[0]) if valid[j]]
        logits = {j: float(q[i] @ keys[j]) / tau for j in cols}
        lse = math.log(sum(math.exp(x) for x in logits.values()))
        positives = [j for j in cols if j == own[i] or (query_groups[i] >= 0 and key_groups[j] == query_groups[i])]
        total += sum(-(logits[j] - lse) for j in positives) / len(positives)
    return total / q.shape[0]


def _features(seed: int, b: int = 5, n: int = 16, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    queries = [F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
    keys = [F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
    return (*queries, *keys)


def test_grouped_loss_matches_float64_reference():
    zv, zt, kv, kt = _features(0)
    own = torch.arange(5)
    query_groups = torch.tensor([7, 7, 3, NO_GROUP, 9])
    key_groups = torch.tensor([7, 7, 3, NO_GROUP, 9, 7, 3, NO_GROUP, 1, 7, 2, 3, 9, 9, 0, 0])
    valid = torch.ones(16, dtype=torch.bool)
    valid[13:] = False  # empty slots: never positives even where their group matches (slot 13 holds 9)
    tau = 0.1
    out = instance_contrastive_loss(
        zv, zt, kv, kt, own, torch.tensor(tau), key_mask=valid, query_groups=query_groups, key_groups=key_groups
    )
    expected = (
        reference_grouped(zv, kt, own, query_groups, key_groups, tau, valid)
        + reference_grouped(zt, kv, own, query_groups, key_groups, tau, valid)
    ) / 2
    assert math.isclose(float(out["loss"]), expected, rel_tol=1e-6)
    # positives: 7 -> {0,1,5,9}, 7 -> same, 3 -> {2,6,11}, NO_GROUP -> itself only, 9 -> {4,12}
    assert float(out["positives"]) == pytest.approx((4 + 4 + 3 + 1 + 2) / 5)


def test_unique_groups_give_the_single_positive_loss_exactly():
    zv, zt, kv, kt = _features(1)
    own = torch.tensor([2, 0, 4, 1, 3])
    plain = instance_contrastive_loss(zv, zt, kv, kt, own, torch.tensor(0.07))
    grouped = instance_contrastive_loss(
        zv, zt, kv, kt, own, torch.tensor(0.07), query_groups=torch.arange(5) + 100, key_groups=torch.arange(16) + 200
    )
    torch.testing.assert_close(grouped["loss"], plain["loss"])
    assert float(grouped["positives"]) == 1.0


def test_a_same_group_key_is_pulled_closer_instead_of_pushed_away():
    """The twin of a pair (same caption, another rendering) in the queue: with groups a gradient
    step on the query raises its similarity to the twin; without groups it lowers it."""
    _, _, kv, kt = _features(2, b=1)
    twin = 9
    kt[twin] = F.normalize(kt[twin] - (kt[twin] @ kt[0]) * kt[0], dim=0)  # orthogonal to the own key
    query = F.normalize(kt[0] + 0.8 * kt[twin], dim=0)[None]  # near both, nearer its own key
    for groups, sign in ((None, -1), (torch.tensor([5]), 1)):
        q = query.clone().requires_grad_(True)
        key_groups = None if groups is None else torch.tensor([5] + [0] * 8 + [5] + [0] * 6)
        out = instance_contrastive_loss(
            q, q, kv, kt, torch.tensor([0]), torch.tensor(0.1), query_groups=groups, key_groups=key_groups
        )
        (grad,) = torch.autograd.grad(out["i2t"], q)
        change = float(-grad[0] @ kt[twin])  # d(similarity to the twin) along the descent direction
        assert change * sign > 0, (groups, change)


def test_targets_rows_sum_to_one_and_keep_the_own_key():
    targets = positive_targets(torch.tensor([1, 0]), 4, torch.tensor([3, NO_GROUP]), torch.tensor([NO_GROUP, 8, 3, 3]))
    torch.testing.assert_close(targets.sum(1), torch.ones(2))
    assert targets[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert targets[1].tolist() == [1, 0, 0, 0]  # NO_GROUP matches nothing, not even another NO_GROUP


def test_caption_groups_are_stable_ids_of_the_text_and_image_groups_follow_the_image(tmp_path):
    assert caption_group("thumbs up") == caption_group("thumbs up") >= 0
    assert caption_group("thumbs up") != caption_group("thumbs down")
    items = [
        {"caption": "thumbs up", "image_id": 0},
        {"caption": "thumbs down", "image_id": 1},
        {"caption": "thumbs up", "image_id": 2},
    ]
    by_caption = pair_groups(items, "caption")
    assert by_caption[0] == by_caption[2] != by_caption[1]
    assert pair_groups(items, "image").tolist() == [0, 1, 2]
    entries = [ManifestEntry(tmp_path / "a.png", ["a cat", "a kitten"]), ManifestEntry(tmp_path / "b.png", ["a dog"])]
    pairs = ImageTextPairs(entries, transform=lambda image: image)
    assert [image for image, _ in pairs.pairs] == [0, 0, 1]  # what __getitem__ reports as image_id
    with pytest.raises(ValueError, match="data.pair_groups"):
        Collate(None, "concept")


def test_queue_keeps_groups_aligned_with_the_keys_and_marks_unknown_ones():
    queue = PairedFeatureQueue(6, 4)
    queue.enqueue(torch.randn(4, 4), torch.randn(4, 4), torch.tensor([10, 11, 12, 13]))
    queue.enqueue(torch.randn(4, 4), torch.randn(4, 4))  # a batch without groups wraps around
    assert queue.groups.data.tolist() == [NO_GROUP, NO_GROUP, 12, 13, NO_GROUP, NO_GROUP]
    assert int(queue.groups.ptr) == int(queue.image.ptr) == 2


def test_a_checkpoint_without_queue_groups_loads_with_no_group_keys():
    old = PairedFeatureQueue(6, 4)
    old.enqueue(torch.randn(4, 4), torch.randn(4, 4))
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("groups.")}
    new = PairedFeatureQueue(6, 4)
    new.load_state_dict(state)  # strict
    assert new.groups.data.tolist() == [NO_GROUP] * 6 and int(new.groups.ptr) == int(new.image.ptr) == 4


def test_training_with_image_groups_logs_several_positives(make_cfg):
    # The synthetic set has several captions per image: with the queue, a query meets its siblings.
    metrics, objects = train(make_cfg("data.pair_groups=image", "trainer.max_steps=6"))
    assert metrics["train/inst_positives"] > 1.0
    queue = objects["module"].model.feature_queue
    assert int((queue.groups.data >= 0).sum()) == int(queue.groups.filled) == 64
    with pytest.raises(Exception, match="pair_groups"):
        train(make_cfg("data.pair_groups=concept"))
