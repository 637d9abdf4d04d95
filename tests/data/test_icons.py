"""The icon dataset: palette, captions, held-out properties, idempotent and resumable builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from duomodal.cli import main
from duomodal.data.icon_plan import (
    IconDatasetError,
    IconSource,
    choose_heldout,
    load_icons,
    palette,
    plan_images,
    split_for_path,
)
from duomodal.data.icons import build_icon_dataset, colored_svg, read_manifest, render_icon
from duomodal.data.profile import PALETTE, captions_for, icon_words


def hex_to_rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def build_small(out: Path, **options):
    defaults = dict(size=16, colors=4, limit=12, progress=False, workers=1)
    defaults.update(options)
    return build_icon_dataset(out, **defaults)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("icons")
    return out, build_small(out)


# --- palette and captions -----------------------------------------------------------------------


def test_palette_has_eight_distinct_named_colours():
    assert len(PALETTE) == 8
    assert len(set(PALETTE.values())) == 8
    for name, hex_color in PALETTE.items():
        assert name.isalpha() and name.islower()
        assert len(hex_color) == 7 and hex_color.startswith("#")
    rgbs = [hex_to_rgb(h) for h in PALETTE.values()]
    closest = min(
        sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5 for i, x in enumerate(rgbs) for y in rgbs[i + 1 :]
    )
    assert closest > 60  # well separated, so a model can tell the colours apart


def test_palette_takes_the_first_k_colours():
    assert list(palette(3)) == list(PALETTE)[:3]
    assert palette(8) == PALETTE
    with pytest.raises(IconDatasetError, match=r"^colors must be between 1 and 8, got 9$"):
        palette(9)
    with pytest.raises(IconDatasetError, match=r"^colors must be between 1 and 8, got 0$"):
        palette(0)


def test_captions_name_the_icon_and_the_colour_in_several_phrasings():
    assert icon_words("heart-outline") == "heart outline"
    captions = captions_for("heart-outline", "red")
    assert captions[:4] == (
        "a red heart outline icon",
        "heart outline, red",
        "red heart outline",
        "an icon of a heart outline in red",
    )
    assert len(set(captions)) == len(captions) >= 4
    for caption in captions:
        assert "heart outline" in caption and "red" in caption


def test_captions_use_an_before_vowels():
    assert captions_for("account", "orange")[0] == "an orange account icon"
    assert captions_for("account", "orange")[3] == "an icon of an account in orange"
    assert captions_for("usb", "red")[3] == "an icon of a usb in red"


# --- icons and rendering ------------------------------------------------------------------------


def test_deprecated_icons_are_excluded_by_default():
    current = load_icons()
    everything = load_icons(include_deprecated=True)
    deprecated = [icon for icon in everything if icon.deprecated]
    assert deprecated, "the icon pack is expected to mark some icons deprecated"
    assert not any(icon.deprecated for icon in current)
    assert len(current) + len(deprecated) == len(everything)
    assert [icon.slug for icon in current] == sorted(icon.slug for icon in current)
    assert load_icons(limit=5) == current[:5]


def test_deprecated_icons_are_not_in_the_built_dataset(tmp_path):
    all_icons = load_icons(include_deprecated=True)
    first_deprecated = next(i for i, icon in enumerate(all_icons) if icon.deprecated)
    limit = first_deprecated + 1
    without = build_small(tmp_path / "a", limit=limit, colors=1, heldout_fraction=0.0, size=8)
    with_deprecated = build_small(
        tmp_path / "b", limit=limit, colors=1, heldout_fraction=0.0, size=8, include_deprecated=True
    )
    deprecated_slug = all_icons[first_deprecated].slug
    assert deprecated_slug not in {line["icon"] for line in read_manifest(tmp_path / "a")}
    assert deprecated_slug in {line["icon"] for line in read_manifest(tmp_path / "b")}
    assert with_deprecated["icons"] == limit and without["icons"] == limit


def test_colour_is_applied_to_the_icon():
    icon = load_icons(limit=1)[0]
    for name in ("red", "blue", "yellow"):
        image = render_icon(icon.svg, PALETTE[name], 32)
        assert image.mode == "RGB" and image.size == (32, 32)
        by_count = sorted(image.getcolors(), reverse=True)  # [(count, rgb)], most common first
        assert by_count[0][1] == (255, 255, 255)  # white background
        assert by_count[1][1] == hex_to_rgb(PALETTE[name])  # the solid ink is the palette colour


def test_colour_reaches_every_path_of_a_multi_path_svg():
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">'
        '<path d="M0 0H12V24H0Z"/><g><path d="M12 0H24V24H12Z"/></g></svg>'
    )
    image = render_icon(svg, PALETTE["green"], 16)
    assert image.getpixel((2, 8)) == hex_to_rgb(PALETTE["green"])
    assert image.getpixel((13, 8)) == hex_to_rgb(PALETTE["green"])


def test_colored_svg_replaces_a_root_fill_and_checks_its_input():
    svg = '<svg fill="#123456" viewBox="0 0 24 24"><path d="M0 0H24V24H0Z"/></svg>'
    colored = colored_svg(svg, "#e53935")
    assert colored.count("fill=") == 1 and 'fill="#e53935"' in colored
    with pytest.raises(IconDatasetError, match=r"^colour must look like #rrggbb, got 'red'$"):
        colored_svg(svg, "red")
    with pytest.raises(IconDatasetError, match=r"^not an SVG document: no <svg> element$"):
        colored_svg("<html></html>", "#000000")


# --- held-out combinations ----------------------------------------------------------------------


def test_heldout_pairs_keep_every_icon_and_colour_in_training():
    icons = [f"icon-{i}" for i in range(300)]
    colors = list(PALETTE)
    sources = [IconSource(slug=slug, svg="") for slug in icons]
    images = plan_images(sources, colors, heldout_fraction=0.05, val_fraction=0.05, seed=0)
    heldout = {(im.icon, im.color) for im in images if im.split == "heldout"}
    train = [im for im in images if im.split == "train"]
    assert len(heldout) == round(0.05 * len(icons) * len(colors))  # the fraction asked for
    assert not heldout & {(im.icon, im.color) for im in images if im.split != "heldout"}
    train_icons = {im.icon for im in train}
    train_colors = {im.color for im in train}
    assert {icon for icon, _ in heldout} <= train_icons  # each held-out icon is trained in another colour
    assert set(colors) == train_colors  # every colour appears in training
    for icon, color in heldout:
        assert any(im.icon == icon and im.color != color for im in train)
        assert any(im.color == color and im.icon != icon for im in train)
    # validation is a hash of the path among the other images, around the fraction asked for
    val = [im for im in images if im.split == "val"]
    assert all(split_for_path(im.file, 0.05) == "val" for im in val)
    assert 0.03 < len(val) / len(images) < 0.07


def test_heldout_choice_is_seeded_and_fixed():
    icons = [f"icon-{i}" for i in range(100)]
    colors = list(PALETTE)
    first = choose_heldout(icons, colors, 0.05, seed=0)
    assert first == choose_heldout(icons, colors, 0.05, seed=0)
    assert first != choose_heldout(icons, colors, 0.05, seed=1)
    assert len(first) == 40


def test_heldout_never_takes_an_icons_last_training_colour():
    # Two colours and a large fraction: the constraint, not the fraction, limits the held-out set.
    icons = [f"icon-{i}" for i in range(50)]
    heldout = choose_heldout(icons, ["red", "blue"], 0.9, seed=0, val_fraction=0.0)
    assert len(heldout) == 50  # one colour per icon at most
    assert len({icon for icon, _ in heldout}) == 50


def test_heldout_needs_two_colours():
    with pytest.raises(
        IconDatasetError,
        match=r"^holding out \(icon, colour\) pairs needs at least 2 colours, got 1; "
        r"use more colours or a heldout fraction of 0$",
    ):
        choose_heldout(["a", "b", "c"] * 10, ["red"], 0.5, seed=0)
    assert choose_heldout(["a", "b"], ["red"], 0.0, seed=0) == set()


# --- the build ----------------------------------------------------------------------------------


def test_build_writes_images_manifest_and_summary(small_dataset):
    out, summary = small_dataset
    assert summary["images"] == 12 * 4 and summary["icons"] == 12
    assert summary["train"] + summary["val"] + summary["heldout"] == 48
    assert summary["heldout"] == round(0.05 * 48)
    lines = read_manifest(out)
    assert len(lines) == 48
    for line in lines:
        assert set(line) == {"file", "caption", "icon", "color", "split", "heldout"}
        assert line["file"] == f"images/{line['icon']}__{line['color']}.png"
        assert line["heldout"] == (line["split"] == "heldout")
        assert isinstance(line["caption"], list) and len(line["caption"]) >= 4
        with Image.open(out / line["file"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (16, 16)
    info = json.loads((out / "dataset.json").read_text())
    assert info["size"] == 16
    assert info["palette"] == palette(4)
    assert info["counts"] == {"icons": 12, "images": 48, "train": summary["train"], "val": summary["val"],
                              "heldout": summary["heldout"], "skipped": 0}
    assert info["options"]["limit"] == 12 and info["options"]["seed"] == 0
    assert info["build_seconds"] >= 0


def test_rerun_is_idempotent_and_renders_nothing(tmp_path):
    out = tmp_path / "icons"
    build_small(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    manifest = (out / "captions.jsonl").read_bytes()
    summary = build_small(out)
    assert summary["rendered"] == 0 and summary["reused"] == 48
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert (out / "captions.jsonl").read_bytes() == manifest


def test_interrupted_build_resumes(tmp_path):
    out = tmp_path / "icons"
    build_small(out)
    manifest = (out / "captions.jsonl").read_bytes()
    images = sorted((out / "images").iterdir())
    # an interruption: some images missing, one truncated, a leftover temporary file, no manifest
    for path in images[:5]:
        path.unlink()
    images[5].write_bytes(images[5].read_bytes()[:40])
    (out / "images" / f".{images[6].name}.123.tmp").write_bytes(b"half a png")
    (out / "captions.jsonl").unlink()
    (out / "dataset.json").unlink()
    kept_mtime = images[10].stat().st_mtime_ns

    summary = build_small(out)
    assert summary["rendered"] == 6 and summary["reused"] == 42
    assert (out / "captions.jsonl").read_bytes() == manifest
    assert sorted((out / "images").iterdir()) == images  # the temporary file is gone
    assert images[10].stat().st_mtime_ns == kept_mtime
    with Image.open(images[5]) as image:
        image.verify()


def test_a_dataset_of_other_options_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "icons"
    build_small(out, colors=4)
    manifest = (out / "captions.jsonl").read_bytes()
    with pytest.raises(IconDatasetError) as error:
        build_small(out, colors=2, size=20)
    assert str(error.value) == (
        f"{out} already holds an icon dataset built with size 16 (asked 20), colors 4 (asked 2); "
        "pass the same options to finish or check it, choose another output folder, or overwrite it "
        "(--overwrite)"
    )
    assert (out / "captions.jsonl").read_bytes() == manifest
    assert len(list((out / "images").iterdir())) == 48


def test_overwrite_removes_or_redraws_images_of_other_options(tmp_path):
    out = tmp_path / "icons"
    build_small(out, colors=4)
    summary = build_small(out, colors=2, overwrite=True)
    assert summary["removed"] == 12 * 2 and summary["rendered"] == 0
    assert len(list((out / "images").iterdir())) == 24
    assert json.loads((out / "dataset.json").read_text())["options"]["colors"] == 2
    summary = build_small(out, colors=2, size=20, overwrite=True)  # a new size: every image is drawn again
    assert summary["rendered"] == 24
    with Image.open(out / read_manifest(out)[0]["file"]) as image:
        assert image.size == (20, 20)


def test_two_worker_processes_give_the_same_images(tmp_path):
    one = build_small(tmp_path / "one", limit=20, colors=4, workers=1)
    two = build_small(tmp_path / "two", limit=20, colors=4, workers=2)
    assert one["images"] == two["images"] == 80
    for name in ["captions.jsonl", *(line["file"] for line in read_manifest(tmp_path / "one"))]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_bad_options_are_errors(tmp_path):
    with pytest.raises(IconDatasetError, match=r"^size must be between 8 and 4096 pixels, got 4$"):
        build_small(tmp_path, size=4)
    with pytest.raises(IconDatasetError, match=r"^limit must be at least 1, got 0$"):
        build_small(tmp_path, limit=0)
    with pytest.raises(IconDatasetError, match=r"^val fraction must be in \[0, 1\), got 1.5$"):
        build_small(tmp_path, val_fraction=1.5)
    with pytest.raises(IconDatasetError, match=r"^heldout fraction must be in \[0, 1\), got -0.1$"):
        build_small(tmp_path, heldout_fraction=-0.1)


def test_cli_builds_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "icons"
    args = ["data", "icons", str(out), "--size", "16", "--colors", "2", "--limit", "10", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"icon dataset in {out}: 10 icons x 2 colours = 20 images of 16x16 px" in printed
    assert "splits: train " in printed and "heldout 1" in printed
    assert "rendered 20, reused 0, removed 0, skipped 0" in printed
    assert len(read_manifest(out)) == 20


def test_cli_reports_a_bad_option(tmp_path, capsys):
    status = main(["data", "icons", str(tmp_path), "--colors", "9", "--no-progress"])
    assert status == 2
    assert capsys.readouterr().err == "duomodal: error: colors must be between 1 and 8, got 9\n"


def test_the_dataset_reads_as_captioned_records(small_dataset):
    from duomodal.data.records import hash_split, load_records

    out, summary = small_dataset
    records = load_records(out)
    assert len(records) == summary["images"]
    by_file = {line["file"]: line for line in read_manifest(out)}
    for record in records:
        line = by_file[record.path.relative_to(out).as_posix()]
        assert record.split == line["split"]
        assert record.captions == tuple(line["caption"])
        assert record.labels == {"icon": line["icon"], "color": line["color"]}
        if record.split != "heldout":  # the validation images are the ones the shared hash rule picks
            assert record.split == hash_split(line["file"], 0.05)


def test_cli_overwrite_flag(tmp_path, capsys):
    base = ["data", "icons", str(tmp_path), "--colors", "2", "--limit", "3", "--heldout-fraction", "0"]
    base.append("--no-progress")
    assert main([*base, "--size", "16"]) == 0
    assert main([*base, "--size", "12"]) == 2
    assert "already holds an icon dataset built with size 16 (asked 12)" in capsys.readouterr().err
    assert main([*base, "--size", "12", "--overwrite"]) == 0
    assert "rendered 6, reused 0, removed 0" in capsys.readouterr().out
