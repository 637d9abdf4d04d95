"""The template shape figures: the matcher's per-image ranks and IoUs, the name-blind derangement, and
how summarise() turns them into top-1, top-10, median rank and mean IoU per choice (first/reranked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duomodal.data.records import Record
from duomodal.metrics import MetricError
from duomodal.evaluate.prompts import Prompt, PromptSamples, name_blind_icons, summarise
from duomodal.evaluate.samples import fmt_template_shape
from duomodal.evaluate.shape import TemplateMatcher, TemplateScores


def picture(mask: np.ndarray, color=(30, 60, 220)) -> Image.Image:
    pixels = np.full((*mask.shape, 3), 255, np.uint8)
    pixels[mask] = color
    return Image.fromarray(pixels)


def block(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((8, 8), bool)
    mask[rows, cols] = True
    return mask


LEFT = block(slice(0, 8), slice(0, 4))  # 32 pixels
TOP = block(slice(0, 4), slice(0, 8))  # 32 pixels, 16 shared with LEFT
DOT = block(slice(0, 2), slice(0, 2))  # 4 pixels, inside both


@pytest.fixture
def matcher() -> TemplateMatcher:
    return TemplateMatcher(["left", "top", "dot"], np.stack([LEFT, TOP, DOT]), size=8)


def test_an_image_equal_to_a_template_ranks_first_with_iou_one(matcher):
    # the image is LEFT in yellow: colour does not matter
    scores = matcher.assess([picture(LEFT, (235, 200, 20))] * 3 + [picture(np.zeros((8, 8), bool))],
                            ["left", "top", "dot", "left"])
    assert scores.predicted == ["left", "left", "left", None]
    # LEFT vs TOP: 16 / 48 = 1/3; vs DOT: 4 / 32 = 1/8. Ranks: left 1; top 2; dot 3. Blank: IoU 0, last.
    assert scores.ranks == [1, 2, 3, 3]
    assert scores.iou == pytest.approx([1.0, 1 / 3, 1 / 8, 0.0])


def test_an_icon_without_a_template_is_not_ranked(matcher):
    scores = matcher.assess([picture(TOP), picture(TOP)], ["unreadable", "top"])
    assert scores.predicted == ["top", "top"]
    assert scores.ranks == [None, 1] and scores.iou == [None, 1.0]
    with pytest.raises(MetricError, match="2 masks but 1 wanted icons"):
        matcher.assess([picture(TOP), picture(TOP)], ["top"])


def test_name_blind_icons_is_a_fixed_derangement_avoiding_the_same_icon():
    # each prompt gets the next prompt's icon, skipping prompts with its own icon, wrapping around
    assert name_blind_icons(["heart", "heart", "star", "moon"]) == ["star", "star", "moon", "heart"]
    assert name_blind_icons(["star", "heart"]) == ["heart", "star"]
    assert name_blind_icons(["heart", "heart"]) == [None, None]
    assert name_blind_icons(["heart"]) == [None]
    assert name_blind_icons([]) == []


def prompt_samples(icon: str, ranks: list[int], iou: list[float], blind: list[float] | None,
                   best: list[int]) -> PromptSamples:
    count = len(ranks)
    prompt = Prompt(f"a blue {icon} icon", icon, "blue", Record(Path(f"{icon}.png"), (f"a blue {icon} icon",), "train"))
    predicted = [icon if r == 1 else "other" for r in ranks]
    return PromptSamples(prompt, [picture(DOT)] * count, ["blue"] * count, None, None, None, None,
                         TemplateScores(predicted, ranks, iou), None, [0, 1], best, blind)


def test_summarise_counts_top10_median_rank_and_mean_ious_per_choice():
    samples = [
        prompt_samples("heart", [1, 12, 40, 10], [0.9, 0.5, 0.1, 0.6], [0.3, 0.2, 0.1, 0.4], best=[0, 3]),
        prompt_samples("star", [10, 11, 2, 300], [0.6, 0.4, 0.7, 0.0], [0.5, 0.1, 0.2, 0.0], best=[2, 0]),
    ]
    first = summarise(samples, "first")  # images 0 and 1 of each: ranks 1, 12, 10, 11
    assert first["shape_match_accuracy"] == {"accuracy": 0.25, "correct": 1, "count": 4}
    assert first["shape_match_top10"] == {"accuracy": 0.5, "correct": 2, "count": 4}  # 1 and 10; 11, 12 miss
    assert first["shape_median_rank"] == 10.5
    assert first["shape_iou"] == pytest.approx((0.9 + 0.5 + 0.6 + 0.4) / 4)
    assert first["shape_iou_name_blind"] == pytest.approx((0.3 + 0.2 + 0.5 + 0.1) / 4)
    best = summarise(samples, "best")  # heart 0, 3; star 2, 0: ranks 1, 10, 2, 10
    assert best["shape_match_top10"] == {"accuracy": 1.0, "correct": 4, "count": 4}
    assert best["shape_median_rank"] == 6.0
    assert best["shape_iou"] == pytest.approx((0.9 + 0.6 + 0.7 + 0.6) / 4)
    assert best["shape_iou_name_blind"] == pytest.approx((0.3 + 0.4 + 0.2 + 0.5) / 4)
    assert fmt_template_shape(best, 7188) == ("top-1 1/4, top-10 4/4, median rank 6 of 7188, "
                                              "IoU 0.70 vs 0.35 name-blind")
    assert fmt_template_shape(first) == "top-1 1/4, top-10 2/4, median rank 10.5, IoU 0.60 vs 0.28 name-blind"


def test_summarise_leaves_out_the_name_blind_figure_without_a_second_icon():
    entry = summarise([prompt_samples("heart", [1, 3], [1.0, 0.5], None, best=[0, 1])], "first")
    assert "shape_iou_name_blind" not in entry
    assert fmt_template_shape(entry, 3) == "top-1 1/2, top-10 2/2, median rank 2 of 3, IoU 0.75"
    assert fmt_template_shape({}) == "n/a"
