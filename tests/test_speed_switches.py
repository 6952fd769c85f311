"""Speed switches change speed only: activation checkpointing and torch.compile give the eager step's numbers."""

from __future__ import annotations

import torch

from cots.train import build_module

NO_DROPOUT = ["model.encoder.text_tower.dropout=0.0"]  # the two runs must draw no different random numbers


def _batch(batch: int = 8, length: int = 9) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (batch, length), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    return {
        "images": torch.randn(batch, 3, 32, 32, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


def _loss_and_grads(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = module.model.train()
    loss = module.step(model, batch).terms["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _build(cfg):
    torch.manual_seed(0)
    return build_module(cfg, 200, None)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(make_cfg):
    eager = _build(make_cfg(*NO_DROPOUT, "model.encoder.text_tower.num_layers=2"))
    checkpointed = _build(
        make_cfg(
            *NO_DROPOUT,
            "model.encoder.text_tower.num_layers=2",
            "model.encoder.image_tower.grad_checkpointing=true",
            "model.encoder.text_tower.grad_checkpointing=true",
        )
    )
    assert checkpointed.model.encoder.image_tower.vit.grad_checkpointing
    bert = checkpointed.model.encoder.text_tower.bert
    assert getattr(bert, "is_activation_checkpointing", None) or bert.is_gradient_checkpointing
    batch = _batch()
    loss, grads = _loss_and_grads(eager, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-5, rtol=1e-4), name


def test_compiled_towers_keep_parameter_names_and_the_eager_numbers(make_cfg):
    eager = _build(make_cfg(*NO_DROPOUT))
    compiled = _build(make_cfg(*NO_DROPOUT, "module.compile={backend: aot_eager}"))
    towers = [
        compiled.model.encoder.image_tower,
        compiled.model.encoder.text_tower,
        compiled.model.momentum_encoder.image_tower,
        compiled.model.momentum_encoder.text_tower,
    ]
    assert all(tower._compiled_call_impl is not None for tower in towers)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    batch = _batch()
    loss, grads = _loss_and_grads(eager, batch)
    loss_compiled, grads_compiled = _loss_and_grads(compiled, batch)
    assert torch.allclose(loss, loss_compiled, atol=1e-5)
    for name in grads:
        assert torch.allclose(grads[name], grads_compiled[name], atol=1e-5, rtol=1e-4), name
