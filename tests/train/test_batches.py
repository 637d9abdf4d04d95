"""Arranging an epoch's items into batches: label-grouped batches for hard negatives."""

from __future__ import annotations

import torch

from duomodal.train.batches import ValBatches, grouped_order


def test_grouped_order_keeps_every_index_and_groups_the_asked_share_of_batches():
    groups = [i % 4 for i in range(400)]  # 4 groups, interleaved
    indices = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    out = grouped_order(indices, groups, micro_batch=20, fraction=0.5, generator=torch.Generator().manual_seed(1))
    assert sorted(out) == list(range(400))
    batches = [out[i : i + 20] for i in range(0, 400, 20)]
    single = [b for b in batches if len({groups[i] for i in b}) == 1]
    # half of the 20 batches are cut from the grouped runs; where one group's run ends inside a batch, that
    # batch holds two groups (at most 3 such boundaries between 4 runs); the mixed half is never single-group
    assert 10 - 3 <= len(single) <= 10
    # the same generator seed gives the same order (a resumed epoch sees the same batches)
    again = grouped_order(indices, groups, 20, 0.5, torch.Generator().manual_seed(1))
    assert again == out
    assert grouped_order(indices, groups, 20, 0.0, torch.Generator().manual_seed(1)) == indices
    every = grouped_order(indices, groups, 20, 1.0, torch.Generator().manual_seed(1))
    assert all(len({groups[i] for i in every[k : k + 20]}) <= 2 for k in range(0, 400, 20))


class _Task:
    """A task's collate: stack the readable items."""

    @staticmethod
    def collate(items):
        return torch.stack(items)


def test_val_batches_count_the_items_they_leave_out():
    items = [None if i in (1, 2, 5) else torch.full((2,), float(i)) for i in range(8)]  # 3 unreadable
    batches = ValBatches(items, _Task(), batch_size=2, limit=0, device=torch.device("cpu"))
    seen = [batch[:, 0].tolist() for batch in batches]
    assert seen == [[0.0], [3.0], [4.0], [6.0, 7.0]]  # the batch of items 1 and 2 had nothing left
    assert batches.dropped == 3
    limited = ValBatches(items, _Task(), batch_size=2, limit=2, device=torch.device("cpu"))
    assert len(list(limited)) == 2 and limited.dropped == 2  # the first two batches only
