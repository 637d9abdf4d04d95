"""Config machinery: strict from_dict, command-line overrides, merge, presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from duomodal.config import ConfigError, from_dict, merge, override, preset, preset_kinds, presets, to_dict


@dataclass(frozen=True)
class ModelPart:
    width: int = 32  # channels
    n_layer: int = 2
    dropout: float = 0.0
    attention_types: tuple[str, ...] = ("full",)
    quantizer: Literal["gumbel", "vq"] = "gumbel"


@dataclass(frozen=True)
class TrainPart:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    ema: bool = False
    max_steps: int | None = None
    name: str = "run"


@dataclass(frozen=True)
class Run:
    model: ModelPart = field(default_factory=ModelPart)
    train: TrainPart = field(default_factory=TrainPart)


# --- from_dict / to_dict ------------------------------------------------------------------------


def test_round_trip_through_a_dict():
    run = Run(ModelPart(width=64, attention_types=("full", "axial_row")), TrainPart(betas=(0.8, 0.9)))
    data = to_dict(run)
    assert data["model"]["attention_types"] == ["full", "axial_row"]  # JSON-able: lists, not tuples
    assert json.loads(json.dumps(data)) == data
    assert from_dict(Run, data) == run


def test_missing_keys_take_the_defaults():
    assert from_dict(Run, {"model": {"width": 8}}) == Run(model=ModelPart(width=8))


def test_unknown_keys_are_an_error_naming_them():
    with pytest.raises(ConfigError) as error:
        from_dict(Run, {"model": {"widht": 8}})
    assert str(error.value) == (
        "model: unknown key(s) widht; allowed: attention_types, dropout, n_layer, quantizer, width"
    )
    with pytest.raises(ConfigError, match=r"^Run: unknown key\(s\) data, extra; allowed: model, train$"):
        from_dict(Run, {"data": {}, "extra": 1})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"width": "wide"}}, "model.width: expected an integer, got 'wide'"),
        ({"model": {"width": True}}, "model.width: expected an integer, got True"),
        ({"model": {"width": 2.5}}, "model.width: expected an integer, got 2.5"),
        ({"model": {"dropout": "x"}}, "model.dropout: expected a number, got 'x'"),
        ({"model": {"quantizer": "kmeans"}}, "model.quantizer: 'kmeans' is not one of 'gumbel', 'vq'"),
        ({"model": {"attention_types": "full"}}, "model.attention_types: expected a list, got 'full'"),
        ({"model": {"attention_types": [1]}}, "model.attention_types[0]: expected a string, got 1"),
        ({"model": 3}, "model: expected an object for ModelPart, got 3"),
        ({"train": {"ema": 1}}, "train.ema: expected true or false, got 1"),
        ({"train": {"betas": [0.9]}}, "train.betas: expected 2 items, got 1 ([0.9])"),
        ({"train": {"max_steps": "ten"}}, "train.max_steps: expected an integer, got 'ten'"),
        ({"train": {"name": 5}}, "train.name: expected a string, got 5"),
    ],
)
def test_values_of_the_wrong_type_are_errors(data, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Run, data)
    assert str(error.value) == message


def test_values_are_converted_where_nothing_is_lost():
    run = from_dict(Run, {"model": {"width": 16.0, "dropout": 1}, "train": {"max_steps": None}})
    assert run.model.width == 16 and isinstance(run.model.width, int)
    assert run.model.dropout == 1.0 and isinstance(run.model.dropout, float)
    assert run.train.max_steps is None


# --- override -----------------------------------------------------------------------------------


def test_override_parses_each_type():
    run = override(
        Run(),
        [
            "model.width=64",
            "model.dropout=0.1",
            "model.attention_types=full, axial_row",
            "model.quantizer=vq",
            "train.lr=1e-3",
            "train.betas=0.8,0.99",
            "train.ema=yes",
            "train.max_steps=100",
            "train.name=a=b",
        ],
    )
    assert run.model == ModelPart(width=64, dropout=0.1, attention_types=("full", "axial_row"), quantizer="vq")
    assert run.train == TrainPart(lr=1e-3, betas=(0.8, 0.99), ema=True, max_steps=100, name="a=b")
    assert override(run, ["train.max_steps=none"]).train.max_steps is None
    assert override(run, ["train.ema=off"]).train.ema is False


def test_override_returns_a_new_config():
    run = Run()
    changed = override(run, ["model.width=8"])
    assert run.model.width == 32 and changed.model.width == 8
    assert override(run, []) == run


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("model.widht=8", "override 'model.widht': unknown key 'widht'; allowed: attention_types, dropout, "
         "n_layer, quantizer, width"),
        ("optim.lr=1", "override 'optim.lr': unknown key 'optim'; allowed: model, train"),
        ("model.width.x=1", "override 'model.width.x': model.width has no sub-keys"),
        ("model.width", "override 'model.width' must look like key=value (e.g. train.lr=3e-4)"),
        ("model.width=wide", "model.width: expected an integer, got 'wide'"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.ema=maybe", "train.ema: expected true or false, got 'maybe'"),
        ("model.quantizer=kmeans", "model.quantizer: 'kmeans' is not one of 'gumbel', 'vq'"),
        ("train.betas=0.9", "train.betas: expected 2 items, got 1 ([0.9])"),
    ],
)
def test_bad_overrides_are_errors_naming_the_key(assignment, message):
    with pytest.raises(ConfigError) as error:
        override(Run(), [assignment])
    assert str(error.value) == message


# --- merge --------------------------------------------------------------------------------------


def test_merge_applies_a_partial_nested_dict():
    run = merge(Run(model=ModelPart(n_layer=4)), {"model": {"width": 8}, "train": {"lr": 0.1}})
    assert run.model == ModelPart(width=8, n_layer=4)  # untouched fields stay
    assert run.train.lr == 0.1 and run.train.betas == (0.9, 0.95)


def test_merge_is_strict():
    with pytest.raises(ConfigError, match=r"^model: unknown key\(s\) depth; "):
        merge(Run(), {"model": {"depth": 3}})


def test_presets_are_partial_dicts_for_merge():
    assert set(preset_kinds()) >= {"vae", "dalle", "clip"}
    with pytest.raises(ConfigError, match=r"^no presets for 'gan'; kinds: "):
        preset("gan", "quick")
    with pytest.raises(ConfigError, match=r"^unknown vae preset 'nope'; presets: "):
        preset("vae", "nope")
    for kind in preset_kinds():
        for name in presets(kind):
            assert isinstance(preset(kind, name), dict)


def test_every_preset_merges_over_its_trainers_run_config():
    from duomodal.train.clip_task import ClipRunConfig
    from duomodal.train.dalle_task import DALLERunConfig
    from duomodal.train.vae_task import VAERunConfig

    run_configs = {"vae": VAERunConfig, "dalle": DALLERunConfig, "clip": ClipRunConfig}
    assert set(preset_kinds()) == set(run_configs)
    for kind, cls in run_configs.items():
        for name in presets(kind):
            merged = merge(cls(), preset(kind, name))
            assert merged.train.steps == preset(kind, name)["train"]["steps"], (kind, name)


def test_a_preset_is_a_copy_free_to_change():
    preset("vae", "quick")["train"]["steps"] = -1
    assert preset("vae", "quick")["train"]["steps"] > 0


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Run().model.width = 3  # type: ignore[misc]
