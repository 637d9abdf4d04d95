"""The plan of the icon dataset: the icons of the Material Design Icons set, the palette, each
(icon, colour) image's file, captions and split, and the held-out combinations (see ``icons.py`` for
the dataset this plans, and how it is rendered and written)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import material_design_icons_pack as mdi

from duomodal.data.profile import PALETTE, captions_for
from duomodal.data.record_types import hash_split

IMAGES_DIR = "images"
NAME_SEPARATOR = "__"


class IconDatasetError(ValueError):
    """An option of the icon dataset build that cannot be honoured."""


@dataclass(frozen=True)
class IconSource:
    """One icon of the set: its slug (``heart-outline``) and its SVG markup."""

    slug: str
    svg: str
    deprecated: bool = False


@dataclass(frozen=True)
class IconImage:
    """One image of the dataset: an icon in a colour, with its captions and split."""

    icon: str
    color: str
    file: str  # relative to the dataset root, with forward slashes: images/<icon>__<color>.png
    captions: tuple[str, ...]
    split: str  # "train" | "val" | "heldout"

    @property
    def heldout(self) -> bool:
        return self.split == "heldout"

    def manifest_line(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "caption": list(self.captions),
            "icon": self.icon,
            "color": self.color,
            "split": self.split,
            "heldout": self.heldout,
        }


# --- icons, palette, captions -------------------------------------------------------------------


def load_icons(include_deprecated: bool = False, limit: int | None = None) -> list[IconSource]:
    """The icons of material-design-icons-pack sorted by slug; the first `limit` when given."""
    icons = []
    for name in mdi.__all__:
        if not name.isupper():
            continue
        icon = getattr(mdi, name)
        if icon.deprecated and not include_deprecated:
            continue
        icons.append(IconSource(slug=icon.slug, svg=icon.svg, deprecated=bool(icon.deprecated)))
    icons.sort(key=lambda icon: icon.slug)
    if limit is not None:
        icons = icons[:limit]
    return icons


def palette(colors: int = 8) -> dict[str, str]:
    """The first `colors` colours of PALETTE, name -> "#rrggbb"."""
    if not 1 <= colors <= len(PALETTE):
        raise IconDatasetError(f"colors must be between 1 and {len(PALETTE)}, got {colors}")
    return dict(list(PALETTE.items())[:colors])


def image_file(slug: str, color: str) -> str:
    return f"{IMAGES_DIR}/{slug}{NAME_SEPARATOR}{color}.png"


# --- splits -------------------------------------------------------------------------------------


def split_for_path(relative_path: str, val_fraction: float) -> str:
    """ "val" or "train" for a file, by hashing its path relative to the dataset root.

    The rule of every captioned-image dataset (`records.hash_split`), so adding files never moves
    an old one and a manifest without splits would give the same validation images.
    """
    return hash_split(relative_path, val_fraction)


def choose_heldout(
    icons: Sequence[str],
    colors: Sequence[str],
    fraction: float,
    seed: int,
    val_fraction: float = 0.0,
) -> set[tuple[str, str]]:
    """A seeded set of (icon, colour) pairs to keep out of training.

    ``round(fraction * len(icons) * len(colors))`` pairs are chosen in an order fixed by a hash of
    (seed, icon, colour), skipping any pair whose removal would leave its icon or its colour with
    no image in the train split (images that hash into validation do not count as training).
    Fewer pairs are held out only when those constraints leave no more candidates.
    """
    if not 0.0 <= fraction < 1.0:
        raise IconDatasetError(f"heldout fraction must be in [0, 1), got {fraction}")
    target = round(fraction * len(icons) * len(colors))
    if target == 0:
        return set()
    if len(colors) < 2:
        raise IconDatasetError(
            f"holding out (icon, colour) pairs needs at least 2 colours, got {len(colors)}; "
            "use more colours or a heldout fraction of 0"
        )
    in_train = {
        (icon, color): split_for_path(image_file(icon, color), val_fraction) == "train"
        for icon in icons
        for color in colors
    }
    train_count_icon = Counter(icon for (icon, _), train in in_train.items() if train)
    train_count_color = Counter(color for (_, color), train in in_train.items() if train)
    order = sorted(in_train, key=lambda pair: hashlib.sha1(f"{seed}:{pair[0]}:{pair[1]}".encode()).digest())
    heldout: set[tuple[str, str]] = set()
    for icon, color in order:
        if len(heldout) == target:
            break
        if in_train[icon, color]:
            if train_count_icon[icon] < 2 or train_count_color[color] < 2:
                continue
            train_count_icon[icon] -= 1
            train_count_color[color] -= 1
        elif train_count_icon[icon] < 1 or train_count_color[color] < 1:
            continue  # the icon (or colour) has no training image at all: nothing to generalise from
        heldout.add((icon, color))
    return heldout


def plan_images(
    icons: Sequence[IconSource],
    colors: Sequence[str],
    heldout_fraction: float,
    val_fraction: float,
    seed: int,
) -> list[IconImage]:
    """Every (icon, colour) image of the dataset with its captions and split, in a fixed order."""
    if not 0.0 <= val_fraction < 1.0:
        raise IconDatasetError(f"val fraction must be in [0, 1), got {val_fraction}")
    slugs = [icon.slug for icon in icons]
    heldout = choose_heldout(slugs, colors, heldout_fraction, seed, val_fraction)
    images = []
    for slug in slugs:
        for color in colors:
            file = image_file(slug, color)
            split = "heldout" if (slug, color) in heldout else split_for_path(file, val_fraction)
            images.append(IconImage(slug, color, file, captions_for(slug, color), split))
    return images
