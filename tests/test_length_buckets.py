"""Length-bucketed training batches: the same samples per epoch, less padding, DDP and resume unchanged."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from cots.data.sampler import ShardedEpochSampler, group_by_length

LENGTHS = torch.randint(3, 22, (640,), generator=torch.Generator().manual_seed(0))  # tokens per caption


def padded_tokens(order: torch.Tensor, batch: int) -> int:
    """Tokens the text tower runs on when each batch pads to its longest caption."""
    return sum(int(LENGTHS[b].max()) * len(b) for b in order.split(batch))


def test_buckets_keep_every_sample_and_cut_the_padding() -> None:
    order = torch.randperm(640, generator=torch.Generator().manual_seed(1))
    grouped = group_by_length(order, LENGTHS, 32, 8, torch.Generator().manual_seed(2))
    assert sorted(grouped.tolist()) == sorted(order.tolist())
    assert padded_tokens(grouped, 32) < 0.75 * padded_tokens(order, 32)
    for batch in grouped.split(32):  # a batch is a 32-aligned slice of its bucket's sorted lengths
        bucket = next(b for b in order.split(256) if set(batch.tolist()) <= set(b.tolist()))
        lengths = sorted(LENGTHS[bucket].tolist())
        assert sorted(LENGTHS[batch].tolist()) in [lengths[s : s + 32] for s in range(0, len(lengths), 32)]
    # the batches are shuffled, not served shortest first in each bucket
    maxima = [int(LENGTHS[b].max()) for b in grouped.split(32)]
    assert maxima != sorted(maxima)
    # one batch per bucket, or 1: the order as it was
    assert torch.equal(group_by_length(order, LENGTHS, 32, 1, torch.Generator()), order)
    with pytest.raises(ValueError, match="whole number of global batches"):
        group_by_length(order[:100], LENGTHS, 32, 8, torch.Generator())


def epoch(sampler: ShardedEpochSampler, epoch_index: int) -> list[int]:
    sampler.set_epoch(epoch_index)
    return [index for index, _ in sampler]


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_together_see_the_single_process_batches_and_resume_mid_epoch(world: int) -> None:
    single = ShardedEpochSampler(640, seed=3, batch_size=32, lengths=LENGTHS.tolist(), length_buckets=4)
    ranks = [
        ShardedEpochSampler(640, r, world, seed=3, batch_size=32 // world, lengths=LENGTHS.tolist(), length_buckets=4)
        for r in range(world)
    ]
    for e in (0, 1):
        whole = epoch(single, e)
        shares = [epoch(s, e) for s in ranks]
        per_rank = 32 // world
        gathered = [i for step in range(20) for share in shares for i in share[step * per_rank : (step + 1) * per_rank]]
        assert gathered == whole  # DDP's global batches are the single process's, in order
        plain = ShardedEpochSampler(640, seed=3, batch_size=32)
        assert sorted(whole) == sorted(epoch(plain, e)) and whole != epoch(plain, e)
        assert padded_tokens(torch.tensor(whole), 32) < 0.85 * padded_tokens(torch.tensor(epoch(plain, e)), 32)
    assert epoch(single, 0) != epoch(single, 1)  # a new grouping every epoch
    skip = 5 * (32 // world)
    ranks[0].resume_from(1, skip)
    assert [i for i, _ in ranks[0]] == epoch(ranks[0], 1)[skip:]
    with pytest.raises(ValueError, match="caption length of each of the 640 samples"):
        ShardedEpochSampler(640, batch_size=32, lengths=LENGTHS[:10].tolist(), length_buckets=4)


def test_datamodule_batches_pad_less_with_length_buckets(make_cfg) -> None:
    widths, seen = {}, {}
    for buckets, noise in ((0, 0.0), (4, 0.0), (4, 0.5)):
        datamodule = instantiate(make_cfg(f"data.length_buckets={buckets}", f"data.noise_rate={noise}").data)
        datamodule.setup("fit")
        batches = list(datamodule.train_dataloader())
        captions = datamodule.train_set.captions()  # after the noise's caption swaps
        lengths = torch.tensor(datamodule.text_tokenizer.lengths(captions))
        assert lengths.tolist() == datamodule.text_tokenizer.lengths(captions, chunk=7)
        assert len(set(lengths.tolist())) > 1  # the synthetic captions differ in length
        seen[buckets, noise] = sorted(torch.cat([b["index"] for b in batches]).tolist())
        widths[buckets, noise] = sum(b["attention_mask"].numel() for b in batches)
        for b in batches:  # the mask is each caption's tokens, padded to the batch's longest
            assert torch.equal(b["attention_mask"].sum(1), lengths[b["index"]])
    assert seen[4, 0.0] == seen[0, 0.0]  # the same pairs in the epoch
    assert widths[4, 0.0] < widths[0, 0.0]
    with pytest.raises(InstantiationException, match="data.length_buckets must be 0"):
        instantiate(make_cfg("data.length_buckets=-1").data)
    shards = instantiate(make_cfg("data.length_buckets=4", "data.train_shards=/nonexistent/shards").data)
    assert any(p.startswith("data.length_buckets: a shard stream") for p in shards.missing_files())
