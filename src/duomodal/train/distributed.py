"""Process-group set-up for training under torchrun (DDP), and the single-process case."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tokenizers import Tokenizer as HFTokenizer

from duomodal.device import resolve_device
from duomodal.launch import LaunchInfo, launch_info
from duomodal.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class DistInfo(LaunchInfo):
    """The launch (rank, world size, local rank) and what training set up for it."""

    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when this process created the group (and must destroy it)

    @property
    def enabled(self) -> bool:
        """Whether DDP is on (the launch is distributed)."""
        return self.distributed


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment):
    NCCL on CUDA, gloo on CPU. Without torchrun, a single process on `device`."""
    launch = launch_info()
    resolved = resolve_device(device, launch.local_rank)
    if not launch.distributed:
        return DistInfo(device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)
        owns = True
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device=resolved, owns_group=owns)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values)
    return values


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's `obj` (in rank order); the rank's own in a list of one without DDP."""
    if not info.enabled:
        return [obj]
    gathered: list[object] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        # DDP wrappers sit in reference cycles that hold the process group: collect them while the
        # group is up, so its gloo threads are not left to interpreter teardown
        gc.collect()
        dist.destroy_process_group()


def train_tokenizer(captions: list[str], vocab_size: int) -> Tokenizer:
    """The BPE tokenizer of the training captions; under torch.distributed every rank gets rank 0's.

    The BPE trainer breaks ties between equally frequent pairs differently in each process (same
    vocabulary, different ids), so ranks that each trained their own would disagree on token ids.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        payload = [Tokenizer.train(captions, vocab_size=vocab_size).hf.to_str() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        return Tokenizer(HFTokenizer.from_str(payload[0]))
    return Tokenizer.train(captions, vocab_size=vocab_size)
