"""Where this process sits in a torchrun launch: rank, world size and local rank, read once.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's environment; outside
torchrun none is set and the process is rank 0 of 1. Training, indexing, device choice and the CLI
read them here, not each on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

_VARIABLES = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}


@dataclass(frozen=True)
class LaunchInfo:
    rank: int = 0  # this process among all of the launch
    world_size: int = 1  # processes in the launch
    local_rank: int = 0  # this process among those of its machine (which GPU it takes)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """The launch as torchrun's environment variables describe it (rank 0 of 1 without them);
    ValueError naming the variable when one is not a whole number."""
    environ = os.environ if environ is None else environ
    values = {}
    for field, variable in _VARIABLES.items():
        text = environ.get(variable, "")
        try:
            values[field] = int(text) if text.strip() else getattr(LaunchInfo, field)
        except ValueError:
            raise ValueError(f"{variable} must be a whole number (as torchrun sets it), got {text!r}") from None
    return LaunchInfo(**values)
