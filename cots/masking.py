"""Masking for masked vision-language modeling (METHOD §4): BEiT block-wise patch masks, BERT text masks.

Patch masks are drawn with a numpy ``Generator`` per sample (so a dataset can seed
them with ``(seed, epoch, index)`` and stay exact under any worker count or
resume); text masks are a torch function on whole batches (collate or training
step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions without a prediction (torch cross_entropy's default ignore_index)


# -- image: BEiT block-wise masking ----------------------------------------------------------------
@dataclass(frozen=True)
class MaskBlock:
    """One rectangle placed by :class:`BlockMaskGenerator`, in grid cells."""

    top: int
    left: int
    height: int
    width: int

    @property
    def area(self) -> int:
        return self.height * self.width


class BlockMaskGenerator:
    """BEiT's block-wise masking (Bao et al. 2022, ``MaskingGenerator``) on an h x w patch grid.

    Rectangles of ``min_num_patches`` cells or more, with aspect ratio (height / width)
    log-uniform in [min_aspect, max_aspect], are dropped at random positions until
    about ``mask_ratio`` of the grid is covered; a rectangle is accepted only if it adds
    new cells without exceeding the budget, so the count never passes
    ``num_masking_patches`` (and may stop short of it when no rectangle fits).

    Unlike BEiT, a candidate whose *rounded* size falls below ``min_num_patches`` or
    outside the aspect range is redrawn, so that every block honours both; every
    connected masked region therefore has at least ``min_num_patches`` cells.

    Args:
        grid: patches per side, or (h, w).
        mask_ratio: target fraction of masked patches (``num_masking_patches = round(ratio * h * w)``).
        min_num_patches: smallest rectangle, in patches (BEiT: 16 at 14x14 and at 24x24).
        max_num_patches: largest rectangle; None = the whole budget.
        min_aspect: smallest height/width ratio; the largest is ``max_aspect`` or ``1 / min_aspect``.
        max_attempts: rectangles tried per placement before giving up on growing the mask.
    """

    def __init__(
        self,
        grid: int | Sequence[int],
        mask_ratio: float = 0.4,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = round(mask_ratio * self.num_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches) if max_num_patches is not None else self.num_masking_patches
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.aspect_range = (min_aspect, max_aspect)
        self._log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts
        if self.min_num_patches < 1 or self.min_num_patches > self.num_masking_patches:
            raise ValueError(
                f"min_num_patches={min_num_patches} must be in [1, {self.num_masking_patches}] "
                f"(mask_ratio={mask_ratio} of a {self.height}x{self.width} grid)"
            )
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(f"max_num_patches={max_num_patches} is below min_num_patches={min_num_patches}")

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid={self.height}x{self.width}, num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect={self.aspect_range})"
        )

    def _place(self, mask: np.ndarray, budget: int, rng: np.random.Generator, blocks: list[MaskBlock]) -> int:
        """Try to add one rectangle adding 1..budget new cells; returns the number added (0 = none fitted)."""
        min_aspect, max_aspect = self.aspect_range
        for _ in range(self.max_attempts):
            # BEiT draws the area in [min, budget]; once budget < min the range is reversed, as in random.uniform.
            target_area = rng.uniform(self.min_num_patches, max(budget, self.min_num_patches))
            aspect = math.exp(rng.uniform(*self._log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if h * w < self.min_num_patches or not min_aspect <= h / max(w, 1) <= max_aspect:
                continue  # rounding broke a constraint: redraw
            if h >= self.height or w >= self.width:  # BEiT keeps blocks strictly inside the grid
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            region = mask[top : top + h, left : left + w]
            added = h * w - int(region.sum())
            if 0 < added <= budget:
                region[...] = True
                blocks.append(MaskBlock(top, left, h, w))
                return added
        return 0

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, list[MaskBlock]]:
        """One mask and the rectangles that made it.

        Returns:
            mask: (h, w) bool, True = masked; blocks: the placed rectangles in order.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[MaskBlock] = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._place(mask, budget, rng, blocks)
            if added == 0:
                break
            count += added
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """(h, w) bool mask, True = masked."""
        return self.generate(rng)[0]


