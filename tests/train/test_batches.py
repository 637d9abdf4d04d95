"""Arranging an epoch's items into batches: label-grouped batches for hard negatives."""

from __future__ import annotations

import torch

from duomodal.train.batches import grouped_order


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
