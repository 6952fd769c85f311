"""Training pairs with what masked vision-language modeling needs (METHOD §4).

Each item carries, besides the ViT view and the caption:

* ``image_tokens`` (h, w) long, from a :class:`TokenCache`, when the crop is a cached one
  (the centre crop or one of the k recorded random crops), or
* ``image_dvae`` (3, s, s) float in [0, 1], the same crop at the dVAE resolution, for the
  online path (the training step tokenizes the batch);
* ``patch_mask`` (P,) bool, a BEiT block mask, when a mask generator is given.

Crops, cache variants and masks are functions of ``(seed, epoch, pair index)``: identical
under any number of workers or ranks, and after a resume.
"""
from __future__ import annotations

import numpy as np
import torch

from cots.data.crops import DEFAULT_RATIO, center_box, crop_view, image_to_uint8, normalize_imagenet, random_resized_box
from cots.data.datasets import Collate, ImageTextPairs
from cots.data.images import BadSample, load_rgb
from cots.data.manifest import ManifestEntry
from cots.data.text_tokenizer import TextTokenizer
from cots.data.token_cache import TokenCache
from cots.masking import BlockMaskGenerator, TextMasker, sample_rng
from cots_dvae.arch import DOWNSAMPLE

CACHE_CROPS = ("center", "random", "any")


class OnlineViews:
    """The online path's item for one image, a function of its random streams: the ViT crop
    (``image``, normalised), the same crop at the dVAE's resolution (``image_dvae``, [0, 1]; the
    training step tokenizes it), a block ``patch_mask`` (P,) when a mask generator is given, and
    ``mask_seed`` for the collate's caption masking. Shared by the manifest path
    (:class:`ImageTextTokenPairs`) and the shard path (:class:`cots.data.shards.ShardPairs`), so that
    the same pair with the same streams gives the same tensors on both.

    Args:
        image_size: ViT view side in pixels.
        dvae_input_size: dVAE view side.
        scale, ratio: RandomResizedCrop parameters; ``scale=None`` = centre crop.
        hflip: flip probability (the same flip for both views).
        mask_generator: BEiT block masks over the dVAE's token grid, or None.
    """

    def __init__(self, image_size: int, dvae_input_size: int, scale: tuple[float, float] | None = (0.5, 1.0),
                 ratio: tuple[float, float] = DEFAULT_RATIO, hflip: float = 0.0,
                 mask_generator: BlockMaskGenerator | None = None) -> None:
        self.image_size, self.dvae_input_size = int(image_size), int(dvae_input_size)
        self.scale = tuple(scale) if scale is not None else None
        self.ratio, self.hflip, self.mask_generator = tuple(ratio), hflip, mask_generator
        if mask_generator is not None:
            grid = self.dvae_input_size // DOWNSAMPLE
            if (mask_generator.height, mask_generator.width) != (grid, grid):
                raise ValueError(f"mask grid {mask_generator.height}x{mask_generator.width} != token grid {grid}x{grid}")

    def crops(self, image: torch.Tensor, rng: np.random.Generator) -> dict:
        """``image`` (3, H, W) uint8 -> the two views of one box, drawn from ``rng``."""
        height, width = image.shape[-2:]
        box = center_box(height, width) if self.scale is None else random_resized_box(height, width, rng, self.scale, self.ratio)
        flip = self.hflip > 0 and rng.random() < self.hflip
        return {
            "image": normalize_imagenet(crop_view(image, box, self.image_size, flip)),
            "image_dvae": crop_view(image, box, self.dvae_input_size, flip),
        }

    def extras(self, mask_rng: np.random.Generator, seed_rng: np.random.Generator) -> dict:
        """The patch mask (when configured) and the caption-masking seed: functions of the sample."""
        item = {}
        if self.mask_generator is not None:
            item["patch_mask"] = torch.from_numpy(self.mask_generator(mask_rng).reshape(-1))  # P
        item["mask_seed"] = int(seed_rng.integers(2**62))
        return item

    def __call__(self, image: torch.Tensor, key: tuple[int, ...]) -> dict:
        """Everything of one item from ``key`` (non-negative ints, e.g. (seed, epoch, pair index)):
        streams 0 (crop), 1 (patch mask), 2 (caption-mask seed), as :class:`ImageTextTokenPairs`."""
        crop_rng, mask_rng, seed_rng = (sample_rng(*key, stream) for stream in (0, 1, 2))
        return {**self.crops(image, crop_rng), **self.extras(mask_rng, seed_rng)}


