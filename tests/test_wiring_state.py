"""The state a step reads and writes: queues (rows, pointer, fill, groups), Q^s, the momentum encoder and its EMA,
the temperature, and the rank layout of the keys under DDP (simulated in one process)."""

from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from test_wiring_common import (
    BATCH,
    assert_terms,
    build,
    encode,
    fill_queue,
    make_batch,
    reference_inst,
    reference_task,
    run_and_enqueue,
    run_step,
    set_similarity_queue,
    step_loss,
)

from cots import distributed
from cots.lit_module import COTSLitModule
from cots.queues import NO_GROUP
from cots.training_step import TrainingStep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers: threads only add overhead


def test_enqueue_writes_momentum_keys_modality_by_modality_with_wrap_around():
    """Q^v gets zhat^v, Q^t gets zhat^t, groups follow their rows; the pointer wraps and the oldest rows go first."""
    model, training_step = build(queue_size=6, amf={"enabled": True, "queue_size": 6})
    first, second = make_batch(seed=0), {**make_batch(seed=1), "pair_groups": torch.tensor([4, 5, 6, 7])}
    run_and_enqueue(model, training_step, first)
    queue = model.feature_queue
    assert int(queue.image.filled) == BATCH and int(queue.image.ptr) == BATCH
    assert queue.valid_mask().tolist() == [True] * BATCH + [False] * 2
    run_and_enqueue(model, training_step, second)
    a, b = encode(model, first), encode(model, second)
    slots = [4, 5, 0, 1]  # the second batch's four rows: two at the end, then over the two oldest
    torch.testing.assert_close(queue.image.data[slots].double(), b.zhat_v, rtol=0, atol=1e-6)
    torch.testing.assert_close(queue.text.data[slots].double(), b.zhat_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(queue.image.data[2:4].double(), a.zhat_v[2:], rtol=0, atol=1e-6)  # survivors
    torch.testing.assert_close(queue.text.data[2:4].double(), a.zhat_t[2:], rtol=0, atol=1e-6)
    assert queue.groups.data.tolist() == [6, 7, NO_GROUP, NO_GROUP, 4, 5]
    assert int(queue.image.ptr) == int(queue.text.ptr) == int(queue.groups.ptr) == 2 and int(queue.image.filled) == 6
    # Q^s holds s_i = zhat^v_i . zhat^t_i of both batches in order, filtered pairs included
    ordered = training_step.amf.similarity_queue.ordered().double()
    expected = torch.cat([a.positive_similarity[2:], b.positive_similarity])
    torch.testing.assert_close(ordered, expected, rtol=0, atol=1e-6)


def test_the_next_step_reads_the_enqueued_rows_as_keys():
    """Step 2's L_inst and L_task take step 1's momentum keys as the queue rows (and nothing else)."""
    model, training_step = build(queue_size=8, task={"enabled": True})
    first, second = make_batch(seed=0), make_batch(seed=1)
    run_and_enqueue(model, training_step, first)
    terms = run_step(model, training_step, second).terms
    a, b = encode(model, first), encode(model, second)
    tau = float(model.temperature())
    expected = {**reference_inst(b, a.zhat_v, a.zhat_t, tau), "task": reference_task(b, a.zhat_v, a.zhat_t, tau)}
    assert_terms(terms, expected)


def test_similarity_queue_fit_reads_only_filled_slots():
    """While Q^s fills, mu and sigma are those of its filled part and every pair is kept; then the filter acts."""
    model, training_step = build(amf={"enabled": True, "k": 0.0, "queue_size": 8})
    batch = make_batch()
    values = torch.tensor([0.9, 0.1, 0.5])
    training_step.amf.enqueue(values)
    with torch.no_grad():
        training_step.amf.similarity_queue.data[3:] = 50.0  # garbage in the empty slots
    decision = run_step(model, training_step, batch).decision
    assert not bool(decision.active) and decision.weights.tolist() == [1.0] * BATCH
    assert float(decision.mean) == pytest.approx(0.5) and float(decision.std) == pytest.approx(math.sqrt(0.32 / 3))
    s = encode(model, batch).positive_similarity.sort().values
    middle = float(s[1] + s[2]) / 2
    training_step.amf.enqueue(torch.full((5,), (8 * middle - 1.5) / 5))  # full now, mean = middle = the threshold (k=0)
    decision = run_step(model, training_step, batch).decision
    assert bool(decision.active) and int(decision.keep.sum()) == 2


def test_momentum_update_moves_every_momentum_parameter_by_the_given_coefficient():
    """theta_hat <- m theta_hat + (1 - m) theta for both towers and both projections, with the m passed in."""
    model, training_step = build()
    names = [name for name, _ in model.momentum_encoder.named_parameters()]
    assert any(n.startswith("image_tower.") for n in names) and any(n.startswith("text_tower.") for n in names)
    assert {"image_proj.weight", "text_proj.weight"} <= set(names)
    online = dict(model.encoder.named_parameters())
    for m in (0.9, 0.25):
        before = {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}
        model.momentum_update(m)
        for name, param in model.momentum_encoder.named_parameters():
            expected = m * before[name] + (1 - m) * online[name].detach()
            torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6, msg=name)
            assert not param.requires_grad
    # the next forward's keys come from the moved momentum encoder
    batch = make_batch()
    features = run_step(model, training_step, batch).features
    torch.testing.assert_close(features.image_keys.double(), encode(model, batch).zhat_v, rtol=0, atol=1e-6)


