"""The training step reads no tensor value on the host: no .item(), no branching on tensors, no boolean-mask indexing.

On a GPU each of those waits for the device to finish (a host synchronisation); on the CPU they are
free, so the guard here makes them visible: a ``TorchFunctionMode`` that fails on the tensor methods
that hand a value to Python, and on indexing with a boolean tensor (its size depends on the values).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cots.train import build_module

READS_A_VALUE = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
}


class NoHostReads(TorchFunctionMode):
    """Raise on any call that needs a tensor's values on the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS_A_VALUE:
            raise AssertionError(f"host read of a tensor value: {getattr(func, '__name__', func)}")
        if func is torch.Tensor.__getitem__ and _has_bool_index(args[1]):
            raise AssertionError("indexing with a boolean tensor (its size depends on the values)")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def test_the_guard_catches_a_host_read():
    with NoHostReads(), pytest.raises(AssertionError, match="item"):
        torch.ones(2).sum().item()
    with NoHostReads(), pytest.raises(AssertionError, match="__bool__"):
        if torch.ones(1) > 0:
            pass
    with NoHostReads(), pytest.raises(AssertionError, match="boolean"):
        torch.ones(3)[torch.tensor([True, False, True])]


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective=default", "objective.task.enabled=true", "objective.amf.queue_size=16"],  # AMF filters from step 3
        ["objective=contrastive_only"],
    ],
)
def test_training_step_reads_no_tensor_value_on_the_host(make_cfg, overrides):
    """Forward (online + momentum), AMF, L_inst (+ pair groups) + L_task, enqueue, backward, EMA: no host reads."""
    module = build_module(make_cfg(*overrides), 200, None)
    model, step = module.model.train(), module.step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (8, 9), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[1, 5:], ids[1, 4] = 0, 3  # one shorter caption: padding in the batch
    batch = {
        "images": torch.randn(8, 3, 32, 32, generator=gen),
        "input_ids": ids * mask,
        "attention_mask": mask,
        "pair_groups": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5]),
    }  # (B,): pairs 0-1 and 4-5 share a group
    for _ in range(3):  # the queues and the AMF statistics fill up over the steps
        with NoHostReads():
            out = step(model, batch)
            step.enqueue(model, out)
            out.terms["loss"].backward()
        optimizer.step()  # its step counts are host tensors (reading them waits for no device)
        optimizer.zero_grad(set_to_none=True)
        with NoHostReads():
            model.momentum_update(0.99)
    assert torch.isfinite(out.terms["loss"])
    if out.decision is not None:
        assert bool(out.decision.active)  # the filter ran full, not only its warm-up


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_text_tower_mask_gives_what_transformers_own_mask_gives(implementation):
    """The tower builds BERT's padding mask itself (no host read); the states are those of BERT's own builder."""
    from cots.models.text_tower import TextTower

    torch.manual_seed(0)
    tower = TextTower(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, dropout=0.0).eval()
    tower.bert.set_attn_implementation(implementation)
    ids = torch.randint(5, 100, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:], mask[2, 2:] = 0, 0
    reference = tower.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # B x L x W
    with NoHostReads():
        _, states = tower(ids, mask)
    assert torch.allclose(states, reference, atol=1e-6)
    assert not torch.allclose(states[1, :4], tower(ids, torch.ones_like(mask))[1][1, :4], atol=1e-3)  # padding matters
