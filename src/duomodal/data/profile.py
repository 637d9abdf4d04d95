"""The facts of a captioned-icon dataset that evaluation reads: its palette, how its captions word
an icon in a colour, and wordings that no caption uses.

The icon builder (``icons.py``) writes datasets by these facts; evaluation reads them here (``read_profile``
for a dataset's own palette), so it never depends on the builder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from duomodal.files import load_json

SUMMARY_FILE = "dataset.json"  # an icon dataset's summary: size, palette, counts, build options

# The fixed palette, ordered so that the first few colours are the most distinct from each other
# (``colors=k`` takes the first k). Hex values are Material Design 600/700 shades, except black.
PALETTE: dict[str, str] = {
    "red": "#e53935",
    "green": "#43a047",
    "blue": "#1e88e5",
    "black": "#000000",
    "yellow": "#fbc02d",
    "purple": "#8e24aa",
    "orange": "#fb8c00",
    "pink": "#f06292",
}


@dataclass(frozen=True)
class DatasetProfile:
    """What evaluation knows of a dataset besides its records."""

    palette: dict[str, str]  # colour name -> "#rrggbb", in the dataset's order


def read_profile(root: str | os.PathLike) -> DatasetProfile:
    """The profile of the dataset at `root`: the palette of its summary (dataset.json, which a pack
    copies beside its shards), else the icon recipe's PALETTE."""
    summary = Path(root) / SUMMARY_FILE
    if summary.is_file():
        palette = load_json(summary).get("palette")
        if isinstance(palette, dict) and palette and all(isinstance(v, str) for v in palette.values()):
            return DatasetProfile(dict(palette))
    return DatasetProfile(dict(PALETTE))


def icon_words(slug: str) -> str:
    """The icon's name as words: "heart-outline" -> "heart outline"."""
    return " ".join(part for part in slug.split("-") if part)


_A_BEFORE_U = ("uni", "usb", "use", "usu", "ura", "ure", "uro", "ubuntu", "umb", "utr")


def _article(word: str) -> str:
    """ "a" or "an" before `word` (good enough for icon names and colour names)."""
    lowered = word.lower()
    if lowered[:1] in ("a", "e", "i", "o"):
        return "an"
    if lowered[:1] == "u" and not lowered.startswith(_A_BEFORE_U):
        return "an"
    return "a"


def captions_for(slug: str, color: str) -> tuple[str, ...]:
    """Several phrasings of "this icon in this colour", so that models learn words, not one template."""
    name = icon_words(slug)
    return (
        f"{_article(color)} {color} {name} icon",
        f"{name}, {color}",
        f"{color} {name}",
        f"an icon of {_article(name)} {name} in {color}",
        f"{_article(name)} {name} icon in {color}",
        f"{name} in {color}",
    )


# Phrasings of "this icon in this colour" that neither `captions_for` nor the caption augmentation
# (data/captions.py) writes, with words no icon name has ("clipart", "shaded", "tinted", "painted"...),
# some right beside the colour word: the evaluation asks with them whether a model follows a prompt
# worded as a user would word it.
UNSEEN_PHRASINGS = (
    "{name} clipart, {color}",
    "please show {a} {name} shaded {color}",
    "{color} tinted {name} graphic",
    "{a} {name} sketch painted {color}",
)


def unseen_phrasing(slug: str, color: str, index: int) -> str:
    """Phrasing `index` (cycled) of UNSEEN_PHRASINGS for the icon in the colour."""
    name = icon_words(slug)
    template = UNSEEN_PHRASINGS[index % len(UNSEEN_PHRASINGS)]
    return template.format(name=name, color=color, a=_article(name))
