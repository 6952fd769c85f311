"""LightningDataModule over image-text manifests (JSON or CSV); imports no model code."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from cots.data.datasets import Collate, GalleryCaptions, GalleryImages, ImageTextPairs, check_pair_groups
from cots.data.decode import Decoder
from cots.data.images import build_eval_transform, build_train_transform
from cots.data.manifest import ManifestEntry, load_manifest
from cots.data.noise import write_noise_record
from cots.data.sampler import ShardedEpochSampler
from cots.data.shard_set import ShardSet, build_shard_set
from cots.data.shards import ShardError, ShardLoader, ShardPairs, shard_captions
from cots.data.sources import as_plain
from cots.data.synthetic import ensure_synthetic_dataset
from cots.data.text_tokenizer import TextTokenizer, build_text_tokenizer
from cots.data.token_cache import cache_paths
from cots.data.token_datasets import MVLMCollate, build_online_views, build_token_pairs
from cots.masking import TextMasker

log = logging.getLogger(__name__)


class ImageTextDataModule(L.LightningDataModule):
    """Training pairs and retrieval galleries.

    Args:
        train_manifest, val_manifest, test_manifest: JSON or CSV manifests (test optional).
        image_root: folder the image paths are relative to (default: each manifest's folder).
        image_size: side of the square crops fed to the image tower.
        batch_size: pairs per rank per step; eval_batch_size for galleries.
        num_workers: DataLoader workers per rank.
        seed: shuffling seed (same on every rank).
        train_transform: ``scale`` of the random resized crop and ``hflip`` probability.
        text_tokenizer: ``pretrained`` local dir, else WordPiece of ``vocab_size`` trained on the
            training captions; ``max_length`` tokens per caption.
        synthetic: when set, the synthetic shapes set is built under ``out_dir`` first.
        csv_columns: image and caption column names of CSV manifests.
        noise_rate: fraction of training pairs whose caption is swapped for another image's
            (to measure the AMF); ``noise_seed`` chooses them. The noisy pairs are written to
            ``<trainer.default_root_dir>/noisy_pairs.json``.
        image_tokens: dVAE targets of CMVM (METHOD §4), null for none: ``source`` (``cache`` | ``online``),
            ``dvae_input_size``, ``vocab_size``, ``weights``, ``cache`` / ``cache_crop`` (cache),
            ``random_dvae`` (online without weights), ``block_mask`` (BEiT mask of the patches);
            see :func:`cots.data.token_datasets.build_token_pairs`.
        text_mask: BERT masking of the captions for CMLM (``mask_prob``, ``replace_prob``,
            ``random_prob``), null for none.
        pair_groups: null (one positive per pair, METHOD §3), ``image`` (the captions of one image
            are positives of each other in L_inst: COCO's five) or ``caption`` (one caption text on
            several images, e.g. the emoji set's Google and Twitter renderings); see ``Collate``.
        train_shards: tar shards to train on instead of ``train_manifest``: a ``cots-data shards``
            folder, or WebDataset tars read in place (img2dataset output; folders, globs, brace
            lists, ``s3://`` / ``gs://`` / ``https://``), or a list of sources with mixing weights
            (:mod:`cots.data.sources`). ``shards_resampled``, ``samples_per_epoch``,
            ``shuffle_buffer``: see :class:`~cots.data.shards.ShardPairs`.
        train_shards_index: the ``cots-index.json`` file(s) written by ``cots-data index-shards
            --out`` (null: the one beside each shard).
        members: which tar members are the image (extensions in order) and the caption (``txt``
            or ``json:<field>``); a source may set its own.
        shard_block_size: bytes per range request of remote shards (null: 1 MiB).
        decoder: how shard images are decoded: ``pillow`` (as the manifest path), ``simplejpeg`` or
            ``torchvision`` (:mod:`cots.data.decode`); ``jpeg_reduce``: decode large JPEGs at 1/2, 1/4, 1/8.
        length_buckets: 0, or global batches per bucket of the manifest path's training order: each
            batch then holds captions of similar token length, so that it pads less
            (:func:`cots.data.sampler.group_by_length`).
    """

    def __init__(
        self,
        train_manifest: str,
        val_manifest: str,
        test_manifest: str | None = None,
        image_root: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 4,
        seed: int = 0,
        train_transform: dict | None = None,
        text_tokenizer: dict | None = None,
        synthetic: dict | None = None,
        csv_columns: dict | None = None,
        noise_rate: float = 0.0,
        noise_seed: int = 0,
        image_tokens: dict | None = None,
        text_mask: dict | None = None,
        train_shards: str | None = None,
        shards_resampled: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        pair_groups: str | None = None,
        train_shards_index: str | list | None = None,
        members: dict | None = None,
        shard_block_size: int | None = None,
        decoder: str = "pillow",
        jpeg_reduce: bool = False,
        length_buckets: int = 0,
    ) -> None:
        super().__init__()
        self.manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        self.image_root = image_root
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_transform_args = dict(train_transform or {})
        self.text_tokenizer_args = {"pretrained": None, "vocab_size": 8000, "max_length": 64, **(text_tokenizer or {})}
        self.synthetic = dict(synthetic) if synthetic else None
        self.csv_columns = dict(csv_columns or {})
        self.noise_rate, self.noise_seed = noise_rate, noise_seed
        self.image_tokens = dict(image_tokens) if image_tokens else None
        self.text_mask = dict(text_mask) if text_mask else None
        self.text_tokenizer: TextTokenizer | None = None
        self._entries: dict[str, list[ManifestEntry]] = {}
        self.train_set: ImageTextPairs | None = None
        self.train_sampler: ShardedEpochSampler | None = None
        self.train_shards = as_plain(train_shards) or None
        self.train_shards_index = as_plain(train_shards_index) or None
        self.members = as_plain(members)
        self.shard_args = {
            "resampled": shards_resampled,
            "samples_per_epoch": samples_per_epoch,
            "shuffle_buffer": shuffle_buffer,
            "block_size": shard_block_size,
        }
        self._shard_set: ShardSet | None = None
        min_scale = float(self.train_transform_args.get("scale", (0.5, 1.0))[0])
        self.decoder = Decoder(decoder, (image_size, min_scale) if jpeg_reduce else None)
        self.train_stream: ShardPairs | None = None
        self._resume_state: dict | None = None
        check_pair_groups(pair_groups)  # now, not at the first batch
        if length_buckets < 0:
            raise ValueError(f"data.length_buckets must be 0 (off) or a number of global batches, got {length_buckets}")
        self.length_buckets = length_buckets
        self.pair_groups = pair_groups

    # -- preparation (idempotent; safe to call from every rank) --------------------------
    def prepare_data(self) -> None:
        if self.synthetic:
            ensure_synthetic_dataset(**self.synthetic)

    def entries(self, split: str) -> list[ManifestEntry]:
        """Entries of a split ('train', 'val', 'test') or of any other manifest path."""
        if split not in self._entries:
            path = self.manifests.get(split, split)
            if not path:
                raise ValueError(f"data.{split}_manifest is not set")
            root = self.image_root
            self._entries[split] = load_manifest(path, root, **self.csv_columns)
        return self._entries[split]

    def build_text_tokenizer(self, serialized: str | None = None) -> TextTokenizer:
        """The caption tokenizer: from a checkpoint's JSON string, a local dir, or trained on train captions."""
        if self.text_tokenizer is None:
            max_length = self.text_tokenizer_args["max_length"]
            if serialized:
                self.text_tokenizer = TextTokenizer.from_str(serialized, max_length)
            else:
                captions = None
                if not self.text_tokenizer_args["pretrained"]:  # the same captions in the same order on both paths
                    captions = shard_captions(self.shard_set()) if self.train_shards else self._train_pairs().captions()
                self.text_tokenizer = build_text_tokenizer(
                    self.text_tokenizer_args["pretrained"], captions, self.text_tokenizer_args["vocab_size"], max_length
                )
        return self.text_tokenizer

    def shard_set(self) -> ShardSet:
        """The training shards with their counts, checked against their index (built once)."""
        if self._shard_set is None:
            self._shard_set = build_shard_set(self.train_shards, self.members, self.train_shards_index)
            log.info("training shards: %s", self._shard_set.summary())
        return self._shard_set

    def _train_pairs(self) -> ImageTextPairs:
        if self.train_set is None:
            noise = {"noise_rate": self.noise_rate, "noise_seed": self.noise_seed}
            if self.image_tokens:
                self.train_set = build_token_pairs(self.entries("train"), self.image_size, self.seed, self.image_tokens,
                                                   self.train_transform_args, self.manifests["train"], **noise)
            else:
                transform = build_train_transform(self.image_size, **self.train_transform_args)
                self.train_set = ImageTextPairs(self.entries("train"), transform, self.seed, **noise)
        return self.train_set

    def _train_collate(self) -> Collate:
        """Plain collate, or with the MVLM fields (tokens, dVAE views, patch masks, masked captions)."""
        tokenizer = self.build_text_tokenizer()
        if not (self.image_tokens or self.text_mask):
            return Collate(tokenizer, self.pair_groups)
        masker = TextMasker.from_tokenizer(tokenizer, **self.text_mask) if self.text_mask else None
        return MVLMCollate(tokenizer, masker, self.pair_groups)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.build_text_tokenizer()
        trainer = getattr(self, "trainer", None)
        if self.noise_rate > 0 and stage in ("fit", None) and trainer is not None and trainer.is_global_zero:
            pairs = self._train_pairs()
            path = Path(trainer.default_root_dir) / "noisy_pairs.json"
            write_noise_record(path, pairs.noise_source, self.noise_rate, self.noise_seed)

    # -- loaders ---------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset, batch_size: int, sampler=None, drop_last: bool = False, collate_fn=None) -> DataLoader:
        # Its own generator: creating an iterator must not consume the global RNG (exact resume).
        return DataLoader(
            dataset,
            generator=torch.Generator().manual_seed(self.seed),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn or Collate(self.build_text_tokenizer()),
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_shards:
            return self._shard_loader()
        pairs = self._train_pairs()
        rank, world = self._rank_world()
        lengths = self.build_text_tokenizer().lengths(pairs.captions()) if self.length_buckets > 1 else None
        self.train_sampler = ShardedEpochSampler(
            len(pairs), rank, world, shuffle=True, seed=self.seed, batch_size=self.batch_size,
            lengths=lengths, length_buckets=self.length_buckets,
        )
        if self._resume_state:
            self.train_sampler.resume_from(self._resume_state["epoch"], self._resume_state["consumed"])
            self._resume_state = None
        # drop_last: every rank must gather equal batch sizes.
        return self._loader(pairs, self.batch_size, self.train_sampler, drop_last=True, collate_fn=self._train_collate())

    def _shard_loader(self) -> ShardLoader:
        """Streaming tar shards: every rank gets the same number of whole batches per epoch."""
        rank, world = self._rank_world()
        transform = build_train_transform(self.image_size, **self.train_transform_args)
        # the token level (online dVAE targets): the manifest path's crops, dVAE views and patch masks
        views = build_online_views(self.image_size, self.image_tokens, self.train_transform_args) if self.image_tokens else None
        self.train_stream = ShardPairs(
            self.shard_set(), transform, rank, world, self.seed, self.batch_size, **self.shard_args, decoder=self.decoder,
            views=views,
        )
        if self._resume_state:
            self.train_stream.resume_from(self._resume_state["epoch"], self._resume_state["consumed"])
            self._resume_state = None
        trainer = self.trainer
        return ShardLoader(
            self.train_stream, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, collate_fn=self._train_collate(),
            generator=torch.Generator().manual_seed(self.seed),
            epoch=lambda: trainer.fit_loop.epoch_progress.current.processed,  # what Lightning gives samplers
        )

    # -- data position in checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict:
        """Epoch and samples of this epoch already trained on (per rank), saved by Lightning."""
        trainer = getattr(self, "trainer", None)
        position = self.train_stream or self.train_sampler
        if trainer is None or position is None:
            return {}
        # Batches whose training step ran in the epoch being consumed (exact, unlike counting
        # what the sampler handed out, which includes prefetched batches).
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = {"epoch": position.epoch, "consumed": batches * self.batch_size}
        if self.train_stream is not None:
            state["shards"] = self.shard_set().fingerprint()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        saved = state.get("shards")
        if saved and self.train_shards and saved != self.shard_set().fingerprint():
            log.warning(
                "the training shards (sources, shard lists, counts or weights) differ from the checkpoint's: "
                "the run continues at the same epoch and position, but not with the same samples"
            )
        position = self.train_stream or self.train_sampler
        if position is not None:  # the loader already exists: tell it
            position.resume_from(state["epoch"], state["consumed"])
        else:
            self._resume_state = dict(state)

    def gallery_loaders(self, split: str) -> list[DataLoader]:
        """[images, captions] loaders of a retrieval split or manifest path (each rank reads the whole gallery)."""
        entries = self.entries(split)
        images = GalleryImages(entries, build_eval_transform(self.image_size), self.image_size)
        return [self._loader(images, self.eval_batch_size), self._loader(GalleryCaptions(entries), self.eval_batch_size)]

    def gallery_captions(self, split: str) -> GalleryCaptions:
        return GalleryCaptions(self.entries(split))

    def evaluation_fold_size(self, split: str) -> int | None:
        """Images per fold when ``split`` is also scored as a mean over folds (COCO 1K); None: no folds."""
        return None

    def val_dataloader(self) -> list[DataLoader]:
        return self.gallery_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self.gallery_loaders("test" if self.manifests["test"] else "val")

    def missing_files(self) -> list[str]:
        """Config keys whose manifest or image root does not exist (checked before training)."""
        problems = []
        for split, path in self.manifests.items():
            if split == "train" and self.train_shards:
                continue
            if path and not Path(path).is_file():
                problems.append(f"data.{split}_manifest: file not found: {path}")
        if self.image_root and not Path(self.image_root).is_dir():
            problems.append(f"data.image_root: directory not found: {self.image_root}")
        if self.train_shards:
            try:
                self.shard_set()
            except (ShardError, OSError) as err:  # OSError: a remote store that cannot be reached
                problems.append(f"data.train_shards: {err}")
            if self.noise_rate > 0:
                problems.append("data.noise_rate: not supported with data.train_shards")
            if self.length_buckets > 1:
                problems.append("data.length_buckets: a shard stream has no epoch order to regroup; "
                                "only with data.train_manifest")
            if self.image_tokens and self.image_tokens.get("source", "online") != "online":
                problems.append("data.image_tokens.source: a token cache is indexed by the rows of a manifest; with "
                                "data.train_shards the dVAE tokenizes each crop in the step (source=online)")
        if self.shard_args["samples_per_epoch"] and not self.shard_args["resampled"]:
            problems.append("data.samples_per_epoch: only with data.shards_resampled=true")
        tokens = self.image_tokens or {}
        weights = tokens.get("weights")
        if weights and not Path(weights).is_file():
            problems.append(f"data.image_tokens.weights: file not found: {weights} (train one: `cots-dvae "
                            f"train --manifest {self.manifests['train']} --vocab-size {tokens.get('vocab_size')} "
                            f"--input-size {tokens.get('dvae_input_size')} --out {weights}`, as `make train-mvlm` does "
                            f"for the emoji dVAE; official DALL-E weights: `cots-dvae convert --pkl encoder.pkl "
                            f"--out {weights}`)")
        if tokens.get("source") == "cache" and tokens.get("cache") and not self.train_shards:
            if not all(path.is_file() for path in cache_paths(tokens["cache"])):
                problems.append(f"data.image_tokens.cache: token cache not found or incomplete: {tokens['cache']} "
                                f"(build it with `cots-dvae cache --manifest {self.manifests['train']} ... "
                                f"--out {tokens['cache']}`)")
        return problems
