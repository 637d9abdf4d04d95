"""A rendered meme corpus: images with top and bottom captions, made from a seed, for measuring
how well a remembered phrase finds its meme (OCR, CLIP, hybrid search).

Each meme is drawn at its own size over a background of icons (material-design-icons-pack, as the
icon dataset renders them) or of photo-like noise (smooth colour fields with grain), with a top
caption, a bottom caption or both, in one of two styles:

- ``outline``: white capitals with a black outline, drawn over the picture (the classic meme);
- ``plain``: black text in sentence case on a white band above or below the picture.

Fonts are the DejaVu and STIX faces that matplotlib ships (a dependency), so the same seed draws
the same pixels on any machine with the same Pillow and FreeType. A fraction of the images carry
no text at all. Every meme with text remembers one phrase: three consecutive words of one of its
captions, which the benchmark and the tests search for.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from duomodal.data.icons import load_icons, render_icon
from duomodal.data.profile import PALETTE

TRUTH_FILE = "memes.jsonl"
STYLES = ("outline", "plain")
BACKGROUNDS = ("icons", "noise")
PHRASE_WORDS = 3
# matplotlib's bundled faces: bold sans and serif for captions, a book face for plain text
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSans.ttf",
              "STIXGeneralBol.ttf")
SIDES = (320, 384, 448, 512)
MAX_LINES = 3  # lines per caption
MIN_TEXT_PX = 18  # the smallest font size a caption shrinks to

# Everyday words of meme captions; captions are random runs of them, so a 3-word phrase is
# almost always unique to its meme (the truth file says which meme it came from either way).
WORDS = tuple("""
when you finally get the code to work first time and then realize it was never running at all
my boss asks why the build is broken again nobody knows how this happened but here we are
me trying to explain monday morning coffee before meetings start every single week forever
cat dog pizza homework weekend friday tuesday deadline printer keyboard mouse laptop screen
password update server database coffee tea lunch dinner breakfast sleep alarm phone battery
charger internet wifi router email inbox meeting calendar vacation beach mountain rain snow
summer winter spring autumn garden kitchen fridge oven toaster sandwich cookie cake chocolate
banana apple orange lemon potato tomato cheese butter bread noodle rice soup salad burger taco
teacher student exam grade school class lesson library book paper pencil marker office desk
chair window door stairs elevator parking traffic train plane ticket airport hotel passport
brother sister mother father uncle cousin neighbor friend stranger doctor dentist pilot chef
happy angry tired hungry sleepy lazy brave quiet loud strange normal perfect broken secret
always never maybe later soon today tomorrow yesterday tonight suddenly slowly quickly again
nobody everybody someone something nothing everything anything somewhere nowhere everywhere
running jumping dancing singing cooking reading writing coding sleeping eating waiting
looking thinking dreaming walking driving flying swimming shopping cleaning fixing breaking
small giant tiny huge ancient modern famous hidden golden silver purple yellow green blue
""".split())


@dataclass(frozen=True)
class Meme:
    """One image of the corpus and what is written on it."""

    file: str  # relative to the corpus folder, "/" separators
    width: int
    height: int
    top: str  # the caption as drawn ("" for none)
    bottom: str
    style: str  # one of STYLES ("" for an image without text)
    background: str  # one of BACKGROUNDS
    font: str  # one of FONT_FILES ("" without text)
    phrase: str  # the remembered phrase, lower case ("" without text)
    seed: int  # the meme's own seed (background, placement)

    @property
    def text(self) -> str:
        return " ".join(t for t in (self.top, self.bottom) if t)


def plan_memes(count: int, seed: int = 0, textless: int = 0) -> list[Meme]:
    """`count` memes with text and `textless` images without, shuffled, named by position."""
    if count < 0 or textless < 0:
        raise ValueError(f"counts must be >= 0, got count={count}, textless={textless}")
    rng = random.Random(seed)
    kinds = [True] * count + [False] * textless
    rng.shuffle(kinds)
    memes = []
    for number, has_text in enumerate(kinds):
        width = rng.choice(SIDES)
        height = rng.choice(SIDES)
        background = rng.choice(BACKGROUNDS)
        meme_seed = rng.getrandbits(32)
        name = f"memes/{number // 100:03d}/meme-{number:05d}.{'jpg' if number % 3 == 0 else 'png'}"
        if not has_text:
            memes.append(Meme(name, width, height, "", "", "", background, "", "", meme_seed))
            continue
        style = rng.choice(STYLES)
        lines = rng.choice(("top", "bottom", "both", "both"))
        top = _caption(rng) if lines in ("top", "both") else []
        bottom = _caption(rng) if lines in ("bottom", "both") else []
        source = rng.choice([c for c in (top, bottom) if c])
        start = rng.randrange(len(source) - PHRASE_WORDS + 1)
        phrase = " ".join(source[start : start + PHRASE_WORDS])
        top_text, bottom_text = (_cased(" ".join(c), style) for c in (top, bottom))
        font = rng.choice(FONT_FILES if style == "plain" else FONT_FILES[:3] + FONT_FILES[4:])
        memes.append(Meme(name, width, height, top_text, bottom_text, style, background, font, phrase, meme_seed))
    return memes


def _caption(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(PHRASE_WORDS, 7))]


def _cased(text: str, style: str) -> str:
    if not text:
        return ""
    return text.upper() if style == "outline" else text[0].upper() + text[1:]


def render_meme(meme: Meme) -> Image.Image:
    """The meme drawn as an RGB image of its planned size."""
    rng = np.random.default_rng(meme.seed)
    band = {"top": 0, "bottom": 0}
    if meme.style == "plain":  # white bands that hold the text, picture between them
        for side, text in (("top", meme.top), ("bottom", meme.bottom)):
            if text:
                band[side] = _text_block_height(text, meme, meme.width)
    picture_height = max(meme.height - band["top"] - band["bottom"], meme.height // 3)
    picture = _background(meme.background, meme.width, picture_height, rng)
    canvas = Image.new("RGB", (meme.width, band["top"] + picture_height + band["bottom"]), "white")
    canvas.paste(picture, (0, band["top"]))
    draw = ImageDraw.Draw(canvas)
    for side, text in (("top", meme.top), ("bottom", meme.bottom)):
        if text:
            _draw_caption(draw, text, meme, side, canvas.size, band[side])
    return canvas.resize((meme.width, meme.height)) if canvas.size != (meme.width, meme.height) else canvas


def write_corpus(folder: str | os.PathLike, count: int, seed: int = 0, textless: int = 0) -> list[Meme]:
    """Render the memes of ``plan_memes(count, seed, textless)`` under `folder` and write the truth
    (one JSON line per meme, TRUTH_FILE, outside the images' subfolder). Returns the memes."""
    folder = Path(folder)
    memes = plan_memes(count, seed, textless)
    for meme in memes:
        path = folder / meme.file
        path.parent.mkdir(parents=True, exist_ok=True)
        image = render_meme(meme)
        if path.suffix == ".jpg":
            image.save(path, quality=85)
        else:
            image.save(path)
    with open(folder / TRUTH_FILE, "w", encoding="utf-8") as f:
        for meme in memes:
            f.write(json.dumps(asdict(meme)) + "\n")
    return memes


def read_truth(folder: str | os.PathLike) -> list[Meme]:
    with open(Path(folder) / TRUTH_FILE, encoding="utf-8") as f:
        return [Meme(**json.loads(line)) for line in f if line.strip()]


# --- drawing ------------------------------------------------------------------------------------


@cache
def _font_path(name: str) -> str:
    import matplotlib  # lazy: only to find its bundled fonts, when a meme is drawn

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(name), size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, stroke: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) + 2 * stroke <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _layout(text: str, meme: Meme, width: int) -> tuple[ImageFont.FreeTypeFont, list[str], int]:
    """The largest font size (down to MIN_TEXT_PX) at which `text` fits in MAX_LINES lines of `width`."""
    usable = int(width * 0.92)
    size = max(MIN_TEXT_PX, width // (9 if meme.style == "outline" else 13))
    while True:
        font = _font(meme.font, size)
        stroke = max(1, size // 12) if meme.style == "outline" else 0
        lines = _wrap(text, font, usable, stroke)
        widest = max(font.getlength(line) + 2 * stroke for line in lines)
        if (len(lines) <= MAX_LINES and widest <= usable) or size <= MIN_TEXT_PX:
            return font, lines, stroke
        size -= 2


def _line_height(font: ImageFont.FreeTypeFont, stroke: int) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2 * stroke


def _text_block_height(text: str, meme: Meme, width: int) -> int:
    font, lines, stroke = _layout(text, meme, width)
    return len(lines) * _line_height(font, stroke) + 2 * (_line_height(font, stroke) // 3)


def _draw_caption(draw: ImageDraw.ImageDraw, text: str, meme: Meme, side: str, size: tuple[int, int], band: int):
    width, height = size
    font, lines, stroke = _layout(text, meme, width)
    step = _line_height(font, stroke)
    block = len(lines) * step
    margin = step // 3
    y = margin if side == "top" else height - block - margin
    if meme.style == "plain" and side == "bottom":
        y = height - band + margin
    for line in lines:
        x = (width - font.getlength(line)) / 2
        if meme.style == "outline":
            draw.text((x, y), line, font=font, fill="white", stroke_width=stroke, stroke_fill="black")
        else:
            draw.text((x, y), line, font=font, fill="black")
        y += step


def _background(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    return _icon_background(width, height, rng) if kind == "icons" else _noise_background(width, height, rng)


def _noise_background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields at two scales plus grain: the statistics of a photo, none of its content."""
    coarse = rng.uniform(0, 255, (3, 4, 3))
    coarse = (0.5 * coarse + 0.5 * coarse.mean(axis=2, keepdims=True)).astype(np.uint8)  # photo-like saturation
    fine = rng.uniform(-40, 40, (12, 12, 3))
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    detail = np.asarray(Image.fromarray((fine + 128).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    grain = rng.normal(0, 10, (height, width, 3))
    pixels = base + (detail.astype(np.float32) - 128) + grain
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.6))


@cache
def _icons() -> tuple:
    return tuple(load_icons(limit=400))


def _icon_background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A flat or two-tone background with a few coloured icons scattered over it."""
    colours = list(PALETTE.values())
    tint = tuple(int(c) for c in rng.integers(150, 256, 3))
    image = Image.new("RGB", (width, height), tint)
    icons = _icons()
    for _ in range(int(rng.integers(1, 5))):
        icon = icons[int(rng.integers(len(icons)))]
        side = int(rng.integers(min(width, height) // 4, min(width, height) * 3 // 4))
        rendered = render_icon(icon.svg, colours[int(rng.integers(len(colours)))], side)
        mask = Image.eval(rendered.convert("L"), lambda v: 255 if v < 250 else 0)
        x = int(rng.integers(-side // 4, max(1, width - side * 3 // 4)))
        y = int(rng.integers(-side // 4, max(1, height - side * 3 // 4)))
        image.paste(rendered, (x, y), mask)
    return image


def phrase_in(text: str, phrase: str) -> bool:
    """Whether the words of `phrase` appear consecutively in `text` (case and punctuation ignored)."""
    return f" {' '.join(_words(phrase))} " in f" {' '.join(_words(text))} "


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def sample(memes: Sequence[Meme], n: int, seed: int = 0) -> list[Meme]:
    """`n` of the memes that carry text, chosen with `seed` (for queries)."""
    with_text = [m for m in memes if m.phrase]
    return random.Random(seed).sample(with_text, min(n, len(with_text)))
