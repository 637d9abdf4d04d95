"""The dataset facts evaluation reads: a dataset's palette, else the icon recipe's."""

from __future__ import annotations

import json

from duomodal.data.profile import PALETTE, SUMMARY_FILE, read_profile


def test_the_profile_holds_the_datasets_own_palette(tmp_path):
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"palette": {"teal": "#008080", "red": "#ff0000"}}))
    assert list(read_profile(tmp_path).palette.items()) == [("teal", "#008080"), ("red", "#ff0000")]


def test_without_a_usable_summary_the_profile_has_the_icon_palette(tmp_path):
    assert read_profile(tmp_path).palette == PALETTE  # no dataset.json
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"palette": {"teal": 7}}))
    assert read_profile(tmp_path).palette == PALETTE  # not colour names to "#rrggbb"
