"""Each metric on hand-made cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from duomodal.data.profile import PALETTE
from duomodal.data.images import parse_color
from duomodal.metrics import (
    Accuracy,
    MetricError,
    accuracy,
    batch_psnr,
    bits_per_token,
    codebook_usage,
    color_accuracy,
    confusion_matrix,
    dominant_color,
    ink_mask,
    mask_iou,
    nearest_template,
    mean_score,
    mse,
    psnr,
    recall_at_k,
    retrieval_recall,
    same_key,
    template_ranks,
    token_counts,
    zero_shot_accuracy,
)


# --- psnr / mse ------------------------------------------------------------------------------------


def test_mse_and_psnr_on_a_known_difference():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert mse(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert psnr(a, b, max_value=255.0) == pytest.approx(10 * math.log10(255**2 / 0.01))


def test_psnr_of_identical_images_is_finite():
    a = torch.rand(2, 3, 4, 4)
    assert psnr(a, a) == pytest.approx(100.0)


def test_batch_psnr_is_per_image():
    reference = torch.zeros(2, 3, 4, 4)
    reconstruction = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    assert batch_psnr(reference, reconstruction).tolist() == pytest.approx([20.0, 40.0])


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(MetricError, match=r"differ in shape: \(1, 3, 4, 4\) vs \(1, 3, 2, 2\)"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2))


# --- codebook --------------------------------------------------------------------------------------


def test_codebook_usage_uniform_over_half_the_codes():
    tokens = torch.tensor([[0, 1], [2, 3]]).repeat(5, 1)  # 4 codes, 5 times each
    counts = token_counts(tokens, codebook_size=8)
    assert counts.tolist() == [5, 5, 5, 5, 0, 0, 0, 0]
    usage = codebook_usage(counts)
    assert (usage.used, usage.size, usage.token_count) == (4, 8, 20)
    assert usage.fraction == pytest.approx(0.5)
    assert usage.perplexity == pytest.approx(4.0)  # uniform over 4 codes


def test_codebook_perplexity_of_one_code_is_one():
    usage = codebook_usage(torch.tensor([0, 7, 0]))
    assert usage.used == 1 and usage.perplexity == pytest.approx(1.0)


def test_codebook_perplexity_of_a_skewed_distribution():
    usage = codebook_usage(torch.tensor([3, 1]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage.perplexity == pytest.approx(math.exp(entropy))


def test_token_counts_rejects_ids_outside_the_codebook():
    with pytest.raises(MetricError, match=r"token ids must lie in \[0, 4\); got min 0, max 4"):
        token_counts(torch.tensor([0, 4]), codebook_size=4)


def test_codebook_usage_needs_tokens():
    with pytest.raises(MetricError, match="no tokens were counted"):
        codebook_usage(torch.zeros(4))


# --- bits per token, mean score ----------------------------------------------------------------------


def test_bits_per_token():
    assert bits_per_token(math.log(2)) == pytest.approx(1.0)
    assert bits_per_token(math.log(256)) == pytest.approx(8.0)
    with pytest.raises(MetricError, match="finite number >= 0 nats, got nan"):
        bits_per_token(float("nan"))


def test_mean_score():
    assert mean_score([0.1, 0.3]) == pytest.approx(0.2)
    with pytest.raises(MetricError, match="no scores to average"):
        mean_score([])


# --- colour ----------------------------------------------------------------------------------------


def solid(color: str, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), parse_color(PALETTE[color]))


def icon_like(color: str, size: int = 32, shape: str = "ring", scale: int = 8) -> Image.Image:
    """A shape drawn large and downsampled: anti-aliased edges blend the colour into white."""
    big = Image.new("RGB", (size * scale, size * scale), (255, 255, 255))
    draw = ImageDraw.Draw(big)
    rgb = parse_color(PALETTE[color])
    m = size * scale // 6
    if shape == "ring":  # thin strokes: lots of fringe relative to the core
        draw.ellipse((m, m, size * scale - m, size * scale - m), outline=rgb, width=scale * 2)
    else:
        draw.rectangle((m, m, size * scale - m, size * scale - m), fill=rgb)
    return big.resize((size, size), Image.LANCZOS)


@pytest.mark.parametrize("color", list(PALETTE))
def test_dominant_color_of_solid_images(color):
    assert dominant_color(solid(color), PALETTE) == color


@pytest.mark.parametrize("color", list(PALETTE))
@pytest.mark.parametrize("shape", ["ring", "square"])
def test_dominant_color_of_anti_aliased_icons_on_white(color, shape):
    image = icon_like(color, shape=shape)
    pixels = np.asarray(image).reshape(-1, 3)
    assert (pixels == 255).all(1).mean() > 0.3  # mostly background
    assert dominant_color(image, PALETTE) == color


def test_fringe_pixels_vote_for_the_colour_they_fade_from():
    # A red stroke with a wide half-covered fringe: naive nearest-colour on the fringe pixels
    # (250, 156, 154) would say pink (#f06292 is closer in RGB than red); the fringe lies on
    # the red-to-white line, so it counts for red.
    red = np.array(parse_color(PALETTE["red"]), dtype=float)
    fringe = 0.5 * red + 0.5 * 255
    pixels = np.full((10, 10, 3), 255.0)
    pixels[0, :3] = red
    pixels[1:4, :] = fringe
    naive = min(PALETTE, key=lambda n: np.linalg.norm(np.array(parse_color(PALETTE[n])) - fringe))
    assert naive == "pink"
    assert dominant_color(pixels, PALETTE) == "red"


def test_faint_fringe_and_background_do_not_vote():
    blue = np.array(parse_color(PALETTE["blue"]), dtype=float)
    pixels = np.full((10, 10, 3), 255.0)
    pixels[:5] = 0.3 * np.array(parse_color(PALETTE["orange"])) + 0.7 * 255  # a wide faint orange haze
    pixels[9, :4] = blue  # a small solid blue shape
    assert dominant_color(pixels, PALETTE) == "blue"


def test_dominant_colour_is_by_area_not_by_strength():
    pixels = np.full((10, 10, 3), 255.0)
    pixels[:4] = parse_color(PALETTE["yellow"])  # light colour, large area
    pixels[9, :3] = parse_color(PALETTE["black"])  # strong colour, small area
    assert dominant_color(pixels, PALETTE) == "yellow"


def test_blank_image_has_no_dominant_colour():
    assert dominant_color(Image.new("RGB", (8, 8), "white"), PALETTE) is None
    almost_white = np.full((8, 8, 3), 250.0)
    assert dominant_color(almost_white, PALETTE) is None


def test_dominant_color_on_another_background():
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((2, 2, 5, 5), fill=parse_color(PALETTE["green"]))
    assert dominant_color(image, PALETTE, background="#000000") == "green"


def test_dominant_color_rejects_bad_inputs():
    with pytest.raises(MetricError, match="the palette is empty"):
        dominant_color(solid("red"), {})
    with pytest.raises(MetricError, match=r"^palette colour 'nope' is not a colour"):
        dominant_color(solid("red"), {"red": "nope"})
    with pytest.raises(MetricError, match=r"^background colour \(0, 0\) must be a colour name, '#rrggbb' or three"):
        dominant_color(solid("red"), PALETTE, background=(0, 0))
    with pytest.raises(MetricError, match=r"expected an \(H, W, 3\) array"):
        dominant_color(np.zeros((4, 4)), PALETTE)


def test_color_accuracy_counts_matches():
    images = [solid("red"), icon_like("blue"), solid("green"), Image.new("RGB", (8, 8), "white")]
    result, predicted = color_accuracy(images, ["red", "blue", "red", "pink"], PALETTE)
    assert predicted == ["red", "blue", "green", None]
    assert result == Accuracy(correct=2, total=4)
    assert result.value == 0.5
    assert str(result) == "50.0% (2/4)"
    assert result.to_dict() == {"accuracy": 0.5, "correct": 2, "count": 4}


def test_color_accuracy_rejects_unknown_colour_names():
    with pytest.raises(MetricError, match=r"colour\(s\) teal are not in the palette"):
        color_accuracy([solid("red")], ["teal"], PALETTE)


def test_accuracy_of_nothing():
    empty = accuracy([], [])
    assert empty.value is None and str(empty) == "n/a (0 samples)"
    with pytest.raises(MetricError, match="2 predictions but 1 expected labels"):
        accuracy(["a", "b"], ["a"])


# --- retrieval and zero-shot -------------------------------------------------------------------------


def test_recall_at_k_on_a_known_matrix():
    # 4 text queries x 5 images; the correct image of text i is image i (image 4 is a distractor).
    similarity = torch.tensor([
        [0.9, 0.1, 0.2, 0.0, 0.3],  # correct image ranked 1st
        [0.8, 0.7, 0.1, 0.0, 0.0],  # 2nd
        [0.5, 0.4, 0.1, 0.6, 0.3],  # 5th (last)
        [0.1, 0.2, 0.3, 0.4, 0.0],  # 1st
    ])
    relevant = torch.zeros(4, 5, dtype=torch.bool)
    relevant[torch.arange(4), torch.arange(4)] = True
    assert recall_at_k(similarity, relevant, 1) == Accuracy(2, 4)
    assert recall_at_k(similarity, relevant, 2) == Accuracy(3, 4)
    assert recall_at_k(similarity, relevant, 4) == Accuracy(3, 4)
    assert recall_at_k(similarity, relevant, 5) == Accuracy(4, 4)
    assert recall_at_k(similarity, relevant, 10) == Accuracy(4, 4)  # k > N counts all items
    # image -> text: transpose both; image 4 answers no text, so it cannot be a query.
    with pytest.raises(MetricError, match=r"queries \[4\] have no relevant item"):
        recall_at_k(similarity.T, relevant.T, 1)
    # images 0 and 1 rank their text first; image 2 prefers text 3, image 3 prefers text 2.
    assert recall_at_k(similarity.T[:4], relevant.T[:4], 1) == Accuracy(2, 4)


def test_recall_at_k_with_several_relevant_items():
    similarity = torch.tensor([[0.1, 0.9, 0.5]])
    relevant = torch.tensor([[True, False, True]])
    assert recall_at_k(similarity, relevant, 1) == Accuracy(0, 1)
    assert recall_at_k(similarity, relevant, 2) == Accuracy(1, 1)


def test_recall_at_k_rejects_bad_inputs():
    with pytest.raises(MetricError, match=r"similarity \(2, 2\) and relevant \(2, 3\) must be the same"):
        recall_at_k(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool), 1)
    with pytest.raises(MetricError, match="k must be >= 1, got 0"):
        recall_at_k(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), 0)


def test_retrieval_recall_by_hand_and_with_duplicate_captions():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 0.9, 0.1]])  # texts 1 and 2 point at each other's image
    similarity = text @ image.T
    figures = retrieval_recall(similarity, torch.eye(3, dtype=torch.bool), ks=(1, 2))
    assert figures["text_to_image_recall@1"] == Accuracy(1, 3)  # only text 0 finds its image first
    assert figures["image_to_text_recall@1"] == Accuracy(1, 3)
    assert figures["text_to_image_recall@2"] == Accuracy(3, 3)
    assert figures["image_to_text_recall@2"] == Accuracy(3, 3)
    # texts 1 and 2 share a caption: retrieving either image for either counts
    assert same_key(["a", "b", "b"]).tolist() == [[True, False, False], [False, True, True], [False, True, True]]
    same = retrieval_recall(similarity, same_key(["a", "b", "b"]), ks=(1,))
    assert same["text_to_image_recall@1"] == Accuracy(3, 3) and same["image_to_text_recall@1"] == Accuracy(3, 3)


def test_zero_shot_accuracy():
    classes = torch.eye(3)  # three orthogonal class embeddings
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.6, 0.7, 0.0], [0.1, 0.0, 0.2]])
    # predictions: 0, 2, 1, 2
    assert zero_shot_accuracy(images, classes, [0, 2, 1, 0]) == Accuracy(3, 4)
    with pytest.raises(MetricError, match="4 images but 2 labels"):
        zero_shot_accuracy(images, classes, [0, 1])
    with pytest.raises(MetricError, match=r"labels must lie in \[0, 3\)"):
        zero_shot_accuracy(images, classes, [0, 1, 2, 3])


def test_confusion_matrix():
    assert confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist() == [[1, 1], [0, 1]]  # rows true, columns predicted
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(MetricError, match="2 predictions but 1 true classes"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(MetricError, match=r"class indices must lie in \[0, 2\), got \[0, 2\]"):
        confusion_matrix([0, 2], [0, 0], 2)


# --- shape by template -----------------------------------------------------------------------------


def test_ink_mask_is_colour_blind_and_ignores_faint_fringe():
    red, yellow = icon_like("red", shape="square"), icon_like("yellow", shape="square")
    assert (ink_mask(red) == ink_mask(yellow)).mean() > 0.97
    pixels = np.full((4, 4, 3), 255.0)
    pixels[0, 0] = (255, 255, 200)  # faint: 55 below white
    pixels[1, 1] = (255, 150, 255)  # 105 below white in one channel
    assert ink_mask(pixels).tolist() == [[False] * 4, [False, True, False, False], [False] * 4, [False] * 4]


def test_mask_iou_and_nearest_template():
    square = np.zeros((6, 6), bool)
    square[1:5, 1:5] = True  # 16 pixels
    bar = np.zeros((6, 6), bool)
    bar[0, :] = True  # 6 pixels
    half = np.zeros((6, 6), bool)
    half[1:5, 1:3] = True  # 8 pixels inside the square
    templates = np.stack([square, bar])
    iou = mask_iou(np.stack([square, half, np.zeros((6, 6), bool)]), templates)
    assert iou.flatten().tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    assert nearest_template(np.stack([half, bar, np.zeros((6, 6), bool)]), templates).tolist() == [0, 1, -1]
    with pytest.raises(MetricError, match=r"masks \(1, 6, 6\) and templates \(2, 5, 5\) must be"):
        mask_iou(square[None], np.zeros((2, 5, 5), bool))


def _mask(*cells: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((4, 4), bool)
    for r, c in cells:
        mask[r, c] = True
    return mask


def test_template_ranks_by_hand():
    corner = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # 4 pixels, top-left 2x2
    top_row = _mask((0, 0), (0, 1), (0, 2), (0, 3))  # 4 pixels
    left_col = _mask((0, 0), (1, 0), (2, 0), (3, 0))  # 4 pixels
    ell = top_row | left_col  # 7 pixels
    templates = np.stack([corner, top_row, left_col])
    masks = np.stack([corner, corner, corner, ell, ell, np.zeros((4, 4), bool)])
    ranks, iou = template_ranks(masks, templates, [0, 1, 2, 0, 1, 0])
    # corner vs corner: 4/4 = 1, alone at the top -> rank 1
    # corner vs top_row and vs left_col: 2 shared / 6 in either = 1/3 each: tied, and ties count against
    #   the wanted template, so either one ranks 3 (corner's 1 and the other's 1/3 are both >= 1/3)
    # ell vs corner: 3 / 8; vs top_row and left_col: 4 / 7 each -> corner ranks 3, top_row 2 (tied with left_col)
    # a blank mask shares nothing with anything: IoU 0 with all, so it ranks last (3)
    assert ranks.tolist() == [1, 3, 3, 3, 2, 3]
    assert iou.tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 3 / 8, 4 / 7, 0.0])
    # a duplicate of the wanted template ties with it at IoU 1, so an exact copy of it ranks 2
    duplicated = np.stack([corner, top_row, corner.copy()])
    ranks, iou = template_ranks(corner[None], duplicated, [0])
    assert ranks.tolist() == [2] and iou.tolist() == [1.0]


def test_template_ranks_rejects_bad_input():
    templates = np.zeros((2, 4, 4), bool)
    with pytest.raises(MetricError, match="3 masks but 2 wanted templates"):
        template_ranks(np.zeros((3, 4, 4), bool), templates, [0, 1])
    with pytest.raises(MetricError, match=r"wanted template indices must lie in \[0, 2\), got \[0, 2\]"):
        template_ranks(np.zeros((2, 4, 4), bool), templates, [0, 2])
    with pytest.raises(MetricError, match="there are no templates to rank"):
        template_ranks(np.zeros((1, 4, 4), bool), np.zeros((0, 4, 4), bool), [0])


def test_icons_are_matched_to_their_own_template_in_any_colour():
    shapes = ["ring", "square"]
    templates = np.stack([ink_mask(icon_like("black", shape=s)) for s in shapes])
    for color in ("yellow", "pink", "blue"):
        masks = np.stack([ink_mask(icon_like(color, shape=s)) for s in shapes])
        assert nearest_template(masks, templates).tolist() == [0, 1]
