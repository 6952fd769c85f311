"""Where each query's ground truth ranks, both ways, from one pass over the image-caption score matrix.

The (N x M) matrix of image-caption scores is cut into tiles of ``rows`` images x ``TILE_COLUMNS`` captions.
Each tile is one ``torch.mm`` into a reused buffer, and serves both directions before the next one overwrites
it: along its rows, the captions above / equal to each image's best ground-truth score
(image->text); along its columns, the images above / equal to each caption's ground-truth score
(text->image). So the pass costs one matrix product, not one per direction, and the whole matrix never exists.

Thresholds first. A query's threshold is needed before its first tile, so the ground-truth scores are
computed before the pass by products of the very shape of a tile (a block of images against its blocks'
captions, padded to ``TILE_COLUMNS``). Every tile has that one shape (the last block of images and the last
tile of captions overlap their predecessors instead of being narrower, and count only what is new), so every
score is computed by the same kernel wherever it is computed, in one process or split across ranks. Each
ground-truth score is read again from its tile during the pass; if any differs from the threshold that was
used, the pass is repeated with the tiles' values (:func:`same_scores`; never seen with MKL here).

Workers. On the CPU a process splits its blocks between threads exactly as ranks split them (contiguous
shares; image-side counts side by side, caption-side counts summed), and every product runs on one thread:
independent workers lose less than a fork-join per tile when other jobs share the cores, and a product is the
same single-threaded kernel in one process, in several workers or on several ranks.

Counting skips what cannot change the result (CPU; on other devices every entry is compared, to avoid a host
sync per tile): a tile row whose maximum is below the image's threshold adds nothing to it, likewise a
column, and with ``limit`` a query whose ``better`` count reached ``limit`` stops counting (R@K for
K <= limit only needs ``better`` exact below ``limit``; such a query is reported as ``better=limit,
tied=0``, the same whatever the tiling or the number of ranks). So beyond the product a tile costs two
reductions (its row and column maxima) and a few O(rows + columns) operations.

METHOD §8. The split across ranks (collectives): :func:`cots.metrics.retrieval.ranks_both_ways`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cots.distributed import share

# Tile shape, measured on a 2-core Xeon (bench/retrieval_speed.py --part tiles): 1024 x 2048 fp32 (8 MB) per
# worker amortises the packing of the caption block over many images while the tile's maxima still read fast.
TILE_COLUMNS = 2048  # captions per tile
TILE_ROWS = 1024  # images per tile at most


@dataclass
class QueryRanks:
    """Where each query's ground truth stands among its candidates, ties kept apart.

    ``better``: candidates that are not ground truth and score strictly above the best ground truth.
    ``tied``: candidates that are not ground truth and score exactly as the best ground truth.
    ``positives``: ground-truth candidates at that best score (1 for t2i; 0 when a query has no
    ground truth or its score is not finite, which counts as never found).
    All (Q,) long. A tie never favours the ground truth: recall is the expectation over a random
    order of the tied candidates (:func:`hit_probability`), so a collapsed model scores chance level.
    Counted with a ``limit``, a query with ``better >= limit`` holds ``better=limit, tied=0``.
    """

    better: torch.Tensor
    tied: torch.Tensor
    positives: torch.Tensor

    @classmethod
    def cat(cls, parts: list[QueryRanks], device: torch.device | None = None) -> QueryRanks:
        if not parts:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return cls(empty, empty, empty)
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("better", "tied", "positives")))

    @classmethod
    def from_counts(cls, above: torch.Tensor, equal: torch.Tensor, positives: torch.Tensor, limit: int | None):
        """From the candidates above / equal to the threshold (ground truths at the threshold among ``equal``)."""
        better, tied = above, equal - positives
        if limit is not None:
            done = better >= limit
            better, tied = better.masked_fill(done, limit), tied.masked_fill(done, 0)
        return cls(better, tied, positives)

    def __len__(self) -> int:
        return self.better.shape[0]


def hit_probability(ranks: QueryRanks, k: int) -> torch.Tensor:
    """P(a ground truth is among the top ``k``) per query, tied candidates in random order: (Q,) float64.

    The ``tied`` negatives and ``positives`` ground truths share ``k - better`` remaining places;
    a miss means the first ``k - better`` of the tied block are all negatives:
    prod_{i < k - better} (tied - i) / (tied + positives - i).
    """
    slots = (k - ranks.better).clamp_min(0)
    tied, positives = ranks.tied.double(), ranks.positives.double()
    miss = torch.ones_like(tied)
    for i in range(k):
        factor = (tied - i).clamp_min(0) / (tied + positives - i).clamp_min(1)
        miss = torch.where(slots > i, miss * factor, miss)
    return torch.where(ranks.positives > 0, 1.0 - miss, torch.zeros_like(miss))


def same_scores(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as comparisons see them (NaN matches NaN)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def block_starts(total: int, size: int) -> list[int]:
    """Starts of the blocks of ``size`` (<= total) that cover 0..total: the last one ends at ``total``,
    overlapping its predecessor rather than being shorter, so that every block has the same size."""
    if total <= size:
        return [0]
    return [*range(0, total - size, size), total - size]


@dataclass(frozen=True)
class Tiling:
    """The tiles of an (images x captions) score matrix: every tile is ``rows`` x ``columns``."""

    rows: int
    columns: int
    row_starts: list[int]
    column_starts: list[int]

    @classmethod
    def of(cls, num_images: int, num_captions: int, rows: int, columns: int | None = None) -> Tiling:
        rows = max(1, min(rows, num_images))
        columns = max(1, min(columns or TILE_COLUMNS, num_captions))
        return cls(rows, columns, block_starts(num_images, rows), block_starts(num_captions, columns))

    @property
    def num_blocks(self) -> int:
        """Blocks of images (rows of tiles)."""
        return len(self.row_starts)

    def new_rows(self, block: int) -> tuple[int, int]:
        """(start, stop) of the images that block ``block`` counts: those no earlier block counted."""
        start = self.row_starts[block]
        first = start if block == 0 else self.row_starts[block - 1] + self.rows
        return first, start + self.rows

    def new_columns(self, tile: int) -> tuple[int, int]:
        """(start, stop) of the captions that tile ``tile`` of a block counts."""
        start = self.column_starts[tile]
        first = start if tile == 0 else self.column_starts[tile - 1] + self.columns
        return first, start + self.columns


class TwoWayPass:
    """Counts, over the blocks ``blocks`` of images (a contiguous range), the candidates above and equal to
    each query's threshold, both ways.

    Args:
        images: (N, D) image embeddings; texts: (M, D) caption embeddings (same dtype and device).
        text_to_image: (M,) long, the image of each caption.
        tiling: :meth:`Tiling.of` (N, M, rows).
        blocks: the blocks of images this pass scores (one rank's share); None: all.
        limit: stop counting a query once ``better`` reaches it (None: exact counts).
        workers: threads that share the blocks as ranks do (:func:`worker_count`).

    Use: :meth:`ground_truth` (the scores of this pass's own pairs), :meth:`set_thresholds` with the scores of
    all M pairs, then :meth:`run`. Then ``row_counts`` (R, 2) holds above / equal for the R images of the
    blocks, ``column_counts`` (M, 2) the same for every caption among these images only (sum them over a
    split), and ``observed`` the own pairs' scores as their tiles gave them. Pairs are the M (image, caption)
    ground truths in image order (``pair_image``, ``pair_text``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        text_to_image: torch.Tensor,
        tiling: Tiling,
        blocks: range | None = None,
        limit: int | None = None,
        workers: int = 1,
    ) -> None:
        self.images, self.texts, self.tiling, self.limit = images.contiguous(), texts.contiguous(), tiling, limit
        self.blocks = range(tiling.num_blocks) if blocks is None else blocks
        self.workers = max(1, min(workers, len(self.blocks)))
        self.num_texts = texts.shape[0]
        device = texts.device
        self.pair_text = torch.argsort(text_to_image, stable=True)  # M: captions grouped by image
        self.pair_image = text_to_image[self.pair_text]  # M, sorted
        if len(self.blocks):
            self.row_lo, self.row_hi = tiling.new_rows(self.blocks[0])[0], tiling.new_rows(self.blocks[-1])[1]
        else:
            self.row_lo = self.row_hi = 0
        # the own pairs (of images row_lo..row_hi) of the i-th block start at pair_bounds[i]
        firsts = [tiling.new_rows(b)[0] for b in self.blocks] + [self.row_hi]
        bounds = torch.tensor(firsts, dtype=self.pair_image.dtype, device=device)
        self.pair_bounds = torch.searchsorted(self.pair_image, bounds).tolist()  # host sync, once
        self.pair_lo, self.pair_hi = self.pair_bounds[0], self.pair_bounds[-1]
        # where the new columns of each tile start, and the end: cuts the pairs of a block by tile
        column_firsts = [tiling.new_columns(t)[0] for t in range(len(tiling.column_starts))] + [self.num_texts]
        self.column_firsts = torch.tensor(column_firsts, dtype=self.pair_text.dtype, device=device)
        self.row_counts = torch.zeros(self.row_hi - self.row_lo, 2, dtype=torch.long, device=device)
        self.column_counts = torch.zeros(self.num_texts, 2, dtype=torch.long, device=device)
        self.observed = texts.new_empty(self.pair_hi - self.pair_lo)
        self.sparse = device.type == "cpu"  # skip lines by their maxima (a host sync per tile)

    # -- thresholds ------------------------------------------------------------------------------------------
    def ground_truth(self) -> torch.Tensor:
        """Scores of the own pairs, in pair order: (pair_hi - pair_lo,), by tile-shaped products."""
        scores = self.observed.new_empty(self.pair_hi - self.pair_lo)
        tile = self.texts.new_empty(self.tiling.rows, self.tiling.columns)
        padded = self.texts.new_zeros(self.tiling.columns, self.texts.shape[1])  # w x D
        with one_thread_per_product(self.images):
            for i, block in enumerate(self.blocks):
                start = self.tiling.row_starts[block]
                queries = self.images[start : start + self.tiling.rows]
                for p in range(self.pair_bounds[i], self.pair_bounds[i + 1], self.tiling.columns):
                    q = min(p + self.tiling.columns, self.pair_bounds[i + 1])
                    padded[: q - p] = self.texts[self.pair_text[p:q]]
                    torch.mm(queries, padded.t(), out=tile)  # r x w, like every tile
                    here = torch.arange(q - p, device=tile.device)
                    scores[p - self.pair_lo : q - self.pair_lo] = tile[self.pair_image[p:q] - start, here]
        return scores

    def set_thresholds(self, pair_scores: torch.Tensor) -> None:
        """Thresholds from the scores of all M pairs (pair order)."""
        own = pair_scores[self.pair_lo : self.pair_hi]
        rows = self.row_hi - self.row_lo
        local = self.pair_image[self.pair_lo : self.pair_hi] - self.row_lo
        best = torch.full((rows,), float("-inf"), dtype=own.dtype, device=own.device)
        best.scatter_reduce_(0, local, own, reduce="amax")  # an image's threshold: its best caption
        self.row_threshold = best
        self.row_positives = torch.zeros(rows, dtype=torch.long, device=own.device)
        self.row_positives.scatter_add_(0, local, (own == best[local]).long())  # its captions at that score
        self.column_threshold = torch.empty_like(pair_scores).scatter_(0, self.pair_text, pair_scores)  # M

    # -- the pass -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Counts every block; ``workers`` threads take contiguous shares of the blocks, as ranks do."""
        self.row_counts.zero_()
        shares = [range(*share(len(self.blocks), i, self.workers)) for i in range(self.workers)]
        columns = [self.column_counts] + [torch.zeros_like(self.column_counts) for _ in shares[1:]]
        with one_thread_per_product(self.images):
            if self.workers == 1:
                self._count(shares[0], columns[0])
            else:
                with ThreadPoolExecutor(self.workers) as pool:  # products and reductions release the GIL
                    for done in [pool.submit(self._count, sh, col) for sh, col in zip(shares, columns, strict=True)]:
                        done.result()
                for more in columns[1:]:
                    self.column_counts += more

    def _count(self, share: range, column_counts: torch.Tensor) -> None:
        """Counts the blocks ``self.blocks[i]`` for i in ``share``: rows into ``row_counts``, columns into
        ``column_counts`` (this worker's own)."""
        if self.workers > 1:
            torch.set_num_threads(1)  # this thread's own setting too (OpenMP keeps one per thread)
        column_counts.zero_()
        tile = self.texts.new_empty(self.tiling.rows, self.tiling.columns)  # every product is written here
        active_columns = torch.ones(self.num_texts, dtype=torch.bool, device=self.texts.device)
        column_open = [True] * len(self.tiling.column_starts)  # a tile with a column still counting (sparse)
        for i in share:
            self._count_block(i, tile, column_counts, active_columns, column_open)

    def _count_block(self, i, tile, column_counts, active_columns, column_open) -> None:
        tiling, limit, sparse = self.tiling, self.limit, self.sparse
        block = self.blocks[i]
        start = tiling.row_starts[block]
        first, stop = tiling.new_rows(block)
        queries = self.images[start : start + tiling.rows]
        rows = slice(first - self.row_lo, stop - self.row_lo)
        row_threshold, row_counts = self.row_threshold[rows], self.row_counts[rows]
        active_rows = torch.ones(stop - first, dtype=torch.bool, device=queries.device)
        rows_open = True
        # this block's own pairs by caption, cut at the tiles' first new columns
        pair_lo = self.pair_bounds[i]
        pair_text = self.pair_text[pair_lo : self.pair_bounds[i + 1]]
        order = torch.argsort(pair_text)
        cuts = torch.searchsorted(pair_text[order], self.column_firsts).tolist()  # host sync, once per block
        for t, column_start in enumerate(tiling.column_starts):
            torch.mm(queries, self.texts[column_start : column_start + tiling.columns].t(), out=tile)  # r x w
            if cuts[t + 1] > cuts[t]:  # the ground truths in this tile, as it scores them
                here = order[cuts[t] : cuts[t + 1]]
                pairs = here + pair_lo
                scores = tile[self.pair_image[pairs] - start, pair_text[here] - column_start]
                self.observed[pairs - self.pair_lo] = scores
            column_first, column_stop = tiling.new_columns(t)
            new = tile[first - start :, column_first - column_start :]  # rows x columns not counted before
            columns = slice(column_first, column_stop)
            if not sparse:
                _count_dense(new, row_threshold, row_counts, self.column_threshold[columns], column_counts[columns])
                continue
            if rows_open and _count_sparse(new, 1, row_threshold, row_counts, active_rows, limit):
                rows_open = bool(active_rows.any())
            active, threshold = active_columns[columns], self.column_threshold[columns]
            if column_open[t] and _count_sparse(new, 0, threshold, column_counts[columns], active, limit):
                column_open[t] = bool(active.any())


def worker_count(device: torch.device) -> int:
    """Threads for one pass: on the CPU one per torch thread, each product on one thread (independent workers
    stall less on a shared machine than a fork-join per tile); elsewhere one."""
    return torch.get_num_threads() if device.type == "cpu" else 1


@contextmanager
def one_thread_per_product(like: torch.Tensor):
    """On the CPU, torch (and MKL) on one thread inside: every product is the same single-threaded kernel
    whatever the number of workers or ranks. Restored on exit."""
    if like.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _count_sparse(
    scores: torch.Tensor, dim: int, threshold: torch.Tensor, counts: torch.Tensor, active: torch.Tensor, limit
) -> bool:
    """Adds to ``counts`` (n, 2) the entries of ``scores`` above / equal to ``threshold`` (n,) along ``dim``
    (1: per row, 0: per column), for the ``active`` lines whose maximum reaches the threshold; with ``limit`` a
    line whose count reaches it turns inactive. Returns whether anything was counted."""
    need = ~(scores.amax(dim) < threshold)  # a NaN maximum is counted
    need &= active
    index = need.nonzero()[:, 0]  # host sync
    if index.shape[0] == 0:
        return False
    some = index.shape[0] < need.shape[0]
    if some:
        scores, threshold = scores.index_select(1 - dim, index), threshold[index]
    t = threshold.unsqueeze(dim)
    # int32 sums: a bool sum to int64 costs twice as much, and a tile's line holds far fewer than 2^31 entries
    found = torch.stack([(scores > t).sum(dim, dtype=torch.int32), (scores == t).sum(dim, dtype=torch.int32)], 1).long()
    if some:
        counts.index_add_(0, index, found)
    else:
        counts += found
    if limit is not None:
        active[index] = counts[index, 0] < limit
    return True


def _count_dense(
    scores: torch.Tensor,
    row_threshold: torch.Tensor,
    row_counts: torch.Tensor,
    column_threshold: torch.Tensor,
    column_counts: torch.Tensor,
) -> None:
    """Every entry compared both ways, no host sync (accelerators)."""
    rt, ct = row_threshold[:, None], column_threshold[None, :]
    row_counts += torch.stack([(scores > rt).sum(1), (scores == rt).sum(1)], 1)
    column_counts += torch.stack([(scores > ct).sum(0), (scores == ct).sum(0)], 1)