def test_momentum_encoder_stays_in_eval_mode_in_training():
    """Keys come from the momentum encoder without dropout: two training-mode steps give the same keys."""
    model, training_step = build(text_dropout=0.5)
    model.train()
    assert model.encoder.training and not model.momentum_encoder.training
    batch = make_batch()
    one, two = run_step(model, training_step, batch).features, run_step(model, training_step, batch).features
    assert torch.equal(one.text_keys, two.text_keys)
    assert not torch.equal(one.text.embedding, two.text.embedding)  # the online tower does drop out


def _module(model, training_step, momentum: float, schedule: str) -> COTSLitModule:
    return COTSLitModule(
        model,
        training_step,
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        momentum=momentum,
        momentum_schedule=schedule,
    )


@pytest.mark.parametrize(
    "schedule,step,total,expected",
    [
        ("constant", 3, 10, 0.8),
        ("cosine", 5, 10, 1 - 0.2 * (math.cos(math.pi * 0.5) + 1) / 2),  # half way: 0.9
        ("cosine", 10, 10, 1.0),
    ],
)
def test_module_momentum_and_schedule_reach_the_ema(schedule, step, total, expected):
    """module.momentum / module.momentum_schedule: the optimizer step applies the EMA with m(step, total)."""
    model, training_step = build()
    module = _module(model, training_step, 0.8, schedule)
    module._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=total)  # what the hook reads
    optimizer = torch.optim.SGD([p for p in model.encoder.parameters() if p.requires_grad], lr=0.0)
    before = {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}
    module.optimizer_step(0, 0, optimizer, lambda: None)
    online = dict(model.encoder.named_parameters())
    for name, param in model.momentum_encoder.named_parameters():
        torch.testing.assert_close(
            param.detach(),
            expected * before[name] + (1 - expected) * online[name].detach(),
            rtol=0,
            atol=1e-6,
            msg=name,
        )


def test_learn_temperature_switches_the_gradient_of_tau():
    """model.learn_temperature: tau gets a gradient from L_inst when true, never when false."""
    batch = make_batch()
    for learn in (True, False):
        model, training_step = build(learn_temperature=learn)
        fill_queue(model, 5)
        step_loss(model, training_step, batch).backward()
        grad = model.log_temperature.grad
        assert (grad is not None and float(grad) != 0) == learn


