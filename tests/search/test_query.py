"""Query parsing and query vectors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duomodal.search.query import (
    MAX_QUERY_CHARS,
    QUERY_PATTERN,
    SPACE_CHARS,
    QueryError,
    parse_query,
    query_vector,
)

QUERY_RE = re.compile(QUERY_PATTERN)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat looking surprised", [(1.0, "a cat looking surprised")]),
        ("beach -people", [(1.0, "beach"), (-1.0, "people")]),
        ("  sunny beach   -red boats +palm trees ", [(1.0, "sunny beach"), (-1.0, "red boats"), (1.0, "palm trees")]),
        ("2*beach -0.5*people", [(2.0, "beach"), (-0.5, "people")]),
        ("+.5*sea shore", [(0.5, "sea shore")]),
        ("red t-shirt", [(1.0, "red t-shirt")]),
        ("cats -dogs", [(1.0, "cats"), (-1.0, "dogs")]),
        ("cats -small dogs", [(1.0, "cats"), (-1.0, "small dogs")]),
    ],
)
def test_parse_query(text, expected):
    assert parse_query(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "query is empty; type what to search for, e.g. 'beach -people'"),
        ("   ", "query is empty; type what to search for, e.g. 'beach -people'"),
        ("-people", "query '-people' has only negative terms; add a positive one, e.g. 'beach -people'"),
        ("beach -", "query 'beach -' has a '+' or '-' term with no words after it"),
        ("0*beach", "term '0*beach' has weight 0; drop it or give a weight above 0"),
        ("500*beach", "term '500*beach' has weight 500; the limit is 100"),
        ("x" * (MAX_QUERY_CHARS + 1), f"query is {MAX_QUERY_CHARS + 1} characters long; the limit is {MAX_QUERY_CHARS}"),
    ],
)
def test_parse_query_errors(text, message):
    with pytest.raises(QueryError) as e:
        parse_query(text)
    assert str(e.value) == message


class AxisEmbedder:
    """Text 'aN' -> unit vector on axis N; images -> unit vector on axis given by image.info['axis']."""

    model_id = "axes"
    dim = 4

    def embed_texts(self, texts):
        return torch.eye(4)[[int(t[1:]) for t in texts]]

    def embed_images(self, images):
        return torch.eye(4)[[image for image in images]]


def test_query_vector_weights_and_negatives():
    v = query_vector(AxisEmbedder(), [(2.0, "a0"), (-1.0, "a1")])
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, np.array([2, -1, 0, 0]) / np.sqrt(5), rtol=1e-6)
    v = query_vector(AxisEmbedder(), [(1.0, "a0")], images=[(1.0, 2)])
    np.testing.assert_allclose(v, np.array([1, 0, 1, 0]) / np.sqrt(2), rtol=1e-6)


def test_query_vector_errors():
    with pytest.raises(QueryError, match="^a query needs at least one text or image$"):
        query_vector(AxisEmbedder())
    with pytest.raises(QueryError) as e:
        query_vector(AxisEmbedder(), [(1.0, "a0"), (-1.0, "a0")])
    assert str(e.value) == "the query's terms cancel out (their weighted sum is zero); change a weight or a term"


# --- the query pattern (the OpenAPI schema states it; pydantic enforces it) ------------------------

GRAMMAR_CHARS = list("ab 0123.*+-") + ["\u00a0", "\u3000", "\u2028", "\x00", "\x1f", "\t", "\x85", "é", "٢"]


def _parses(text: str) -> bool:
    try:
        parse_query(text)
    except QueryError:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)  # control characters: refused


@settings(max_examples=3000, derandomize=True, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from(GRAMMAR_CHARS), max_size=16))
def test_the_query_pattern_accepts_exactly_what_parse_query_accepts(text):
    assert bool(QUERY_RE.fullmatch(text)) == _parses(text)


def test_the_query_pattern_means_the_same_to_pydantic():
    from typing import Annotated

    import pydantic

    adapter = pydantic.TypeAdapter(Annotated[str, pydantic.StringConstraints(pattern=QUERY_PATTERN)])
    for text in ["beach -people", "-people beach", "0*red", "2* red", "a\u3000-\u3000b", "x\x00", "+", "1.2.3*x"]:
        try:
            adapter.validate_python(text)
            accepted = True
        except pydantic.ValidationError:
            accepted = False
        assert accepted == _parses(text), text


def test_space_chars_are_python_white_space_without_control_characters():
    spaces = {chr(c) for c in range(0x110000) if chr(c).isspace() and not (c < 0x20 or 0x7F <= c <= 0x9F)}
    listed = set(re.findall(f"[{SPACE_CHARS}]", "".join(sorted(spaces | {"x"}))))
    assert listed == spaces


def test_query_vector_bounds_the_terms():
    class Never:
        dim = 4

        def embed_texts(self, texts):
            raise AssertionError("not reached")

    with pytest.raises(QueryError, match=r"^query has 257 terms; the limit is 256$"):
        query_vector(Never(), texts=[(1.0, "a")] * 257)
