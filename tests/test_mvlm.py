"""Masked vision-language modeling (METHOD §4): losses against a float64 reference, fusion heads, tied decoder."""

from __future__ import annotations

import pytest
import torch

from cots.losses.mvlm import cmlm_loss, cmvm_loss
from cots.masking import IGNORE_INDEX, BlockMaskGenerator, block_masks, mask_text_tokens, sample_rng
from cots.models.image_tower import ImageTower
from cots.models.mvlm_heads import CMLMHead, CMVMHead
from cots.models.text_tower import TextTower

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: threads only add overhead


def reference_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_j -log softmax(logits_j)[target_j] in float64, written out."""
    x = logits.double()
    log_z = x.exp().sum(dim=-1).log()
    return (log_z - x.gather(-1, targets[:, None]).squeeze(1)).mean()


def test_cmvm_loss_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    B, h, V = 3, 4, 50
    logits = torch.randn(B, h * h, V, generator=gen) * 3
    tokens = torch.randint(V, (B, h, h), generator=gen)
    mask = torch.rand(B, h * h, generator=gen) < 0.4
    expected = reference_ce(logits[mask], tokens.flatten(1)[mask])

    full = cmvm_loss(logits, tokens, mask)
    gathered = cmvm_loss(logits[mask], tokens, mask)  # what the head returns with a mask
    assert torch.allclose(full["loss"].double(), expected, rtol=1e-5)
    assert torch.allclose(gathered["loss"], full["loss"])
    accuracy = (logits[mask].argmax(-1) == tokens.flatten(1)[mask]).double().mean()
    assert torch.allclose(full["accuracy"].double(), accuracy)
    # Unmasked positions do not matter.
    other = logits.clone()
    other[~mask] = 100.0
    assert torch.equal(cmvm_loss(other, tokens, mask)["loss"], full["loss"])
    # A global denominator (DDP): sum / denominator.
    n = int(mask.sum())
    assert torch.allclose(cmvm_loss(logits, tokens, mask, denominator=2 * n)["loss"], full["loss"] / 2)


def test_cmlm_loss_matches_float64_reference_and_ignores_unmasked():
    gen = torch.Generator().manual_seed(1)
    B, L, V = 4, 9, 30
    logits = torch.randn(B, L, V, generator=gen, dtype=torch.bfloat16)  # computed in float32 whatever the input
    words = torch.randint(V, (B, L), generator=gen)
    chosen = torch.rand(B, L, generator=gen) < 0.3
    labels = torch.where(chosen, words, IGNORE_INDEX)
    expected = reference_ce(logits[chosen].float(), words[chosen])
    out = cmlm_loss(logits, labels)
    assert out["loss"].dtype == torch.float32
    assert torch.allclose(out["loss"].double(), expected, rtol=1e-5)
    assert torch.allclose(cmlm_loss(logits[chosen], labels)["loss"], out["loss"])


def test_losses_with_nothing_masked_are_zero_with_a_gradient_path():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    out = cmvm_loss(logits, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert cmlm_loss(logits, torch.full((2, 5), IGNORE_INDEX))["loss"].item() == 0.0
    with pytest.raises(ValueError, match="3 logit rows for 2 masked"):
        cmlm_loss(torch.randn(3, 7), torch.tensor([[1, IGNORE_INDEX, 2]]))


def test_heads_shapes_fusion_and_tied_decoder():
    torch.manual_seed(0)
    text = TextTower(vocab_size=40, hidden_size=24, num_layers=1, num_heads=2, max_length=16, dropout=0.0)
    cmvm = CMVMHead(width_v=32, width_t=24, image_vocab=64)
    cmlm = CMLMHead(width_t=24, width_v=32, text_embeddings=text.word_embeddings)
    assert cmlm.decoder.weight is text.word_embeddings.weight  # tied, not copied
    assert cmlm.decoder.bias.shape == (40,)

    B, P, L = 2, 16, 6
    patches, text_cls = torch.randn(B, P, 32), torch.randn(B, 24)
    tokens, image_cls = torch.randn(B, L, 24), torch.randn(B, 32)
    patch_mask = torch.zeros(B, P, dtype=torch.bool)
    patch_mask[0, :5], patch_mask[1, 3:6] = True, True
    assert cmvm(patches, text_cls).shape == (B, P, 64)
    assert cmvm(patches, text_cls, patch_mask).shape == (8, 64)
    assert torch.allclose(cmvm(patches, text_cls, patch_mask), cmvm(patches, text_cls)[patch_mask], atol=1e-6)
    token_mask = torch.tensor([[False, True, False, True, False, False], [False, False, True, False, False, False]])
    assert cmlm(tokens, image_cls).shape == (B, L, 40)
    assert cmlm(tokens, image_cls, token_mask).shape == (3, 40)

    # W starts at zero (unimodal start) and then carries the other stream's global feature.
    assert torch.equal(cmvm(patches, text_cls), cmvm(patches, torch.randn(B, 24)))
    torch.nn.init.normal_(cmvm.fusion.proj.weight)
    assert not torch.allclose(cmvm(patches, text_cls), cmvm(patches, torch.randn(B, 24)))

    # Gradients of the tied decoder land in the word embeddings.
    loss = cmlm_loss(cmlm(tokens, image_cls, token_mask), torch.where(token_mask, 7, IGNORE_INDEX))["loss"]
    loss.backward()
    assert text.word_embeddings.weight.grad is not None and text.word_embeddings.weight.grad[7].abs().sum() > 0


def test_masked_passes_through_both_towers_train_every_part():
    """One MVLM step on tiny towers: masks, masked forward passes, heads, losses, gradients."""
    torch.manual_seed(0)
    image_tower = ImageTower(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mask_embedding=True
    )
    text_tower = TextTower(vocab_size=50, hidden_size=24, num_layers=1, num_heads=2, max_length=16, dropout=0.0)
    cmvm = CMVMHead(image_tower.width, text_tower.width, image_vocab=64)
    cmlm = CMLMHead(text_tower.width, image_tower.width, text_tower.word_embeddings)
    torch.nn.init.normal_(cmvm.fusion.proj.weight, std=0.02)
    torch.nn.init.normal_(cmlm.fusion.proj.weight, std=0.02)

    B, grid = 3, image_tower.grid_size[0]
    images = torch.randn(B, 3, 32, 32)
    image_tokens = torch.randint(64, (B, grid, grid))
    ids = torch.randint(5, 50, (B, 10))
    ids[:, 0], ids[:, -1] = 2, 3
    attention = torch.ones_like(ids)
    patch_mask = block_masks(BlockMaskGenerator(grid, min_num_patches=2), B, sample_rng(0))  # B x 16
    mlm_ids, mlm_labels = mask_text_tokens(ids, attention, 4, [0, 1, 2, 3, 4], 50, torch.Generator().manual_seed(0))

    image_cls, _ = image_tower(images)  # unmasked passes give the fusion's global features
    text_cls, _ = text_tower(ids, attention)
    _, masked_patches = image_tower(images, patch_mask)
    _, masked_states = text_tower(mlm_ids, attention)
    loss_v = cmvm_loss(cmvm(masked_patches, text_cls, patch_mask), image_tokens, patch_mask)["loss"]
    loss_t = cmlm_loss(cmlm(masked_states, image_cls, mlm_labels != IGNORE_INDEX), mlm_labels)["loss"]
    (loss_v + loss_t).backward()
    assert torch.isfinite(loss_v) and torch.isfinite(loss_t)
    assert image_tower.mask_embedding.grad.abs().sum() > 0
    assert cmvm.fusion.proj.weight.grad.abs().sum() > 0 and cmlm.fusion.proj.weight.grad.abs().sum() > 0