class ImageTextTokenPairs(ImageTextPairs):
    """:class:`ImageTextPairs` whose ViT crop comes with dVAE tokens (cache) or a dVAE view (online).

    Args:
        entries: manifest entries (the cache's rows, in the same order).
        image_size: ViT view side in pixels.
        dvae_input_size: dVAE view side (online path; with a cache it is the cache's).
        seed: data seed.
        scale, ratio: RandomResizedCrop parameters of the online path; ``scale=None`` = centre crop.
        hflip: flip probability (online path only: cached tokens are of unflipped crops).
        token_cache: serve tokens from it instead of a dVAE view.
        cache_crop: which cached variant trains: ``center`` (0), ``random`` (one of 1..k),
            ``any`` (one of 0..k); default ``random`` when the cache has crops, else ``center``.
        mask_generator: adds a block ``patch_mask`` (P,) to every item.
        pair_options: further :class:`ImageTextPairs` arguments (e.g. ``noise_rate``, ``noise_seed``).
    """

    def __init__(
        self,
        entries: list[ManifestEntry],
        image_size: int,
        dvae_input_size: int | None = None,
        seed: int = 0,
        scale: tuple[float, float] | None = (0.5, 1.0),
        ratio: tuple[float, float] = DEFAULT_RATIO,
        hflip: float = 0.0,
        token_cache: TokenCache | None = None,
        cache_crop: str | None = None,
        mask_generator: BlockMaskGenerator | None = None,
        **pair_options,
    ) -> None:
        super().__init__(entries, transform=None, seed=seed, **pair_options)
        self.image_size = image_size
        self.token_cache = token_cache
        if token_cache is not None:
            if len(token_cache) != len(entries):
                raise ValueError(f"token cache {token_cache.path} has {len(token_cache)} images, the manifest {len(entries)}")
            if hflip > 0:
                raise ValueError(
                    "data.train_transform.hflip > 0 needs online image tokens: cached tokens are of unflipped crops"
                )
            cache_crop = cache_crop or ("random" if token_cache.crops else "center")
            if cache_crop not in CACHE_CROPS:
                raise ValueError(f"cache_crop must be one of {CACHE_CROPS}, got {cache_crop!r}")
            if cache_crop == "random" and not token_cache.crops:
                raise ValueError(f"cache_crop=random but {token_cache.path} holds only the centre crop (built with --crops 0)")
            self.dvae_input_size = int(token_cache.meta["dvae_input_size"])
        else:
            if dvae_input_size is None:
                raise ValueError("dvae_input_size is required without a token cache (online tokens)")
            self.dvae_input_size = int(dvae_input_size)
        self.cache_crop = cache_crop
        # the crops (online path) and the patch mask / caption-mask seed (both paths)
        self.views = OnlineViews(image_size, self.dvae_input_size, scale, ratio, hflip, mask_generator)

    def _variant(self, rng: np.random.Generator) -> int:
        k = self.token_cache.crops
        if self.cache_crop == "center":
            return 0
        if self.cache_crop == "random":
            return 1 + int(rng.integers(k))
        return int(rng.integers(k + 1))

    def _views(self, entry_index: int, rng: np.random.Generator) -> dict:
        image = image_to_uint8(load_rgb(self.entries[entry_index].image))  # 3 x H x W uint8
        if self.token_cache is not None:
            variant = self._variant(rng)
            box = self.token_cache.box(entry_index, variant)
            try:
                view = crop_view(image, box, self.image_size)
            except ValueError as err:
                image_path = self.entries[entry_index].image
                raise ValueError(f"{image_path} changed since {self.token_cache.path} was built: {err}") from None
            return {"image": normalize_imagenet(view), "image_tokens": self.token_cache[entry_index, variant]}
        return self.views.crops(image, rng)

    def load_pair(self, pair_index: int, epoch: int) -> dict:
        """The ViT crop, its dVAE view or cached tokens, the patch mask and the text-mask seed."""
        entry_index = self.pairs[pair_index][0]
        if self.token_cache is not None and entry_index in self.token_cache.unreadable:
            raise BadSample("undecodable", f"image {entry_index} was unreadable when the token cache was built")
        # Independent streams for the crop, the mask and the caption-mask seed (seeds the collate's
        # text masking: a function of the samples, not of the worker): changing one leaves the others.
        crop_rng, mask_rng, seed_rng = (sample_rng(self.seed, epoch, pair_index, stream) for stream in (0, 1, 2))
        return {**self._views(entry_index, crop_rng), **self.views.extras(mask_rng, seed_rng)}