def test_a_skipped_non_finite_step_enqueues_nothing(monkeypatch):
    """module.skip_nonfinite: a step whose loss is not finite leaves the queues, pointers and Q^s as they were,
    while the same step with a finite loss enqueues its keys and similarities."""
    original = TrainingStep.__call__

    def poisoned(self, *args):
        out = original(self, *args)
        out.terms["loss"] = out.terms["loss"] * float("nan")
        return out

    for compute, enqueued in ((poisoned, 0), (original, BATCH)):
        model, training_step = build(amf={"enabled": True, "queue_size": 8})
        module = _module(model, training_step, 0.9, "constant")
        monkeypatch.setattr(TrainingStep, "__call__", compute)
        state = {k: v.clone() for k, v in module.state_dict().items() if "queue" in k}
        assert (module.training_step(make_batch(), 0) is None) == (enqueued == 0)
        assert int(model.feature_queue.image.filled) == int(training_step.amf.similarity_queue.filled) == enqueued
        if not enqueued:
            for key, value in module.state_dict().items():
                if key in state:
                    assert torch.equal(value, state[key]), key


def test_rank_layout_of_keys_and_amf_weights_under_ddp(monkeypatch):
    """Rank 1 of 2: its own keys sit at columns B..2B-1 of the gathered keys, its AMF weights are those rows of the
    global decision, the weight sum is global, and all 2B keys are enqueued in rank order."""
    other = {"keys": lambda x: x.flip(0), "groups": lambda x: x.flip(0) + 100}  # what rank 0 holds

    def gather(x):
        x = x.detach()
        return torch.cat([other["groups" if x.dtype == torch.long else "keys"](x), x])

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_gather_no_grad", gather)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda x: x.detach() + 1.0)  # rank 0 keeps one pair
    model, training_step = build(
        queue_size=16, task={"enabled": True}, amf={"enabled": True, "k": 1.0, "queue_size": 8}
    )
    queue_v, queue_t = fill_queue(model, 5)  # 5 + 2B = 13 rows: no wrap-around
    batch = {**make_batch(), "pair_groups": torch.tensor([0, 1, 2, 3])}  # rank 0's: 103 .. 100, no match
    enc = encode(model, batch)
    s = enc.positive_similarity.float()
    threshold = float(s.sort().values[:2].mean())  # drops this rank's least similar pair
    set_similarity_queue(training_step, mean=threshold + 0.1, std=0.1)
    step = run_and_enqueue(model, training_step, batch)

    keep = s >= threshold
    global_keep = torch.cat([keep.flip(0), keep])
    assert step.decision.keep.tolist() == global_keep.tolist() and keep.tolist() != keep.flip(0).tolist()
    assert step.decision.weights.tolist() == keep.float().tolist()
    # keys: [rank 0 = flipped ; rank 1 = this batch ; queue], the positive of local pair i at column B + i
    gathered = dataclasses.replace(
        enc, zhat_v=torch.cat([enc.zhat_v.flip(0), enc.zhat_v]), zhat_t=torch.cat([enc.zhat_t.flip(0), enc.zhat_t])
    )
    keys = 2 * BATCH + len(queue_v)
    targets = torch.nn.functional.one_hot(torch.arange(BATCH) + BATCH, keys).double()
    weight_sum = (float(keep.sum()) + 1.0) / 2
    tau = float(model.temperature())
    expected = reference_inst(gathered, queue_v, queue_t, tau, weights=keep, targets=targets, denominator=weight_sum)
    expected["task"] = reference_task(enc, queue_v, queue_t, tau, weights=keep, denominator=weight_sum)
    assert_terms(step.terms, expected)
    # the enqueue: both ranks' keys and groups in rank order, and Q^s of the global batch
    rows = slice(5, 5 + 2 * BATCH)
    torch.testing.assert_close(model.feature_queue.image.data[rows].double(), gathered.zhat_v, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.feature_queue.text.data[rows].double(), gathered.zhat_t, rtol=0, atol=1e-6)
    assert model.feature_queue.groups.data[rows].tolist() == [103, 102, 101, 100, 0, 1, 2, 3]
    global_s = torch.cat([enc.positive_similarity.flip(0), enc.positive_similarity])
    torch.testing.assert_close(training_step.amf.similarity_queue.ordered().double(), global_s, rtol=0, atol=1e-6)