def block_masks(generator: BlockMaskGenerator, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """A batch of independent block masks, flattened row-major like the ViT's patch sequence.

    Returns:
        (B, h*w) bool tensor, True = patch replaced by [MASK].
    """
    masks = np.stack([generator(rng) for _ in range(batch_size)])  # B x h x w
    return torch.from_numpy(masks.reshape(batch_size, -1))


def sample_rng(*key: int) -> np.random.Generator:
    """A numpy Generator determined by non-negative ints, e.g. ``(seed, epoch, index)``."""
    return np.random.default_rng([int(k) for k in key])


# -- text: BERT 80/10/10 masking ---------------------------------------------------------------------
def maskable_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int]
) -> torch.Tensor:
    """(B, L) bool: real (attended) tokens that are not special ([CLS], [SEP], [PAD], [MASK], [UNK]...)."""
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def mask_text_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    special_ids: Iterable[int],
    vocab_size: int,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a tokenised batch.

    Per caption with n maskable tokens (attended, not special), ``k = max(1, floor(p*n + u))``
    positions are chosen uniformly without replacement (u ~ U[0, 1): stochastic rounding
    keeps E[k] = p*n for n*p >= 1, and every caption with a maskable token gets at least one).
    Of the chosen positions, ``replace_prob`` become [MASK], ``random_prob`` a random id
    from the non-special vocabulary, the rest keep their token; all of them are predicted.

    Args:
        input_ids: (B, L) long; attention_mask: (B, L), 1 for real tokens.
        mask_id: id of [MASK]; special_ids: ids never masked nor drawn as random replacements.
        vocab_size: size of the text vocabulary (random replacements are drawn below it).
        generator: torch Generator for reproducible masks (its device is used for drawing).
        mask_prob, replace_prob, random_prob: the 15% / 80% / 10% of BERT.
    Returns:
        masked_ids: (B, L) long, the encoder input; labels: (B, L) long, the original id at
        chosen positions and ``IGNORE_INDEX`` (-100) elsewhere.
    """
    if not (0 < mask_prob <= 1 and replace_prob >= 0 and random_prob >= 0 and replace_prob + random_prob <= 1):
        raise ValueError(f"bad masking probabilities: mask {mask_prob}, replace {replace_prob}, random {random_prob}")
    device = input_ids.device
    draw_device = generator.device if generator is not None else device
    special = sorted(set(int(s) for s in special_ids))
    maskable = maskable_positions(input_ids, attention_mask, special)  # B x L
    n = maskable.sum(dim=1)  # B

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=draw_device).to(device)

    batch, length = input_ids.shape
    k = torch.floor(mask_prob * n + rand(batch)).long().clamp(min=1)  # B, masked count per caption
    k = torch.minimum(k, n)
    # Rank maskable positions by a random score; unmaskable ones sort last (score 2 > any U[0,1)).
    scores = torch.where(maskable, rand(batch, length), torch.full_like(maskable, 2.0, dtype=torch.float))
    ranks = scores.argsort(dim=1).argsort(dim=1)  # B x L, rank of each position
    chosen = maskable & (ranks < k[:, None])  # B x L

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = rand(batch, length)  # B x L: < replace -> [MASK]; < replace+random -> random id; else kept
    to_mask = chosen & (action < replace_prob)
    to_random = chosen & (action >= replace_prob) & (action < replace_prob + random_prob)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[s for s in special if 0 <= s < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1).to(device)  # non-special ids
    picks = torch.randint(len(pool), (batch, length), generator=generator, device=draw_device).to(device)
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked_ids = torch.where(to_random, pool[picks], masked_ids)
    return masked_ids, labels


class TextMasker:
    """:func:`mask_text_tokens` bound to a text tokenizer's ids.

    Args:
        mask_id, special_ids, vocab_size: from :class:`cots.data.text_tokenizer.TextTokenizer`
            (``TextMasker.from_tokenizer(tok)``).
        mask_prob, replace_prob, random_prob: BERT's 0.15 / 0.8 / 0.1.
    """

    def __init__(
        self,
        mask_id: int,
        special_ids: Iterable[int],
        vocab_size: int,
        mask_prob: float = 0.15,
        replace_prob: float = 0.8,
        random_prob: float = 0.1,
    ) -> None:
        self.mask_id = mask_id
        self.special_ids = sorted(set(int(s) for s in special_ids) | {int(mask_id)})
        self.vocab_size = vocab_size
        self.probs = dict(mask_prob=mask_prob, replace_prob=replace_prob, random_prob=random_prob)

    @classmethod
    def from_tokenizer(cls, tokenizer, **probs: float) -> TextMasker:
        return cls(tokenizer.mask_id, tokenizer.special_ids, tokenizer.vocab_size, **probs)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked_ids, labels), both (B, L); see :func:`mask_text_tokens`."""
        return mask_text_tokens(
            input_ids, attention_mask, self.mask_id, self.special_ids, self.vocab_size, generator, **self.probs
        )
