"""The one on-disk format for every model duomodal saves.

A model directory holds:
- ``config.json``: ``{"kind": "vae" | "dalle" | "clip", "format_version": 1, "config": {...}}``,
  the resolved config, enough to rebuild the model;
- ``model.safetensors``: the weights;
- ``tokenizer.json``: where the model has text;
- ``training_state.safetensors`` + ``training_state.json``: optimizer, step, RNG, data order
  (only in training checkpoints).

Every file is written atomically (temporary file, fsync, rename). Nothing here unpickles:
weights and optimizer tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from duomodal.config import ConfigError
from duomodal.files import atomic_write_bytes, atomic_write_text, load_json, save_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"


class ModelFileError(ValueError):
    """A model directory that is missing, of the wrong kind, or does not match its model."""


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies safetensors accepts: a tensor that shares storage with an earlier one
    (tied weights, views) is cloned, since safetensors refuses to write shared memory."""
    out = {}
    seen_storages = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_model(
    directory: str | os.PathLike,
    kind: str,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
) -> Path:
    """Write config.json and model.safetensors into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _cpu_tensors(state_dict)
    atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"kind": kind}))
    save_json({"kind": kind, "format_version": FORMAT_VERSION, "config": config}, directory / CONFIG_FILE)
    return directory


def read_config(directory: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The `config` of a model directory, checking its kind when `kind` is given."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelFileError(f"{directory} is not a directory; pass a duomodal model or run directory")
    if not path.is_file():
        raise ModelFileError(f"{directory} has no {CONFIG_FILE}; is it a duomodal model directory?")
    try:
        data = load_json(path)
    except ConfigError as e:
        raise ModelFileError(str(e)) from None
    if not isinstance(data, dict) or "kind" not in data or "config" not in data:
        raise ModelFileError(f"{path} is not a duomodal model config (needs 'kind' and 'config')")
    if kind is not None and data["kind"] != kind:
        raise ModelFileError(f"{directory} holds a {data['kind']} model, expected a {kind} model")
    if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelFileError(
            f"{directory} was written by a newer duomodal (format {data['format_version']}); upgrade duomodal"
        )
    return data["config"]


def read_kind(directory: str | os.PathLike) -> str:
    read_config(directory)
    return load_json(Path(directory) / CONFIG_FILE)["kind"]


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelFileError(f"{Path(directory)} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(f"{path} is not a readable safetensors file: {e}") from None


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `module`; any missing, unexpected or mis-shaped tensor is an error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    if mismatched:
        problems.append(f"shape mismatch: {', '.join(mismatched[:10])}")
    if problems:
        raise ModelFileError(f"{source} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


# --- training state -----------------------------------------------------------------------------


_MARKERS = frozenset({"__tensor__", "__ndarray__", "__items__", "__tuple__"})


def _unique_key(key: str, tensors: dict[str, torch.Tensor]) -> str:
    """`key`, or `key#n` when another tensor already took it (e.g. keys "a.b" and "a" -> "b")."""
    candidate, n = key, 1
    while candidate in tensors:
        candidate, n = f"{key}#{n}", n + 1
    return candidate


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON tree of `obj` with tensors moved into `tensors` and replaced by references."""
    if isinstance(obj, torch.Tensor):
        key = _unique_key(prefix or "tensor", tensors)
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = _unique_key(prefix or "array", tensors)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not _MARKERS & obj.keys():
            return {k: _flatten(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        return {
            "__items__": [
                [k, _flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} at {prefix!r} in a training state")


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy()
        if "__items__" in tree:
            return {k: _unflatten(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(_unflatten(v, tensors) for v in tree["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def save_training_state(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a nested dict of tensors, arrays and JSON values (optimizer state, step, RNG...)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "")  # first, so that a value we cannot save leaves no trace
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / STATE_TENSORS_FILE, save(_cpu_tensors(tensors)))
    # Not save_json: its sorted keys would reorder the dicts of the state on the way back.
    atomic_write_text(directory / STATE_JSON_FILE, json.dumps(tree, indent=1) + "\n")


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / STATE_JSON_FILE).is_file() or not (directory / STATE_TENSORS_FILE).is_file():
        raise ModelFileError(f"{directory} has no training state ({STATE_JSON_FILE}, {STATE_TENSORS_FILE})")
    try:
        tensors = load_file(str(directory / STATE_TENSORS_FILE))
        return _unflatten(load_json(directory / STATE_JSON_FILE), tensors)
    except ConfigError as e:
        raise ModelFileError(str(e)) from None
    except KeyError as e:
        raise ModelFileError(
            f"{directory / STATE_JSON_FILE} names tensor {e} that is not in {STATE_TENSORS_FILE}"
        ) from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(
            f"{directory / STATE_TENSORS_FILE} is not a readable safetensors file: {e}"
        ) from None


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states, in a form save_training_state takes."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_state[0],
            "keys": np_state[1],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"], npst["pos"], npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
