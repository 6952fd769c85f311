"""Retrieval scored across two CPU processes (gloo) equals one process, float for float.

Each rank scores a share of the blocks of images against every caption; the image-side counts are gathered
and the caption-side counts summed (``retrieval_metrics(..., across_ranks=True)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import open_dict

from cots.metrics.retrieval import retrieval_metrics
from cots.train import build_module

CHUNKS = (None, 1, 4, 7)  # None: one block (rank 1 scores nothing); 1 and 4: shares of unequal size


def galleries() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Odd sizes, 1-5 captions per image (shuffled), near-exact and exact ties, a collapsed model."""
    gen = torch.Generator().manual_seed(0)
    n_img = 37
    text_to_image = torch.arange(n_img).repeat_interleave(torch.randint(1, 6, (n_img,), generator=gen))
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    images = torch.nn.functional.normalize(torch.randn(n_img, 16, generator=gen), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(len(text_to_image), 16, generator=gen), dim=1)
    grid_images = torch.randint(-1, 2, (n_img, 3), generator=gen).float()  # scores on a grid: many ties
    grid_texts = torch.randint(-1, 2, (len(text_to_image), 3), generator=gen).float() + grid_images[text_to_image]
    return {
        "random": (images, texts + 0.7 * images[text_to_image], text_to_image),
        "ties": (grid_images, grid_texts, text_to_image),
        "collapsed": (torch.ones(n_img, 4), torch.ones(len(text_to_image), 4), text_to_image),
    }


def tables() -> dict[str, dict[str, float]]:
    return {
        f"{name} chunk={chunk}": retrieval_metrics(images, texts, text_to_image, chunk, across_ranks=True)
        for name, (images, texts, text_to_image) in galleries().items()
        for chunk in CHUNKS
    }


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(tables()))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_table_of_one(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = tables()  # no process group: one process scores everything
    assert len(single) == len(galleries()) * len(CHUNKS)
    for rank in (0, 1):
        split = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert split == single  # exactly equal floats, tie-aware expectations included
    assert single["collapsed chunk=4"]["t2i_r1"] == pytest.approx(100 / 37)  # chance, not 100


class RecordGallery(L.Callback):
    """Each rank writes the gallery it scored and the table it got to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.gallery: dict[str, torch.Tensor] = {}

    def on_validation_epoch_end(self, trainer, module) -> None:  # before the module's hook consumes the gallery
        self.gallery = {key: torch.cat(module._gallery[key]) for key in ("images", "texts", "text_to_image")}

    def on_validation_end(self, trainer, module) -> None:
        record = {"gallery": self.gallery, "table": dict(module.last_retrieval), "world": trainer.world_size}
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_validation_scores_a_share_per_rank_and_equals_one_process(make_cfg, tmp_path):
    """The 2-process CPU run (trainer=ddp_spawn_cpu): both ranks report the table one process computes from the
    same gallery (an odd number of images in blocks of 5, so that the ranks' shares differ)."""
    cfg = make_cfg("trainer=ddp_spawn_cpu", "module.eval_chunk_size=5", "data.synthetic.num_val=63")
    data = instantiate(cfg.data)
    data.prepare_data()
    tokenizer = data.build_text_tokenizer(None)
    module = build_module(cfg, tokenizer.vocab_size, tokenizer.to_str(), tokenizer.mask_id, tokenizer.special_ids)
    with open_dict(cfg):
        cfg.trainer.logger = False
        cfg.trainer.enable_checkpointing = False
    trainer = instantiate(cfg.trainer, callbacks=[RecordGallery(str(tmp_path))])
    trainer.validate(module, datamodule=data, verbose=False)
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert records[0]["world"] == 2
    gallery = records[0]["gallery"]
    assert gallery["images"].shape[0] == 63 and gallery["texts"].shape[0] > 63
    for key, value in gallery.items():
        assert torch.equal(records[1]["gallery"][key], value), key  # every rank holds the whole gallery
    single = retrieval_metrics(gallery["images"], gallery["texts"], gallery["text_to_image"], chunk_size=5)
    assert records[0]["table"] == records[1]["table"] == single
