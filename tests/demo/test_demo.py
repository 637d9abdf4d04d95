"""`duomodal demo` end to end on a tiny configuration: every stage, the report, and a re-run
that reuses everything."""

from __future__ import annotations

import json

import pytest

from duomodal.cli import main
from duomodal.demo import plan

TINY = [
    "--limit", "3", "--device", "cpu", "--no-serve", "--eval-prompts", "1",
    "--train-set", "train.steps=2", "--train-set", "train.batch_size=4",
    "--train-set", "vae:model.width=16",
    "--train-set", "dalle:model.n_layer=1", "--train-set", "dalle:model.n_embd=32", "--train-set", "dalle:model.n_head=2",
    "--train-set", "clip:model.vision_width=32", "--train-set", "clip:model.vision_layers=1",
    "--train-set", "clip:model.text_width=32", "--train-set", "clip:model.text_layers=1",
    "--train-set", "clip:model.embed_dim=32",
]


def test_plan_marks_nothing_done_in_an_empty_folder(tmp_path):
    stages = plan(tmp_path / "work", "quick", "cpu", limit=3, train_overrides=("train.steps=2",))
    assert [s.name for s in stages] == ["dataset", "vae", "dalle", "clip", "index", "eval"]
    assert not any(s.done for s in stages)
    vae = stages[1]
    assert vae.argv[:2] == ("train", "vae") and "train.steps=2" in vae.argv and "--resume" not in vae.argv
    report = " ".join(stages[-1].argv)  # the report samples as `duomodal generate` does by default
    assert "--top-k 64" in report and "--guidance 3" in report


def test_kind_prefixed_overrides_go_to_that_trainer_only(tmp_path):
    stages = {s.name: s for s in plan(tmp_path, "quick", "cpu", train_overrides=("dalle:model.n_layer=1", "train.seed=3"))}
    assert "model.n_layer=1" in stages["dalle"].argv and "model.n_layer=1" not in stages["vae"].argv
    assert all("train.seed=3" in stages[k].argv for k in ("vae", "dalle", "clip"))
    with pytest.raises(ValueError, match="'gan' is not one of vae, dalle, clip"):
        plan(tmp_path, "quick", train_overrides=("gan:model.width=2",))


def test_plan_rejects_an_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown demo preset 'huge'; presets: quick, seed"):
        plan(tmp_path, "huge")


@pytest.mark.slow
def test_demo_end_to_end_then_reuse(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--work", str(work), *TINY]) == 0
    err = capsys.readouterr().err
    for n in range(1, 7):
        assert f"[{n}/6]" in err

    report = (work / "report" / "report.md").read_text(encoding="utf-8")
    for section in ("## Summary", "## VAE", "## DALL-E", "## CLIP"):
        assert section in report
    metrics = json.loads((work / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert {"vae", "dalle", "clip"} <= set(metrics)
    assert (work / "report" / "report.html").is_file()
    assert (work / "index").is_dir()
    timings = json.loads((work / "timings.json").read_text(encoding="utf-8"))
    assert set(timings) == {"dataset", "vae", "dalle", "clip", "index", "eval"}

    # Everything finished: a second run trains nothing and only rescans the index.
    assert all(s.done for s in plan(work, "quick", "cpu", limit=3) if s.name != "index")
    assert main(["demo", "--work", str(work), *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("already done, reusing it") == 5
    assert "train vae" not in err


def test_demo_resumes_an_interrupted_training_stage(tmp_path):
    work = tmp_path / "demo"
    run = work / "runs" / "vae"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002" / "config.json").write_text("{}")
    vae = plan(work, "quick", "cpu")[1]
    assert not vae.done and vae.argv[-1] == "--resume" and "resuming" in vae.what
