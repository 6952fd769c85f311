"""Noisy pairs for measuring the Adaptive Momentum Filter: swap the captions of a seeded subset.

``choose_noisy_pairs`` picks exactly ``round(rate * N)`` pairs with a seeded permutation and gives
each one the caption of another pair of the subset (a derangement) whose image is different. The
captions of the subset are only permuted, so the caption multiset, and with it a tokenizer trained
on the training captions, is unchanged. The choice is a pure function of (image of each pair,
rate, seed): the same manifest and seed give the same noisy set on every rank and after a resume.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def choose_noisy_pairs(pair_images: Sequence[int], rate: float, seed: int) -> torch.Tensor:
    """Source pair of each pair's caption: (N,) long, -1 for clean pairs.

    Args:
        pair_images: the image (entry) index of each pair, (N,).
        rate: fraction of pairs to corrupt, in [0, 1].
        seed: seed of the choice and of the caption assignment.
    Returns:
        ``source`` with ``source[i] = j`` when pair i gets pair j's caption; ``images[j] != images[i]``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.noise_rate must be in [0, 1], got {rate}")
    images = torch.as_tensor(list(pair_images), dtype=torch.long)
    n_pairs = len(images)
    source = torch.full((n_pairs,), -1, dtype=torch.long)
    n_noisy = round(rate * n_pairs)
    if n_noisy == 0:
        return source
    if len(torch.unique(images)) < 2:
        raise ValueError("data.noise_rate > 0 needs at least two different images to swap captions between")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_pairs, generator=g)[:n_noisy]  # the noisy pairs, in random order
    # Group the chosen pairs by image (groups in random order, contiguous), then give each pair the
    # caption of the pair `shift` places further round the cycle. With shift = the largest group,
    # no pair lands in its own group as long as that group holds at most half of the chosen pairs.
    image_rank = torch.randperm(int(images.max()) + 1, generator=g)[images[chosen]]
    chosen = chosen[torch.sort(image_rank, stable=True).indices]
    shift = int(torch.unique(images[chosen], return_counts=True)[1].max())
    if 2 * shift <= n_noisy:
        source[chosen] = torch.roll(chosen, -shift)
        return source
    # Too few chosen pairs (or mostly one image) for a derangement: borrow any other image's caption.
    for i in chosen.tolist():
        others = torch.nonzero(images != images[i]).squeeze(1)
        source[i] = others[torch.randint(len(others), (1,), generator=g)]
    return source


def write_noise_record(path: str | Path, source: torch.Tensor, rate: float, seed: int) -> Path:
    """JSON with the noisy pairs: ``[[pair, source_pair], ...]`` and how they were chosen."""
    noisy = torch.nonzero(source >= 0).squeeze(1).tolist()
    record = {
        "noise_rate": rate,
        "noise_seed": seed,
        "num_pairs": len(source),
        "num_noisy": len(noisy),
        "pair_index": "order of (manifest entry, caption) after dropping empty captions",
        "noisy": [[i, int(source[i])] for i in noisy],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path
