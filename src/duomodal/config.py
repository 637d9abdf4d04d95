"""Configuration: frozen dataclasses, strict JSON round trips, dotted overrides, named presets.

Each component's dataclass lives beside the code that uses it (``models/vae.py`` holds
``VAEConfig``, ``train/loop.py`` holds ``TrainConfig``); this module holds the machinery that
every one of them shares and the presets, in one place.

A run is described by a ``RunConfig``-like dataclass whose fields are component configs, e.g.
``{"model": VAEConfig, "train": TrainConfig}``. Overrides address fields by dotted name:
``train.lr=3e-4``, ``model.attention_types=full,axial_row``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key that is not allowed."""


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a JSON value to the annotated type; raise ConfigError naming `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} is not allowed")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if not args or (len(args) == 2 and args[1] is Ellipsis):  # tuple[X, ...]: any length
            item_types = [args[0] if args else Any] * len(value)
        else:  # tuple[X, Y]: exactly that many items
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)} ({value!r})")
            item_types = list(args)
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build `cls` from a dict. Unknown keys are an error; missing keys take the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _parse_scalar(text: str, annotation: Any, where: str) -> Any:
    """Parse a command-line string for a field of type `annotation`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _parse_scalar(text, non_none[0], where)
    if origin is tuple:
        items = [t for t in text.split(",") if t != ""]
        if not args or (len(args) == 2 and args[1] is Ellipsis) or len(args) != len(items):
            item_types = [args[0] if args else str] * len(items)  # a wrong length is caught later
        else:
            item_types = list(args)
        return [_parse_scalar(t.strip(), item_type, where) for t, item_type in zip(items, item_types)]
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    return text


def override(config: T, assignments: list[str] | tuple[str, ...]) -> T:
    """Apply ``key=value`` assignments (dotted keys for nested configs) and return a new config."""
    data = to_dict(config)
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} must look like key=value (e.g. train.lr=3e-4)")
        key, text = assignment.split("=", 1)
        parts = key.strip().split(".")
        cls: Any = type(config)
        node = data
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])} has no sub-keys")
            hints = _field_types(cls)
            if part not in hints:
                raise ConfigError(
                    f"override {key!r}: unknown key {part!r}; allowed: {', '.join(sorted(hints))}"
                )
            if depth == len(parts) - 1:
                node[part] = _parse_scalar(text.strip(), hints[part], key)
            else:
                cls = hints[part]
                node = node[part]
    return from_dict(type(config), data)


def merge(config: T, changes: dict[str, Any]) -> T:
    """Return `config` with the nested `changes` (a partial dict) applied, strictly."""

    def deep_update(base: dict, patch: dict) -> dict:
        out = dict(base)
        for k, v in patch.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = deep_update(out[k], v)
            else:
                out[k] = v
        return out

    return from_dict(type(config), deep_update(to_dict(config), changes))


# Presets: the one place where named setups live. Each entry is a partial dict merged over the
# run config's defaults with `merge`. Trainers register their kind here ("vae", "dalle", "clip").
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "vae": {
        # 32 px -> 8x8 grid of 512 codes; a few minutes on 2 CPU cores (see docs/vae.md)
        "quick": {
            "model": {"image_size": 32, "n_downsample": 2, "width": 64, "res_blocks": 1,
                      "codebook_size": 512, "codebook_dim": 64, "quantizer": "vq"},
            "train": {"steps": 1800, "batch_size": 64, "lr": 2e-3, "warmup_steps": 50,
                      "log_every": 25, "val_every": 600, "sample_every": 300, "checkpoint_every": 600},
            "data": {"image_size": 32},
        },
        # the seed post's setup: 128 px, 512 codes, 3 stages -> 16x16 grid
        "seed": {
            "model": {"image_size": 128, "n_downsample": 3, "width": 32, "res_blocks": 2,
                      "codebook_size": 512, "codebook_dim": 64, "quantizer": "vq"},
            "train": {"steps": 20000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 500,
                      "log_every": 50, "val_every": 1000, "sample_every": 1000, "checkpoint_every": 2000},
            "data": {"image_size": 128},
        },
    },
    "dalle": {
        # 32 px icons through the quick VAE (8x8 grid of 512 codes), 16 text tokens, sized for 2 CPU cores:
        # a narrow model learns more per second of training than a wide one there; Muon, warmup-stable-decay,
        # lr 4e-3, the embeddings at 20x that and a 2,048-token vocabulary won the speedrun ablation
        # (docs/dalle.md). The recipe before the last two is --set train.embed_lr_scale=1
        # --set model.text_vocab_size=1024 --set train.steps=2800; the one before Muon is
        # --set train.optimizer=adamw --set train.schedule=cosine --set train.lr=2e-3 --set train.steps=3000 too
        "quick": {
            "model": {"text_seq_len": 16, "text_vocab_size": 2048, "n_layer": 4, "n_head": 4, "n_embd": 128,
                      "attention_types": ["full"], "caption_dropout": 0.1},
            "train": {"steps": 3600, "batch_size": 32, "lr": 4e-3, "embed_lr_scale": 20.0, "warmup_steps": 50,
                      "weight_decay": 0.01, "optimizer": "muon", "schedule": "wsd",
                      "log_every": 50, "val_every": 900, "val_batches": 32, "sample_every": 1800,
                      "checkpoint_every": 900},
            "data": {"image_size": 32},
        },
        # the seed post's setup: 128 px icons through the seed VAE (16x16 grid of 512 codes), 32 text tokens
        "seed": {
            "model": {"text_seq_len": 32, "text_vocab_size": 2048, "n_layer": 8, "n_head": 8, "n_embd": 512,
                      "attention_types": ["full"], "caption_dropout": 0.1},
            "train": {"steps": 30000, "batch_size": 32, "lr": 4e-4, "embed_lr_scale": 20.0, "warmup_steps": 1000,
                      "weight_decay": 0.01, "optimizer": "muon", "schedule": "wsd", "log_every": 50, "val_every": 1000, "val_batches": 50, "sample_every": 1000,
                      "checkpoint_every": 2000},
            "data": {"image_size": 128},
        },
    },
    "clip": {
        # 32 px icons as 4x4 patches of 8 px, small ViT and text transformer, sized for 2 CPU cores; Muon,
        # warmup-stable-decay and lr 3e-3 won the speedrun (docs/clip.md). Precision and attention kernel are
        # chosen from the hardware (duomodal.device). The previous recipe is --set train.optimizer=adamw
        # --set train.schedule=cosine --set train.lr=1e-3 --set train.steps=450
        "quick": {
            "model": {"image_size": 32, "patch_size": 8, "vision_width": 128, "vision_layers": 4, "vision_heads": 4,
                      "text_width": 128, "text_layers": 3, "text_heads": 4, "context_length": 32,
                      "vocab_size": 2048, "embed_dim": 128},
            "train": {"steps": 1600, "batch_size": 256, "lr": 3e-3, "warmup_steps": 40, "weight_decay": 0.1,
                      "optimizer": "muon", "schedule": "wsd",
                      "log_every": 20, "val_every": 400, "sample_every": 800, "checkpoint_every": 400},
            "data": {"image_size": 32},
            "augment": {"crop_scale_min": 0.8},
        },
        # the seed post's scale: 64 px, wider and deeper encoders, more steps (a GPU job)
        "seed": {
            "model": {"image_size": 64, "patch_size": 8, "vision_width": 256, "vision_layers": 6, "vision_heads": 8,
                      "text_width": 256, "text_layers": 6, "text_heads": 8, "context_length": 48,
                      "vocab_size": 4096, "embed_dim": 256},
            "train": {"steps": 20000, "batch_size": 512, "lr": 5e-4, "warmup_steps": 1000, "weight_decay": 0.1,
                      "optimizer": "muon", "schedule": "wsd",
                      "log_every": 50, "val_every": 1000, "sample_every": 1000, "checkpoint_every": 2000},
            "data": {"image_size": 64},
            "augment": {"crop_scale_min": 0.8},
        },
    },
}


def preset(kind: str, name: str) -> dict[str, Any]:
    if kind not in PRESETS:
        raise ConfigError(f"no presets for {kind!r}; kinds: {', '.join(sorted(PRESETS))}")
    if name not in PRESETS[kind]:
        known = ", ".join(sorted(PRESETS[kind])) or "none yet"
        raise ConfigError(f"unknown {kind} preset {name!r}; presets: {known}")
    return PRESETS[kind][name]
