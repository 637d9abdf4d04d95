"""Filters pushed into SQL before the top k: exact scoring of the admitted images, the vector-index
fallback for large selections, the cut-off and date order, and filters in hybrid search."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from duomodal.search import filters as filters_module
from duomodal.search.build import build_index
from duomodal.search.filters import SearchFilters, filtered_search, filters_from_text, parse_size
from duomodal.search.index import ImageIndex
from duomodal.search.query import parse_query, query_vector

from .conftest import FakeEmbedder


@pytest.fixture
def index_dir(shape_dataset, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    (photos / "blues").mkdir()
    for path in sorted(photos.glob("blue_*"))[:3]:
        path.rename(photos / "blues" / path.name)
    build_index(photos, tmp_path / "idx", FakeEmbedder(), progress=False)
    return tmp_path / "idx"


def test_exact_scoring_of_the_admitted_images_equals_brute_force(index_dir):
    vector = query_vector(FakeEmbedder(), parse_query("blue"))
    with ImageIndex.open(index_dir) as index:
        everything = index.search(vector, 100)
        hits = filtered_search(index, vector, 2, SearchFilters(folder="blues"))
        truth = [h for h in everything if h.path.startswith("blues/")][:2]
        assert all(h.path.startswith("blues/") for h in hits)  # the dataset holds copies: ties, so scores
        assert [h.score for h in hits] == pytest.approx([h.score for h in truth], abs=1e-5)
        # the admitted images are found even where they are far from the top k of all images
        red = query_vector(FakeEmbedder(), parse_query("red"))
        in_blues = [h for h in everything if h.path.startswith("blues/")]
        assert len(in_blues) >= 2 and len(filtered_search(index, red, 3, SearchFilters(folder="blues"))) == min(3, len(in_blues))


def test_a_large_selection_searches_the_vector_index_and_keeps_the_admitted(index_dir, monkeypatch):
    monkeypatch.setattr(filters_module, "EXACT_FILTER_MAX", 2)
    vector = query_vector(FakeEmbedder(), parse_query("blue"))
    with ImageIndex.open(index_dir) as index:
        hits = filtered_search(index, vector, 5, SearchFilters(formats=("png",), min_score=0.0))
        assert [h.score for h in hits] == pytest.approx([h.score for h in index.search(vector, 5)], abs=1e-6)
        few = filtered_search(index, vector, 5, SearchFilters(folder="blues", max_bytes=10**9))
        assert {h.path for h in few} <= {h.path for h in index.search(vector, 40) if h.path.startswith("blues/")}


def test_cut_off_and_date_order(index_dir):
    vector = query_vector(FakeEmbedder(), parse_query("blue"))
    with ImageIndex.open(index_dir) as index:
        ranked = index.search(vector, 24)
        threshold = ranked[5].score
        cut = filtered_search(index, vector, 24, SearchFilters(min_score=threshold))
        assert [h.score for h in cut] == pytest.approx([h.score for h in ranked if h.score >= threshold], abs=1e-6)
        assert min(h.score for h in cut) >= threshold
        dated = filtered_search(index, vector, 24, SearchFilters(sort="date"))
        assert [h.mtime_ns for h in dated] == sorted((h.mtime_ns for h in ranked), reverse=True)


def test_the_sql_selection_and_the_python_predicate_agree(index_dir):
    from duomodal.search.filters import admitted_ids

    with ImageIndex.open(index_dir) as index:
        hits = [index.get(i) for i in range(1, 40) if index.get(i) is not None]
        mtimes = sorted(h.mtime_ns for h in hits)
        for filters in (SearchFilters(folder="blues"), SearchFilters(formats=("png",), max_bytes=hits[0].size),
                        SearchFilters(after=mtimes[len(mtimes) // 2] / 1e9), SearchFilters(before=mtimes[3] / 1e9),
                        SearchFilters(min_bytes=10**9), SearchFilters(folder="nowhere/..")):
            assert set(admitted_ids(index_dir, filters, 1000)) == {h.id for h in hits if filters.admits(h)}


def test_filter_values_are_read_and_checked():
    assert parse_size("250k", "x") == 256_000 and parse_size("2M", "x") == 2 * 1024**2 and parse_size("10", "x") == 10
    filters = filters_from_text(folder="/a/b/", formats=["JPG,png", "tif"], after="2024-05-01")
    assert filters.folder == "a/b" and filters.formats == ("jpeg", "png", "tiff") and filters.selects
    where, params = SearchFilters(folder="50%_off").where()
    assert "ESCAPE" in where and params == ["50\\%\\_off/%"]
    assert not SearchFilters().active and SearchFilters(sort="date").active and not SearchFilters(min_score=0.1).selects
    assert np.isclose(filters.after, filters_from_text(after="2024-05-01T00:00").after)
