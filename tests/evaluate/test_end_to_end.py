"""`duomodal eval` as the user calls it, on real tiny models trained for a few steps on the shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duomodal.cli import build_parser, main

VAE_SETS = [
    "model.image_size=16", "data.image_size=16", "model.width=16", "model.max_width=32",
    "model.codebook_size=32", "model.codebook_dim=16", "model.quantizer=vq", "train.batch_size=8",
    "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2", "train.val_every=4", "train.sample_every=0",
    "train.steps=8",
]
CLIP_SETS = [
    "model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.vision_width=32",
    "model.vision_layers=2", "model.vision_heads=2", "model.text_width=32", "model.text_layers=2",
    "model.text_heads=2", "model.context_length=16", "model.vocab_size=64", "model.embed_dim=32",
    "train.batch_size=8", "train.steps=8", "train.log_every=2", "train.val_every=4", "train.sample_every=0",
    "train.warmup_steps=2",
]
DALLE_SETS = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.text_seq_len=16", "train.batch_size=8",
    "train.steps=8", "train.log_every=2", "train.val_every=4", "train.sample_every=0", "train.warmup_steps=2",
]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_kinds() -> set[str]:
    parser = build_parser()
    command = next(a for a in parser._actions if a.dest == "command")
    train = command.choices["train"]
    return set(next(a for a in train._actions if a.dest == "model_kind").choices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, labelled_data) -> dict[str, Path]:
    """A VAE, two CLIPs (seeds 0 and 1: reranker and judge) and, when it can be trained, a DALL-E."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--data", str(labelled_data), "--device", "cpu"]
        out = {"vae": root / "vae", "clip": root / "clip", "judge": root / "judge"}
        assert main(["train", "vae", *common, "--out", str(out["vae"]), *sets(VAE_SETS)]) == 0
        assert main(["train", "clip", *common, "--out", str(out["clip"]), *sets(CLIP_SETS + ["train.seed=0"])]) == 0
        assert main(["train", "clip", *common, "--out", str(out["judge"]), *sets(CLIP_SETS + ["train.seed=1"])]) == 0
        if "dalle" in train_kinds():
            out["dalle"] = root / "dalle"
            assert main(["train", "dalle", *common, "--out", str(out["dalle"]), "--vae", str(out["vae"]),
                         *sets(DALLE_SETS)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_eval_vae_and_clips(runs, labelled_data, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--data", str(labelled_data), "--vae", str(runs["vae"]), "--clip", str(runs["clip"]),
                 "--judge-clip", str(runs["judge"]), "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "VAE val PSNR: " in printed and "CLIP heldout: text->image R@1 " in printed

    m = json.loads((out / "metrics.json").read_text())
    # the VAE trainer's own validation PSNR over the same 2 val images agrees with the report's
    val_rows = [json.loads(line) for line in (runs["vae"] / "metrics.jsonl").read_text().splitlines()]
    trainer_psnr = [r for r in val_rows if r["split"] == "val"][-1]["psnr_per_image"]
    assert m["vae"]["images"] == 2
    assert m["vae"]["psnr_db"] == pytest.approx(trainer_psnr, abs=1e-3)
    assert m["vae"]["codebook"]["token_count"] == 2 * 4 * 4
    for split, n in (("val", 2), ("heldout", 4)):
        assert m["clip"][split]["images"] == n
        assert m["clip"][split]["text_to_image_recall@1"]["count"] == n
        assert m["clip"][split]["zero_shot_color"]["count"] == n
        assert m["clip"][split]["text_to_image_recall@10"]["accuracy"] == 1.0  # 10 > n: every image counts
    assert m["dalle"] == {"skipped": "no --dalle given"}
    assert set(m["curves"]) == {"VAE", "CLIP", "judge CLIP"}
    assert "train loss" in m["curves"]["VAE"]["series"]

    report = (out / "report.md").read_text()
    assert "| DALL-E | not given: its sections are skipped |" in report
    assert "## DALL-E" not in report
    assert "| heldout | 4 |" in report
    for figure in ("vae_reconstructions.png", "curves_vae.png", "curves_clip.png", "curves_judge_clip.png"):
        assert (out / figure).is_file() and f"]({figure})" in report
    assert "https://" not in (out / "report.html").read_text()


@pytest.mark.skipif("dalle" not in train_kinds(), reason="`duomodal train dalle` has not landed yet")
def test_eval_everything(runs, labelled_data, tmp_path):
    out = tmp_path / "report"
    code = main(["eval", "--data", str(labelled_data), "--vae", str(runs["vae"]), "--dalle", str(runs["dalle"]),
                 "--clip", str(runs["clip"]), "--judge-clip", str(runs["judge"]), "--out", str(out),
                 "--prompts", "2", "--samples-per-prompt", "2", "--rerank-from", "4", "--device", "cpu"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    dalle = m["dalle"]
    assert set(dalle["bits_per_image_token"]) == {"train", "val", "heldout"}
    # the DALL-E trainer's own validation figures agree with the report's
    trainer = [json.loads(line) for line in (runs["dalle"] / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in trainer if r["split"] == "val"][-1]
    assert dalle["bits_per_image_token"]["val"]["bits"] == pytest.approx(last_val["image_bits"], abs=0.02)
    assert dalle["bits_per_image_token"]["heldout"]["bits"] == pytest.approx(last_val["heldout_image_bits"], abs=0.02)
    assert dalle["judge"]["independent"] is True
    assert "trained with seed 1 vs 0" in dalle["judge"]["how"]
    # the template matcher recognises the dataset's own image of every prompt
    assert dalle["template_matcher"]["accuracy_on_dataset_images"]["heldout"] == {"accuracy": 1.0, "correct": 2,
                                                                                  "count": 2}
    for split, prompts in (("train", 2), ("heldout", 2)):
        assert len(dalle["prompts"][split]) == prompts
        entry = dalle["samples"][split]
        assert entry["images"] == prompts * 2
        assert entry["color_accuracy"]["count"] == prompts * 2
        assert entry["shape_accuracy"]["count"] == prompts * 2
        assert entry["shape_match_accuracy"]["count"] == prompts * 2
        assert entry["shape_match_top10"]["count"] == prompts * 2
        assert 1 <= entry["shape_median_rank"] <= dalle["template_matcher"]["icons"]
        assert 0.0 <= entry["shape_iou"] <= 1.0
        assert dalle["reranking"][split]["with"]["clip_score"] >= dalle["reranking"][split]["without"]["clip_score"]
    # the two held-out prompts have different icons, so each is the other's name-blind comparison
    assert 0.0 <= dalle["samples"]["heldout"]["shape_iou_name_blind"] <= 1.0
    report = (out / "report.md").read_text()
    assert "name-blind |" in report
    # the header states the machine, the precision and how far each model was trained
    assert m["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert m["settings"]["precision"] in ("fp32", "bf16")
    assert f"Machine: {m['machine']['cpu']}, ISA {m['machine']['isa']}" in report
    for name in ("VAE", "DALL-E", "CLIP"):
        trained = json.loads((runs[{"VAE": "vae", "DALL-E": "dalle", "CLIP": "clip"}[name]] / "result.json").read_text())
        assert m["training"][name]["step"] == trained["step"]
        assert f"| {name} | {trained['step']} | {trained['precision']} |" in report
    for heading in ("## DALL-E: likelihood of real images", "## DALL-E: samples, colour and shape accuracy",
                    "## Reranking with CLIP"):
        assert heading in report
    for figure in ("dalle_samples_train.png", "dalle_samples_heldout.png", "dalle_reranked_heldout.png"):
        assert (out / figure).is_file()