class MVLMCollate(Collate):
    """:class:`Collate` plus the MVLM fields: ``image_tokens`` (B, h, w), ``images_dvae`` (B, 3, s, s),
    ``patch_mask`` (B, P), and with a text masker ``mlm_input_ids`` / ``mlm_labels`` (B, L).

    Args:
        tokenizer: the caption tokenizer.
        text_masker: BERT masking of the captions (None: the training step masks, or no CMLM).
        pair_groups: as :class:`Collate`.
    """

    def __init__(self, tokenizer: TextTokenizer, text_masker: TextMasker | None = None,
                 pair_groups: str | None = None) -> None:
        super().__init__(tokenizer, pair_groups)
        self.text_masker = text_masker

    def __call__(self, items: list[dict]) -> dict:
        batch = super().__call__(items)
        for key, out in (("image_tokens", "image_tokens"), ("image_dvae", "images_dvae"), ("patch_mask", "patch_mask")):
            if key in items[0]:
                batch[out] = torch.stack([it[key] for it in items])
        if self.text_masker is not None and "input_ids" in batch:
            # Seeded by the samples themselves, so the masks follow the data, not the worker or the rank.
            seed = hash(tuple(it.get("mask_seed", it["index"]) for it in items)) & 0x7FFF_FFFF_FFFF_FFFF
            generator = torch.Generator().manual_seed(seed)
            masked_ids, labels = self.text_masker(batch["input_ids"], batch["attention_mask"], generator)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked_ids, labels  # B x L each
        return batch


def build_token_pairs(
    entries: list[ManifestEntry],
    image_size: int,
    seed: int,
    image_tokens: dict,
    train_transform: dict | None = None,
    manifest: str | None = None,
    **pair_options,
) -> ImageTextTokenPairs:
    """The training set of the data module when ``data.image_tokens`` is set.

    Args:
        entries: the training manifest's entries; manifest: its path (checked against the cache).
        image_size, seed: ``data.image_size``, ``data.seed``.
        image_tokens: ``data.image_tokens``: ``source`` (``cache`` | ``online``), ``dvae_input_size``,
            ``cache`` (tokens .npy), ``cache_crop``, ``weights`` (dVAE file, checked against the cache),
            ``vocab_size`` (checked), ``block_mask`` (kwargs of :class:`BlockMaskGenerator` without the
            grid, or null for no patch masks).
        train_transform: ``data.train_transform`` (``scale``, ``hflip``; ``ratio`` optional).
        pair_options: passed to :class:`ImageTextPairs` (``noise_rate``, ``noise_seed``).
    """
    cfg = dict(image_tokens)
    source = cfg.get("source", "online")
    dvae_size = cfg.get("dvae_input_size")
    cache = None
    if source == "cache":
        grid = dvae_size // DOWNSAMPLE if dvae_size else None
        cache = TokenCache(cfg["cache"], manifest=manifest, weights=cfg.get("weights"), num_images=len(entries),
                           grid=grid, vocab_size=cfg.get("vocab_size"), dvae_input_size=dvae_size)
        dvae_size = int(cache.meta["dvae_input_size"])  # anything else is the online path (config_checks)
    generator = block_mask_generator(dvae_size, cfg.get("block_mask"))
    return ImageTextTokenPairs(
        entries,
        image_size,
        dvae_size,
        seed=seed,
        **crop_args(train_transform),
        token_cache=cache,
        cache_crop=cfg.get("cache_crop"),
        mask_generator=generator,
        **pair_options,
    )


def crop_args(train_transform: dict | None) -> dict:
    """``scale``, ``ratio``, ``hflip`` of the online views from ``data.train_transform`` (both paths read them here)."""
    transform = dict(train_transform or {})
    return {
        "scale": transform.get("scale", (0.5, 1.0)),
        "ratio": transform.get("ratio", DEFAULT_RATIO),
        "hflip": transform.get("hflip", 0.0),
    }


def block_mask_generator(dvae_input_size: int, block_mask: dict | None) -> BlockMaskGenerator | None:
    """``data.image_tokens.block_mask`` over the token grid of ``dvae_input_size``, or None."""
    return BlockMaskGenerator(dvae_input_size // DOWNSAMPLE, **dict(block_mask)) if block_mask is not None else None


def build_online_views(image_size: int, image_tokens: dict, train_transform: dict | None = None) -> OnlineViews:
    """The shard path's :class:`OnlineViews` from ``data.image_tokens`` (``source: online``) and
    ``data.train_transform``: the same crops, flips and masks as :func:`build_token_pairs` gives the
    manifest path."""
    cfg = dict(image_tokens)
    if cfg.get("source", "online") != "online":
        raise ValueError("data.image_tokens.source must be online with data.train_shards: a token cache is indexed "
                         "by the rows of a manifest")
    dvae_size = int(cfg["dvae_input_size"])
    return OnlineViews(image_size, dvae_size, **crop_args(train_transform),
                       mask_generator=block_mask_generator(dvae_size, cfg.get("block_mask")))
