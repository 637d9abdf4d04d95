"""Search queries: weighted text terms with negatives ("beach -people"), images, and their mix.

Query syntax (one string): terms separated by ``+`` or ``-`` at the start of a word; a term's
words run until the next such word. ``-`` subtracts the term, ``+`` (or nothing, for the first
term) adds it. A term may start with a weight ``W*``: ``"2*sunset +0.5*boat -people"``.
A hyphen inside a word (``t-shirt``) is part of the word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

MAX_QUERY_CHARS = 500
# A term needs at least two characters and a space, so 500 characters hold at most ~170 terms: the
# character limit bounds the work, this only guards the library's own callers.
MAX_TERMS = 256
MAX_WEIGHT = 100.0
_WEIGHT = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\*(.*)$")  # ASCII digits only


def _query_pattern() -> str:
    """The regular expression of every query `parse_query` accepts (no control characters), in the
    syntax Python, Rust (pydantic) and JavaScript (OpenAPI clients) read alike: no lookaround, the
    space characters listed as themselves. tests/search/test_query.py checks the two agree."""
    ctrl = "\\x00-\\x1f\\x7f-\\x9f"
    space = SPACE_CHARS
    word = f"[^{ctrl}{space}]"
    s = f"[{space}]"

    def word_not(chars: str) -> str:
        return f"[^{chars}{ctrl}{space}]"

    weight = "(?:0*[1-9][0-9]?(?:\\.[0-9]*)?|0*100(?:\\.0*)?|0*\\.0*[1-9][0-9]*)"  # 0 < w <= 100

    def plain(first: str) -> str:  # a non-empty term body that does not start with a weight
        return (
            f"(?:{first}{word}*"
            f"|[0-9]+(?:{word_not('0-9.*')}{word}*|\\.[0-9]*(?:{word_not('0-9*')}{word}*)?)?"
            f"|\\.(?:{word_not('0-9')}{word}*|[0-9]+(?:{word_not('0-9*')}{word}*)?)?)"
        )

    signs = "+\\-"
    more = f"{s}+{word_not(signs)}{word}*"  # a word that continues the term before it

    def term(first: str, signed: bool = True) -> str:
        # After a sign the body may be empty ("+ red"); a term's words follow it then.
        bare_weight = f"(?:{weight}\\*)?" if signed else f"{weight}\\*"
        return f"(?:(?:{weight}\\*{word}+|{plain(first)})(?:{more})*|{bare_weight}(?:{more})+)"

    any_term = term(word_not("0-9."))
    first = f"(?:\\+{any_term}|{term(word_not('0-9.' + signs), signed=False)})"
    negative = f"-{any_term}"
    return (
        f"^{s}*(?:{first}|{negative}(?:{s}+{negative})*{s}+\\+{any_term})(?:{s}+[{signs}]{any_term})*{s}*$"
    )


# Python's white space (what str.split splits on) without the control characters, which queries
# may not hold at all.
SPACE_CHARS = " \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
QUERY_PATTERN = _query_pattern()


class QueryError(ValueError):
    """A query that cannot be searched for; the message says what to change."""


class CancelledQueryError(QueryError):
    """A well-formed query whose weighted terms sum to zero ("cat -cat"): nothing to search for."""


class Embedder(Protocol):
    model_id: str
    dim: int

    def embed_images(self, images: list[Any]) -> Any: ...

    def embed_texts(self, texts: list[str]) -> Any: ...


def parse_query(text: str) -> list[tuple[float, str]]:
    """``"2*beach -people"`` -> ``[(2.0, "beach"), (-1.0, "people")]``."""
    if not isinstance(text, str):
        raise QueryError(f"query must be a string, got {type(text).__name__}")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
    words = text.split()
    if not words:
        raise QueryError("query is empty; type what to search for, e.g. 'beach -people'")
    terms: list[tuple[float, list[str]]] = []
    for position, word in enumerate(words):
        starts_term = word[0] in "+-" or position == 0
        if not starts_term:
            terms[-1][1].append(word)
            continue
        sign = -1.0 if word[0] == "-" else 1.0
        body = word[1:] if word[0] in "+-" else word
        weight = 1.0
        match = _WEIGHT.match(body)
        if match:
            weight = float(match.group(1))
            body = match.group(2)
            if weight == 0.0:
                raise QueryError(f"term {word!r} has weight 0; drop it or give a weight above 0")
            if weight > MAX_WEIGHT:
                raise QueryError(f"term {word!r} has weight {weight:g}; the limit is {MAX_WEIGHT:g}")
        terms.append((sign * weight, [body] if body else []))
    parsed = []
    for weight, term_words in terms:
        phrase = " ".join(term_words)
        if not phrase:
            raise QueryError(f"query {text!r} has a '+' or '-' term with no words after it")
        parsed.append((weight, phrase))
    if len(parsed) > MAX_TERMS:
        raise QueryError(f"query has {len(parsed)} terms; the limit is {MAX_TERMS}")
    if not any(weight > 0 for weight, _ in parsed):
        raise QueryError(f"query {text!r} has only negative terms; add a positive one, e.g. 'beach -people'")
    return parsed


def query_vector(
    embedder: Embedder,
    texts: Sequence[tuple[float, str]] = (),
    images: Sequence[tuple[float, Any]] = (),
) -> np.ndarray:
    """The normalised weighted sum of the embedded texts and images, as float32 (D,)."""
    if not texts and not images:
        raise QueryError("a query needs at least one text or image")
    if len(texts) + len(images) > MAX_TERMS:
        raise QueryError(f"query has {len(texts) + len(images)} terms; the limit is {MAX_TERMS}")
    weights: list[float] = []
    parts = []
    for items, embed in ((texts, embedder.embed_texts), (images, embedder.embed_images)):
        if not items:
            continue
        vectors = np.asarray(embed([x for _, x in items]), dtype=np.float64)
        if vectors.shape != (len(items), embedder.dim):
            raise QueryError(
                f"the embedder returned shape {vectors.shape}, expected ({len(items)}, {embedder.dim})"
            )
        weights += [float(w) for w, _ in items]
        parts.append(vectors)
    return combine_terms(weights, np.concatenate(parts))


def combine_terms(weights: Sequence[float], vectors: np.ndarray) -> np.ndarray:
    """The normalised weighted sum of embedded terms `vectors` (n, D), as float32 (D,)."""
    total = np.asarray(weights, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise CancelledQueryError(
            "the query's terms cancel out (their weighted sum is zero); change a weight or a term"
        )
    return (total / norm).astype(np.float32)
