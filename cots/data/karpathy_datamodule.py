"""The data module over a Karpathy split file: ``data=karpathy data.karpathy_json=... data.dataset=coco``."""

from __future__ import annotations

import warnings
from pathlib import Path

from cots.data.datamodule import ImageTextDataModule
from cots.data.karpathy import SPLITS, KarpathyError, read_karpathy_splits
from cots.data.manifest import ManifestEntry

# How each dataset's images sit under data.image_root, for the message when the first one is not found.
IMAGE_ROOT_HINTS = {
    "coco": "the folder holding train2014/ and val2014/ (the file's 'filepath' folders)",
    "flickr30k": "the folder of the JPEG files themselves, e.g. <flickr30k>/flickr30k-images",
    "flickr8k": "the folder of the JPEG files themselves",
}


class KarpathyDataModule(ImageTextDataModule):
    """:class:`ImageTextDataModule` whose train / val / test splits come from one Karpathy split file.

    Args:
        karpathy_json: ``dataset_coco.json``, ``dataset_flickr30k.json``, ... as Karpathy distributes them.
        dataset: ``coco``, ``flickr30k`` or ``flickr8k`` (checked against the file's ``dataset`` field).
        restval_in_train, captions_per_image: see :func:`cots.data.karpathy.read_karpathy_splits`.
        test_fold_size: COCO's test split is also scored as the mean over consecutive folds of this many images
            (the "COCO 1K" protocol: five folds of the 5K test); None turns it off; other datasets have none.
        train_manifest, val_manifest, test_manifest: a split whose manifest is ``karpathy_json`` (what
            ``conf/data/karpathy.yaml`` sets, and the default) is read from the Karpathy file; any other path is
            read as a manifest, e.g. ``cots-eval ... data.test_manifest=/d/other.json``.
        image_root: what the file's ``filepath / filename`` are relative to (default: the file's folder).
        **kwargs: the other :class:`ImageTextDataModule` arguments.
    """

    def __init__(
        self,
        karpathy_json: str,
        dataset: str,
        restval_in_train: bool = True,
        captions_per_image: int | None = 5,
        test_fold_size: int | None = 1000,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        image_root: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            train_manifest=train_manifest or karpathy_json,
            val_manifest=val_manifest or karpathy_json,
            test_manifest=test_manifest or karpathy_json,
            image_root=image_root,
            **kwargs,
        )
        self.karpathy_json = str(karpathy_json)
        self.dataset = dataset
        self.restval_in_train = restval_in_train
        self.captions_per_image = captions_per_image
        self.test_fold_size = test_fold_size

    def from_karpathy(self, split: str) -> bool:
        """Whether ``split`` is read from the Karpathy file (not from a manifest given for it)."""
        return split in SPLITS and str(self.manifests.get(split)) == self.karpathy_json

    def entries(self, split: str) -> list[ManifestEntry]:
        if not self.from_karpathy(split):
            return super().entries(split)
        if split not in self._entries:
            root = self.image_root or Path(self.karpathy_json).parent
            splits = read_karpathy_splits(
                self.karpathy_json, root, self.dataset, self.restval_in_train, self.captions_per_image
            )
            self._entries.update({name: items for name, items in splits.items() if self.from_karpathy(name)})
        return self._entries[split]

    def evaluation_fold_size(self, split: str) -> int | None:
        """COCO's Karpathy test: ``test_fold_size`` when it divides the gallery into two or more folds."""
        fold = self.test_fold_size
        if not (fold and split == "test" and self.dataset == "coco" and self.from_karpathy("test")):
            return None
        images = len(self.entries("test"))
        if images <= fold:  # one fold: the full table
            return None
        if images % fold:
            warnings.warn(
                f"the COCO test split has {images} images, not a multiple of data.test_fold_size={fold} "
                "(COCO 1K: five folds of the 5K test): no fold table",
                stacklevel=2,
            )
            return None
        return fold

    def missing_files(self) -> list[str]:
        """The manifest checks, then the Karpathy file's entries and the first image of each of its splits."""
        problems = super().missing_files()
        if problems or not any(self.from_karpathy(split) for split in SPLITS):
            return problems
        try:
            for split in SPLITS:
                if not self.from_karpathy(split):
                    continue
                entries = self.entries(split)
                if not entries:
                    problems.append(f"data.karpathy_json: {self.karpathy_json} has no {split} image")
                elif entries and not entries[0].image.is_file():
                    hint = IMAGE_ROOT_HINTS.get(self.dataset, "")
                    problems.append(
                        f"data.image_root: the first {split} image of {self.karpathy_json} is not at "
                        f"{entries[0].image} (data.image_root must be {hint})"
                    )
        except KarpathyError as err:
            problems.append(str(err))
        return problems
