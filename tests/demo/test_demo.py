"""`duomodal demo` end to end on a tiny configuration: every stage, the report, and a re-run
that reuses everything."""

from __future__ import annotations

import json

import pytest

from duomodal.cli import build_parser, main
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
    report = build_parser().parse_args(list(stages[-1].argv))  # samples as `duomodal generate` does by default
    assert (report.top_k, report.guidance) == (64, 3.0)
    assert build_parser().parse_args([*stages[-1].argv, "--min-p", "0.1"]).min_p == 0.1  # eval takes every setting


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


def test_the_quick_demo_gives_each_trainer_a_share_of_its_budget(tmp_path):
    from duomodal.demo import DEMO_MINUTES, DEMO_SHARES

    def minutes(stages):
        return {s.name: float(s.argv[s.argv.index("--minutes") + 1]) for s in stages if "--minutes" in s.argv}

    planned = minutes(plan(tmp_path, "quick", "cpu"))
    assert planned == pytest.approx({k: DEMO_MINUTES * share for k, share in DEMO_SHARES.items()}, abs=0.005)
    assert sum(planned.values()) < DEMO_MINUTES  # the rest is for the dataset, index and report stages
    doubled = minutes(plan(tmp_path, "quick", "cpu", minutes=2 * DEMO_MINUTES))
    assert doubled == pytest.approx({k: 2 * DEMO_MINUTES * share for k, share in DEMO_SHARES.items()}, abs=0.005)
    # a trainer whose steps are given keeps them; the seed preset trains its steps unless a budget is given
    kept = plan(tmp_path, "quick", "cpu", train_overrides=("clip:train.steps=5",))
    assert set(minutes(kept)) == {"vae", "dalle"}
    assert minutes(plan(tmp_path, "seed", "cpu")) == {}
    assert set(minutes(plan(tmp_path, "seed", "cpu", minutes=60))) == {"vae", "dalle", "clip"}
    with pytest.raises(ValueError, match=r"^--minutes must be above 0, got 0$"):
        plan(tmp_path, "quick", minutes=0)


def test_a_small_dataset_lowers_each_batch_to_what_it_holds(tmp_path):
    work = tmp_path / "demo"
    assert all("train.batch_size" not in " ".join(s.argv) for s in plan(work, "seed", "cpu", limit=60))
    (work / "icons").mkdir(parents=True)
    (work / "icons" / "dataset.json").write_text(json.dumps({"counts": {"train": 435}}))
    stages = {s.name: s for s in plan(work, "seed", "cpu", limit=60)}
    clip = stages["clip"]  # the seed CLIP's batch is 512; 435 training images hold a batch of 256
    assert clip.argv[clip.argv.index("train.batch_size=256") - 1] == "--set"
    assert "batch lowered from 512 to 256: the training split has 435 items" in clip.what
    assert "train.batch_size" not in " ".join(stages["vae"].argv)  # 32 fits
