"""Caption augmentation: other ways of saying what a caption says, drawn anew for every training item.

A dataset's captions come in a few phrasings (the icon recipe writes six). A model trained on them
alone learns those templates: a prompt worded otherwise, or holding a word no caption had, loses
the colour or the object. Augmenting each training caption makes the words that matter carry the
conditioning instead of the template:

- synonyms: a word with synonyms (``icon`` -> ``glyph``, ``pictogram``) is replaced by one of them;
- word dropout: each word is left out with a small probability (never the only word);
- part swap: a caption of comma-separated parts (``heart, red``) has its parts in reverse order;
- noise tokens (applied to token ids, by ``insert_noise_tokens``): a random vocabulary token is put at
  a random place, which is what an unseen word looks like to the model (pieces of other words).

Every random draw comes from torch's generator, which the training loop seeds per item, so an
augmented run is as reproducible and resumable as a plain one. Nothing here knows a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from duomodal.config import ConfigError

# What augmentation may substitute: only the captions' own framing word, and only with words that are
# no object's name ("symbol" and "emoji" are icon names). The evaluation's unseen phrasings (data/icons.py)
# use none of these words, so that they stay unseen.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "icon": ("glyph", "pictogram"),
}
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class CaptionAugmentConfig:
    synonym: float = 0.0  # chance that each word with synonyms is replaced by one of them
    word_dropout: float = 0.0  # chance that each word is left out (at least one word stays)
    swap_parts: float = 0.0  # chance that the comma-separated parts of a caption swap order
    noise_tokens: float = 0.0  # chance that one random vocabulary token is inserted into the caption

    def __post_init__(self) -> None:
        for name in ("synonym", "word_dropout", "swap_parts", "noise_tokens"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"captions.{name} must be in [0, 1], got {value}")
        if self.word_dropout >= 0.5:
            raise ConfigError(f"captions.word_dropout must be below 0.5 (most words must stay), got {self.word_dropout}")

    @property
    def enabled(self) -> bool:
        return any((self.synonym, self.word_dropout, self.swap_parts, self.noise_tokens))

    @property
    def rewrites_text(self) -> bool:
        """Whether augmentation changes the words (and so needs the caption re-tokenized)."""
        return any((self.synonym, self.word_dropout, self.swap_parts))


def _chance(probability: float, generator: torch.Generator | None) -> bool:
    return probability > 0 and float(torch.rand((), generator=generator)) < probability


def _pick(options: tuple[str, ...], generator: torch.Generator | None) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def augment_caption(caption: str, config: CaptionAugmentConfig, generator: torch.Generator | None = None) -> str:
    """One random rewording of `caption` under `config` (the caption itself when nothing fires)."""
    text = caption
    if "," in text and _chance(config.swap_parts, generator):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        text = ", ".join(reversed(parts))
    words = _WORD.findall(text)
    if config.synonym > 0:
        words = [_synonym(w, generator) if _chance(config.synonym, generator) else w for w in words]
    if config.word_dropout > 0 and len(words) > 1:
        kept = [w for w in words if not _chance(config.word_dropout, generator)]
        words = kept or [words[int(torch.randint(len(words), (), generator=generator))]]
    return " ".join(words)


def _synonym(word: str, generator: torch.Generator | None) -> str:
    """`word` with its core (without trailing punctuation) replaced by a synonym, if it has one."""
    core = word.rstrip(",.;:")
    options = SYNONYMS.get(core.lower())
    if not options:
        return word
    return _pick(options, generator) + word[len(core):]


def insert_noise_tokens(ids: torch.Tensor, length: int, low: int, high: int, probability: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """With `probability`, one random token id in [low, high) inserted into `ids` (T,) at a random place
    between BOS (position 0) and the EOS at `length` - 1, when the context has room for it.

    Returns (ids, length) after the insertion."""
    if length >= ids.shape[0] or not _chance(probability, generator) or high <= low:
        return ids, length
    position = 1 + int(torch.randint(length - 1, (), generator=generator))  # before EOS at the latest
    token = int(torch.randint(low, high, (), generator=generator))
    out = ids.clone()
    out[position + 1 : length + 1] = ids[position:length]
    out[position] = token
    return out, length + 1
