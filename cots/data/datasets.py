"""Datasets over manifest entries: training pairs and retrieval galleries."""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from cots.data.images import BadSample, load_rgb
from cots.data.manifest import ManifestEntry
from cots.data.noise import choose_noisy_pairs
from cots.data.text_tokenizer import TextTokenizer

# How many following samples a training item may try before the batch is declared unusable.
MAX_SUBSTITUTIONS = 16
SUBSTITUTE_STRIDE = 7919  # a prime: substitutes of one index are distinct unless the set is a multiple of it


def clean_caption(caption: str) -> str:
    """Collapse white space; '' means unusable."""
    return " ".join(caption.split()) if isinstance(caption, str) else ""


class ImageTextPairs(Dataset):
    """One item per (image, caption) pair of the manifest.

    A sample that cannot be decoded is replaced by the next usable one so that
    every rank keeps the same batch size; the reasons travel with the batch to be
    counted. Empty captions are dropped up front and counted in ``dropped``.

    With ``noise_rate`` p > 0, a seeded fraction p of the pairs gets the caption of a pair of
    another image (:mod:`cots.data.noise`); ``noisy`` (N,) bool marks them and ``noise_source``
    (N,) names the pair each caption came from (-1 when clean).
    """

    def __init__(
        self, entries: list[ManifestEntry], transform: Callable, seed: int = 0, noise_rate: float = 0.0, noise_seed: int = 0
    ) -> None:
        self.entries = entries
        self.transform = transform
        self.seed = seed
        self.pairs: list[tuple[int, str]] = []
        self.dropped: Counter[str] = Counter()
        for i, entry in enumerate(entries):
            for caption in entry.captions:
                text = clean_caption(caption)
                if text:
                    self.pairs.append((i, text))
                else:
                    self.dropped["empty_caption"] += 1
        if not self.pairs:
            raise ValueError("the training manifest has no usable image-caption pair")
        self.noise_rate, self.noise_seed = noise_rate, noise_seed
        self.noise_source = choose_noisy_pairs([image for image, _ in self.pairs], noise_rate, noise_seed)
        self.noisy = self.noise_source >= 0
        captions = self.captions()
        for i in torch.nonzero(self.noisy).squeeze(1).tolist():
            self.pairs[i] = (self.pairs[i][0], captions[int(self.noise_source[i])])

    def __len__(self) -> int:
        return len(self.pairs)

    def captions(self) -> list[str]:
        return [caption for _, caption in self.pairs]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key`` is an index, or ``(index, epoch)`` from :class:`ShardedEpochSampler`.

        An unusable pair is replaced by another (the reasons travel in ``skipped``), so that every
        rank keeps the same batch size.
        """
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        skipped = []
        for attempt in range(MAX_SUBSTITUTIONS):
            # Substitutes are spread out (not index+1, +2...): bad files often come in runs.
            pair_index = (index + attempt * SUBSTITUTE_STRIDE) % len(self.pairs)
            try:
                item = self.load_pair(pair_index, epoch)
            except BadSample as bad:
                skipped.append(bad.reason)
                continue
            item.update(caption=self.pairs[pair_index][1], index=pair_index, skipped=skipped,
                        noisy=bool(self.noisy[pair_index]), image_id=self.pairs[pair_index][0])
            return item
        raise RuntimeError(f"{MAX_SUBSTITUTIONS} consecutive unusable samples from index {index}: {Counter(skipped)}")

    def load_pair(self, pair_index: int, epoch: int) -> dict:
        """The image views of one pair (raises :class:`BadSample`); subclasses add token-level fields."""
        with torch.random.fork_rng(devices=[]):
            # The crop is a function of (seed, epoch, sample): identical under any
            # number of workers or ranks, and after a resume.
            torch.default_generator.manual_seed(hash((self.seed, epoch, pair_index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return {"image": self.transform(load_rgb(self.entries[self.pairs[pair_index][0]].image))}


class GalleryImages(Dataset):
    """The images of a retrieval gallery, in manifest order. Undecodable ones become blank and are counted."""

    def __init__(self, entries: list[ManifestEntry], transform: Callable, image_size: int) -> None:
        self.entries = entries
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        try:
            image, skipped = self.transform(load_rgb(self.entries[index].image)), []
        except BadSample as bad:
            image, skipped = torch.zeros(3, self.image_size, self.image_size), [bad.reason]
        return {"image": image, "index": index, "skipped": skipped}


class GalleryCaptions(Dataset):
    """All captions of a retrieval gallery with the index of their image."""

    def __init__(self, entries: list[ManifestEntry]) -> None:
        self.captions: list[str] = []
        self.text_to_image: list[int] = []
        for i, entry in enumerate(entries):
            for caption in entry.captions:
                text = clean_caption(caption)
                if text:
                    self.captions.append(text)
                    self.text_to_image.append(i)
        if not self.captions:
            raise ValueError("the retrieval manifest has no usable caption")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.captions[index], "index": index, "image_index": self.text_to_image[index]}


PAIR_GROUPS = ("image", "caption")


def caption_group(caption: str) -> int:
    """A stable non-negative 63-bit id of a caption's text: equal on every rank, worker and run."""
    digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def check_pair_groups(mode: str | None) -> None:
    """Refuse a ``data.pair_groups`` value other than null, ``image`` or ``caption``."""
    if mode not in (None, *PAIR_GROUPS):
        raise ValueError(f"data.pair_groups must be null, 'image' or 'caption', got {mode!r}")


def pair_groups(items: list[dict], mode: str) -> torch.Tensor:
    """(B,) long group of each training pair: its image (``image_id``) or its caption text."""
    if mode == "image":
        if "image_id" not in items[0]:
            raise ValueError("data.pair_groups=image: these training samples carry no image id")
        return torch.tensor([it["image_id"] for it in items], dtype=torch.long)
    return torch.tensor([caption_group(it["caption"]) for it in items], dtype=torch.long)


class Collate:
    """Stack images, tokenise captions, count skipped samples by reason.

    Args:
        tokenizer: the caption tokenizer.
        pair_groups: None, or ``image`` / ``caption``: training batches then carry ``pair_groups``
            (B,), and pairs of one group (the captions of one image; one caption on several images)
            are positives of each other in L_inst instead of negatives.
    """

    def __init__(self, tokenizer: TextTokenizer, pair_groups: str | None = None) -> None:
        check_pair_groups(pair_groups)
        self.tokenizer = tokenizer
        self.pair_groups = pair_groups

    def __call__(self, items: list[dict]) -> dict:
        batch: dict = {"index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        if "image" in items[0]:
            batch["images"] = torch.stack([it["image"] for it in items])
        if "caption" in items[0]:
            batch["input_ids"], batch["attention_mask"] = self.tokenizer([it["caption"] for it in items])
        if self.pair_groups and "caption" in items[0]:
            batch["pair_groups"] = pair_groups(items, self.pair_groups)
        if "noisy" in items[0]:
            batch["is_noisy"] = torch.tensor([it["noisy"] for it in items], dtype=torch.bool)
        if "image_index" in items[0]:
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
        batch["skipped"] = Counter(reason for it in items for reason in it.get("skipped", []))
        return batch
