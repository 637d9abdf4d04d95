"""The model-directory format: round trips, strict loading, training state, RNG, no pickle."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from duomodal.modelfile import (
    CONFIG_FILE,
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    capture_rng_state,
    load_state_dict_strict,
    load_training_state,
    load_weights,
    read_config,
    read_kind,
    restore_rng_state,
    save_model,
    save_training_state,
)

CONFIG = {"width": 4, "n_layer": 2, "attention_types": ["full", "axial_row"]}


def tiny_model(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --- weights and config -------------------------------------------------------------------------


def test_model_round_trip(tmp_path):
    model = tiny_model()
    directory = save_model(tmp_path / "model", "vae", CONFIG, model.state_dict())
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    written = json.loads((directory / CONFIG_FILE).read_text())
    assert written == {"kind": "vae", "format_version": 1, "config": CONFIG}
    assert read_config(directory, kind="vae") == CONFIG
    assert read_config(directory) == CONFIG
    assert read_kind(directory) == "vae"
    fresh = tiny_model()
    load_state_dict_strict(fresh, load_weights(directory), str(directory))
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_tied_and_sliced_tensors_are_saved(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's input and output embeddings
    save_model(tmp_path, "dalle", {}, model.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    load_state_dict_strict(fresh, load_weights(tmp_path), "tied")
    assert torch.equal(fresh[0].weight, model[0].weight) and fresh[0].weight is fresh[1].weight
    big = torch.arange(10.0)
    save_model(tmp_path / "views", "clip", {}, {"a": big[2:5], "b": big[:2]})
    weights = load_weights(tmp_path / "views")
    assert weights["a"].tolist() == [2.0, 3.0, 4.0] and weights["b"].tolist() == [0.0, 1.0]


def test_wrong_kind_is_an_error(tmp_path):
    save_model(tmp_path, "vae", CONFIG, tiny_model().state_dict())
    with pytest.raises(ModelFileError) as error:
        read_config(tmp_path, kind="dalle")
    assert str(error.value) == f"{tmp_path} holds a vae model, expected a dalle model"


def test_directories_that_are_not_models(tmp_path):
    with pytest.raises(ModelFileError) as error:
        read_config(tmp_path / "absent")
    assert str(error.value) == (
        f"{tmp_path / 'absent'} is not a directory; pass a duomodal model or run directory"
    )
    with pytest.raises(ModelFileError) as error:
        read_config(tmp_path)
    assert str(error.value) == f"{tmp_path} has no config.json; is it a duomodal model directory?"
    (tmp_path / CONFIG_FILE).write_text('{"model_type": "clip"}')
    with pytest.raises(ModelFileError) as error:
        read_config(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / CONFIG_FILE} is not a duomodal model config (needs 'kind' and 'config')"
    )
    (tmp_path / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ModelFileError, match=r"config.json is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"kind": "vae", "format_version": 9, "config": {}}')
    with pytest.raises(ModelFileError) as error:
        read_config(tmp_path)
    assert str(error.value) == f"{tmp_path} was written by a newer duomodal (format 9); upgrade duomodal"


def test_missing_or_corrupt_weights(tmp_path):
    with pytest.raises(ModelFileError) as error:
        load_weights(tmp_path)
    assert str(error.value) == f"{tmp_path} has no model.safetensors"
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ModelFileError, match=r"model.safetensors is not a readable safetensors file: "):
        load_weights(tmp_path)


def test_strict_load_missing_tensor():
    weights = tiny_model().state_dict()
    del weights["2.bias"]
    with pytest.raises(ModelFileError) as error:
        load_state_dict_strict(tiny_model(), weights, "run/model.safetensors")
    assert str(error.value) == "run/model.safetensors does not match the model: missing tensors: 2.bias"


def test_strict_load_unexpected_tensor():
    weights = {**tiny_model().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ModelFileError) as error:
        load_state_dict_strict(tiny_model(), weights, "m")
    assert str(error.value) == "m does not match the model: unexpected tensors: extra.weight"


def test_strict_load_shape_mismatch():
    with pytest.raises(ModelFileError) as error:
        load_state_dict_strict(tiny_model(width=4), tiny_model(width=5).state_dict(), "m")
    assert str(error.value) == (
        "m does not match the model: shape mismatch: 0.bias (file (5,), model (4,)), "
        "0.weight (file (5, 3), model (4, 3)), 2.weight (file (2, 5), model (2, 4))"
    )


def test_strict_load_reports_every_problem_and_changes_nothing():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = tiny_model().state_dict()
    del weights["0.bias"]
    weights["0.weight"] = torch.zeros(7, 3)
    weights["head.bias"] = torch.zeros(2)
    with pytest.raises(ModelFileError) as error:
        load_state_dict_strict(model, weights, "m")
    assert str(error.value) == (
        "m does not match the model: missing tensors: 0.bias; unexpected tensors: head.bias; "
        "shape mismatch: 0.weight (file (7, 3), model (4, 3))"
    )
    assert_same_tensors(model.state_dict(), before)


# --- training state -----------------------------------------------------------------------------


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 3)  # drawn from torch's RNG: the restored RNG must replay the same data
        loss = (model(x) - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_resumes_exactly_from_saved_state(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    train_steps(model, optimizer, 3)
    save_model(tmp_path, "vae", CONFIG, model.state_dict())
    state = {"step": 3, "optimizer": optimizer.state_dict(), "rng": capture_rng_state()}
    save_training_state(tmp_path, state)
    train_steps(model, optimizer, 4)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a fresh process would have another RNG state
    resumed = tiny_model()
    load_state_dict_strict(resumed, load_weights(tmp_path), "resume")
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    state = load_training_state(tmp_path)
    assert state["step"] == 3
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples come back as tuples
    assert set(state["optimizer"]["state"]) == {0, 1, 2, 3}  # integer keys come back as integers
    resumed_optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    train_steps(resumed, resumed_optimizer, 4)
    assert_same_tensors(resumed.state_dict(), uninterrupted)


def test_rng_state_restore_replays_the_same_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leave a cached gaussian in numpy's state
    save_training_state(tmp_path, {"rng": capture_rng_state()})
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_training_state(tmp_path)["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert again == first


def test_training_state_round_trips_nested_values(tmp_path):
    state = {
        "step": 7,
        "loss": 0.25,
        "name": "run",
        "done": False,
        "nothing": None,
        "pair": (1, "a"),
        "list": [1, torch.ones(2), {"x": np.arange(3, dtype=np.int64)}],
        "by_index": {0: torch.zeros(1), 5: "five"},
        "a.b": torch.tensor([1.0]),
        "a": {"b": torch.tensor([2.0])},  # the same dotted path as "a.b": must not collide
        "user": {"__tensor__": "not a reference", "__tuple__": [1]},  # keys that look like markers
    }
    save_training_state(tmp_path, state)
    loaded = load_training_state(tmp_path)
    assert list(loaded) == list(state)  # order kept
    assert loaded["step"] == 7 and loaded["loss"] == 0.25 and loaded["name"] == "run"
    assert loaded["done"] is False and loaded["nothing"] is None and loaded["pair"] == (1, "a")
    assert loaded["list"][0] == 1 and torch.equal(loaded["list"][1], torch.ones(2))
    assert isinstance(loaded["list"][2]["x"], np.ndarray) and loaded["list"][2]["x"].tolist() == [0, 1, 2]
    assert torch.equal(loaded["by_index"][0], torch.zeros(1)) and loaded["by_index"][5] == "five"
    assert loaded["a.b"].item() == 1.0 and loaded["a"]["b"].item() == 2.0
    assert loaded["user"] == {"__tensor__": "not a reference", "__tuple__": [1]}


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"^cannot save set at 'opt.tags' in a training state$"):
        save_training_state(tmp_path / "state", {"opt": {"tags": {1, 2}}})
    assert not (tmp_path / "state").exists()


def test_missing_or_corrupt_training_state(tmp_path):
    with pytest.raises(ModelFileError) as error:
        load_training_state(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} has no training state (training_state.json, training_state.safetensors)"
    )
    save_training_state(tmp_path, {"w": torch.ones(1)})
    (tmp_path / STATE_TENSORS_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match=r"training_state.safetensors is not a readable safetensors"):
        load_training_state(tmp_path)


def test_no_pickle_in_any_file(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    train_steps(model, optimizer, 1)
    save_model(tmp_path, "clip", CONFIG, model.state_dict())
    save_training_state(tmp_path, {"optimizer": optimizer.state_dict(), "rng": capture_rng_state()})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [CONFIG_FILE, WEIGHTS_FILE, STATE_JSON_FILE, STATE_TENSORS_FILE]
    for name in (CONFIG_FILE, STATE_JSON_FILE):
        json.loads((tmp_path / name).read_text())  # plain JSON
    for name in (WEIGHTS_FILE, STATE_TENSORS_FILE):
        data = (tmp_path / name).read_bytes()
        assert not data.startswith(b"\x80")  # no pickle protocol header, no zip (torch.save) either
        assert not data.startswith(b"PK")
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert len(list(f.keys())) > 0
