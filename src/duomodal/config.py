"""Configuration: frozen dataclasses, strict JSON round trips, dotted overrides, named presets.

Each component's dataclass lives beside the code that uses it (``models/vae.py`` holds
``VAEConfig``, ``train/recipe.py`` holds ``TrainConfig``); this module holds the machinery that
every one of them shares, and reads the trainers' named presets (``train/presets/<kind>.json``).

A run is described by a ``RunConfig``-like dataclass whose fields are component configs, e.g.
``{"model": VAEConfig, "train": TrainConfig}``. Overrides address fields by dotted name:
``train.lr=3e-4``, ``model.attention_types=full,axial_row``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
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


# Presets: named setups, kept as data beside the trainers that own them: train/presets/<kind>.json maps
# each preset name to a partial run config, merged over the run config's defaults with `merge`. What
# each preset is for, and the recipes it replaced, are in docs/vae.md, docs/dalle.md and docs/clip.md.
PRESET_DIR = Path(__file__).parent / "train" / "presets"


@functools.cache
def _presets_of(kind: str) -> dict[str, dict[str, Any]]:
    path = PRESET_DIR / f"{kind}.json"
    if not path.is_file():
        raise ConfigError(f"no presets for {kind!r}; kinds: {', '.join(preset_kinds())}")
    return json.loads(path.read_text(encoding="utf-8"))


def preset_kinds() -> list[str]:
    """The trainer kinds that have presets ("clip", "dalle", "vae")."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def presets(kind: str) -> dict[str, dict[str, Any]]:
    """The named presets of one trainer kind: name -> partial run config (a copy, free to change)."""
    return copy.deepcopy(_presets_of(kind))


def preset(kind: str, name: str) -> dict[str, Any]:
    """One named preset of `kind`, a partial run config; ConfigError for an unknown kind or name."""
    named = presets(kind)
    if name not in named:
        known = ", ".join(sorted(named)) or "none yet"
        raise ConfigError(f"unknown {kind} preset {name!r}; presets: {known}")
    return named[name]
