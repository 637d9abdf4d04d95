"""torchrun's environment read once (duomodal.launch), as training, indexing and the CLI see it."""

from __future__ import annotations

import pytest

from duomodal.device import resolve_device
from duomodal.launch import LaunchInfo, launch_info


def test_outside_torchrun_a_process_is_rank_0_of_1():
    assert launch_info({}) == LaunchInfo(rank=0, world_size=1, local_rank=0)
    assert launch_info({}).is_main and not launch_info({}).distributed


def test_torchrun_variables_give_rank_world_size_and_local_rank():
    info = launch_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert info.distributed and not info.is_main


def test_a_variable_that_is_not_a_number_is_named():
    with pytest.raises(ValueError) as e:
        launch_info({"WORLD_SIZE": "two"})
    assert str(e.value) == "WORLD_SIZE must be a whole number (as torchrun sets it), got 'two'"


def test_the_device_follows_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert str(resolve_device("auto")) == "cuda:1"
