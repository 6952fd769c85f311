"""Ring queues: wrap-around, order, and the fill count."""

from __future__ import annotations

import pytest
import torch

from cots.queues import PairedFeatureQueue, RingQueue


@pytest.mark.parametrize("size,batches", [(8, [3, 3, 3, 3]), (6, [4, 4, 4]), (5, [7]), (10, [1, 9, 2, 10, 3])])
def test_queue_holds_last_k_rows_in_order(size, batches):
    queue = RingQueue(size, (2,))
    stream = []
    counter = 0
    for n in batches:
        rows = torch.arange(counter, counter + n, dtype=torch.float32)[:, None].repeat(1, 2)
        counter += n
        stream.append(rows)
        queue.enqueue(rows)
        everything = torch.cat(stream)
        expected = everything[-size:]
        torch.testing.assert_close(queue.ordered(), expected)
        assert int(queue.filled) == min(len(everything), size)
        assert int(queue.valid_mask().sum()) == min(len(everything), size)


def test_paired_queue_keeps_rows_aligned_and_is_a_buffer():
    queue = PairedFeatureQueue(size=5, dim=3)
    for step in range(4):
        x = torch.full((2, 3), float(step))
        queue.enqueue(x, -x)
    torch.testing.assert_close(queue.image.ordered(), -queue.text.ordered())
    state = queue.state_dict()
    assert {"image.data", "image.ptr", "image.filled", "text.data"} <= set(state)
    restored = PairedFeatureQueue(size=5, dim=3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.image.ordered(), queue.image.ordered())
