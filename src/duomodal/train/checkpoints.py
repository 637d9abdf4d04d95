"""Training checkpoints: RUN_DIR/checkpoints/step_XXXXXXX/, each a model directory plus the
training state, written into a temporary folder and renamed into place (so a checkpoint that
exists is complete), the last K kept. RUN_DIR itself holds the latest weights."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from duomodal.modelfile import CONFIG_FILE, WEIGHTS_FILE, load_training_state, read_config, save_model, save_training_state

CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / CONFIG_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    kind: str,
    model_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    save_extras: Callable[[Path], None],
    keep: int,
) -> Path:
    """Write checkpoint `step`, refresh RUN_DIR's weights and extras, keep the last `keep`."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(tmp, kind, model_config, weights)
    save_training_state(tmp, training_state)
    save_extras(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    # the run directory is itself a model directory holding the latest weights
    save_model(run_dir, kind, model_config, weights)
    save_extras(run_dir)
    for _, old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    return load_training_state(path)


def has_weights(path: Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def checkpoints_to_resume(out_dir: Path, resume: bool) -> list[tuple[int, Path]]:
    """The run directory's checkpoints; raises ValueError when there are none to resume from,
    or when a new run would write over an existing one."""
    checkpoints = list_checkpoints(out_dir)
    if resume and not checkpoints:
        raise ValueError(
            f"--resume: {out_dir} has no checkpoint to resume from (looked in {out_dir / CHECKPOINTS_DIR}); "
            "run without --resume to start a new run"
        )
    if not resume and checkpoints:
        raise ValueError(
            f"{out_dir} already holds a training run (checkpoint at step {checkpoints[-1][0]}); "
            "pass --resume to continue it, or choose another --out"
        )
    return checkpoints


def check_model_config(path: Path, kind: str, current: dict[str, Any]) -> None:
    """Raises ValueError naming the fields where the model config `current` differs from checkpoint `path`'s."""
    saved = read_config(path, kind=kind)
    if saved != json.loads(json.dumps(current)):
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(
            f"--resume: the model config differs from the checkpoint's in {', '.join(changed)}; "
            "resume with the same model settings"
        )
