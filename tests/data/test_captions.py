"""Caption augmentation: what each rewording does, that it is seeded, and clear config errors."""

from __future__ import annotations

import pytest
import torch

from duomodal.config import ConfigError
from duomodal.data.captions import SYNONYMS, CaptionAugmentConfig, augment_caption, insert_noise_tokens
from duomodal.data.profile import UNSEEN_PHRASINGS, captions_for, icon_words, unseen_phrasing


def draws(caption: str, config: CaptionAugmentConfig, n: int = 200) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    return [augment_caption(caption, config, generator) for _ in range(n)]


def test_off_by_default_and_each_rewording_keeps_the_words_that_matter():
    assert not CaptionAugmentConfig().enabled
    assert draws("a red heart icon", CaptionAugmentConfig()) == ["a red heart icon"] * 200
    synonyms = set(draws("a red heart icon", CaptionAugmentConfig(synonym=0.5)))
    assert synonyms == {"a red heart icon", "a red heart glyph", "a red heart pictogram"}
    swapped = set(draws("heart outline, red", CaptionAugmentConfig(swap_parts=0.5)))
    assert swapped == {"heart outline, red", "red, heart outline"}
    dropped = draws("an icon of a heart in red", CaptionAugmentConfig(word_dropout=0.3))
    assert all(d and set(d.split()) <= {"an", "icon", "of", "a", "heart", "in", "red"} for d in dropped)
    assert len(set(dropped)) > 20 and "an icon of a heart in red" in dropped
    assert draws("heart", CaptionAugmentConfig(word_dropout=0.4)) == ["heart"] * 200  # one word always stays


def test_augmentation_is_seeded_by_torch():
    config = CaptionAugmentConfig(synonym=0.5, word_dropout=0.2, swap_parts=0.5)
    assert draws("a blue star icon, blue", config) == draws("a blue star icon, blue", config)


def test_noise_tokens_go_between_bos_and_eos_when_there_is_room():
    ids = torch.tensor([2, 10, 11, 3, 0, 0])  # BOS a b EOS PAD PAD
    generator = torch.Generator().manual_seed(1)
    places = set()
    for _ in range(50):
        out, length = insert_noise_tokens(ids, 4, 4, 64, 1.0, generator)
        assert length == 5 and out[5] == 0
        place = next(k for k in range(1, 4) if int(out[k]) != int(ids[k]))  # first position that differs
        assert 4 <= int(out[place]) < 64
        assert torch.equal(torch.cat([out[:place], out[place + 1 : 5]]), ids[:4])  # the rest, in order
        places.add(place)
    assert places == {1, 2, 3}  # anywhere after BOS, before EOS
    full = torch.tensor([2, 10, 11, 12, 13, 3])
    assert torch.equal(insert_noise_tokens(full, 6, 4, 64, 1.0)[0], full)  # no room: unchanged
    assert torch.equal(insert_noise_tokens(ids, 4, 4, 64, 0.0)[0], ids)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^captions.synonym must be in \[0, 1\], got 1.5$"):
        CaptionAugmentConfig(synonym=1.5)
    with pytest.raises(ConfigError, match=r"^captions.word_dropout must be below 0.5"):
        CaptionAugmentConfig(word_dropout=0.6)


def test_unseen_phrasings_are_unseen():
    """The evaluation's reworded prompts use words that neither the icon captions nor augmentation write."""
    written = {w.strip(",") for c in captions_for("heart-outline", "red") for w in c.split()}
    written |= {w for options in SYNONYMS.values() for w in options} | set(SYNONYMS)
    framing = {w.strip(",") for p in UNSEEN_PHRASINGS for w in p.split() if not w.startswith("{")}
    assert framing and not framing & written
    assert unseen_phrasing("heart-outline", "red", 0) == "heart outline clipart, red"
    assert unseen_phrasing("anchor", "blue", 1) == "please show an anchor shaded blue"
    assert unseen_phrasing("anchor", "blue", 1 + len(UNSEEN_PHRASINGS)) == unseen_phrasing("anchor", "blue", 1)
    assert icon_words("arrow-down") in unseen_phrasing("arrow-down", "green", 3)
