"""The report writer on small hand-made inputs: Markdown, self-contained HTML, JSON, figures."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from duomodal.evaluate.report import (
    Section,
    curve_series,
    fmt,
    fmt_accuracy,
    plot_image_rows,
    plot_training_curves,
    read_metrics_log,
    write_report,
)


def test_write_report_renders_sections_tables_and_figures(tmp_path):
    plot_image_rows([("row one", [Image.new("RGB", (8, 8), "red")] * 3),
                     ("row two", [Image.new("RGB", (8, 8), "blue")])], tmp_path / "grid.png",
                    cell_titles=[["a", "b", "c"], ["d"]])
    section = Section("Colour | accuracy")
    section.text("Measured on **8** images with `dominant_color`.")
    section.table(("split", "accuracy"), [("train", "62.5% (5/8)"), ("held|out", "n/a")], caption="a caption")
    section.figure("grid.png", "the <grid>")
    metrics = {"colour": {"accuracy": 0.625, "correct": 5, "count": 8}, "psnr": float("inf")}
    paths = write_report(tmp_path, "Test report", [section], metrics)

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Test report\n")
    assert "## Colour | accuracy" in markdown
    assert "| split | accuracy |\n|---|---|\n| train | 62.5% (5/8) |\n| held\\|out | n/a |" in markdown
    assert "![the <grid>](grid.png)" in markdown
    assert "*a caption*" in markdown

    page = paths["html"].read_text()
    assert "<strong>8</strong>" in page and "<code>dominant_color</code>" in page
    assert "<caption>a caption</caption>" in page
    assert "the &lt;grid&gt;" in page and "<grid>" not in page
    assert 'src="data:image/png;base64,' in page  # self-contained
    assert "http://" not in page and "https://" not in page

    saved = json.loads(paths["metrics"].read_text())
    assert saved == {"colour": {"accuracy": 0.625, "correct": 5, "count": 8}, "psnr": None}  # inf is not JSON


def test_plot_image_rows_puts_each_image_in_its_cell(tmp_path):
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    plot_image_rows([("reds", [red] * 3), ("blue", [blue])], tmp_path / "grid.png", cell_titles=[["a"] * 3, ["b"]])
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    cell, gap, label, title = 110, 6, 240, 14  # pixels, at 100 per inch for cells of 1.1 inches
    assert grid.size == (label + 3 * (cell + gap), 2 * (cell + title + gap) + gap)

    def centre(row: int, column: int) -> tuple[int, int, int]:
        return grid.getpixel((label + column * (cell + gap) + cell // 2, row * (cell + title + gap) + title + gap
                              + cell // 2))

    assert [centre(0, c) for c in range(3)] == [(255, 0, 0)] * 3
    assert centre(1, 0) == (0, 0, 255) and centre(1, 1) == (255, 255, 255)  # a short row leaves its cells blank


def test_plot_image_rows_needs_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows to draw"):
        plot_image_rows([], tmp_path / "x.png")


def test_formatting():
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a"
    assert fmt(12.3456, 2, " dB") == "12.35 dB"
    assert fmt_accuracy({"accuracy": 0.5, "correct": 2, "count": 4}) == "50.0% (2/4)"
    assert fmt_accuracy({"accuracy": None, "correct": 0, "count": 0, "reason": "no judge"}) == "not measured (no judge)"
    assert fmt_accuracy(None) == "n/a (0 samples)"


def test_training_curves_from_a_metrics_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"split": "train", "step": 1, "epoch": 0, "loss": 2.0, "lr": 1e-3, "elapsed_s": 1.0},
        {"split": "train", "step": 2, "epoch": 0, "loss": 1.5, "lr": 1e-3, "elapsed_s": 2.0},
        {"split": "val", "step": 2, "loss": 1.7, "psnr": 18.5, "dropped": 0},
    ]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n[1, 2]\n")
    entries, bad = read_metrics_log(log)
    assert len(entries) == 3 and bad == 2
    series = curve_series(entries)
    assert series["train loss"] == ([1.0, 2.0], [2.0, 1.5])
    assert series["val psnr"] == ([2.0], [18.5])
    assert "train elapsed_s" not in series and "train epoch" not in series and "val dropped" not in series

    drawn = plot_training_curves(log, tmp_path / "curves.png", "a run")
    assert drawn == ["train loss", "val loss", "val psnr", "train lr"]
    assert Image.open(tmp_path / "curves.png").size[0] > 100


def test_training_curves_of_an_empty_log_draw_nothing(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "note": "text only"}\n')
    assert plot_training_curves(log, tmp_path / "curves.png", "a run") == []
    assert not (tmp_path / "curves.png").exists()
