"""Hybrid search: a query matches the words read in the images (OCR) and their CLIP vectors together.

The two rankings are fused by weighted reciprocal rank fusion (Cormack et al., 2009):

    fused(image) = 1 / (RRF_K + clip_rank) + text_weight * share / (RRF_K + text_rank)

where ``text_rank`` is the image's rank among the images whose words match the query, by the number
of query words and adjacent pairs of them found in its letters (``text_index.match_score``), and
``share`` that score over the best possible (every query word, in order: 1 for the image holding
the remembered words, 0.2 for one holding 1 word of 3); the term is 0 when no word matches. Plain
RRF (share 1) ranks by position only, and with RRF_K = 60 a rank of 1 or 2 on the words counts
nearly the same: an image holding 1 of 3 query words at CLIP rank 1 then beat the one holding all
three (docs/search.md has the measurement) and ``clip_rank`` its rank by CLIP similarity among the
candidates. Candidates are the CLIP top ``max(k, CANDIDATES)`` and the words' top as many; the CLIP
similarity of a text-only candidate is computed exactly from its stored vector, so both ranks are
over the same candidate set. Ties go to the higher CLIP score.

Quoted phrases (``"code works first"``) are a requirement: only images whose words hold every phrase
(its letters consecutively: spaces, case and punctuation ignored, as OCR drops spaces) are returned,
ranked as above. The phrase text still takes part in the CLIP query (quotes removed). The words side uses the words of the
query's positive terms (``cat -dog``: "cat"); negative terms only move the CLIP vector.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from duomodal.search.filters import SearchFilters, admitted_among, cut_and_sort, filtered_search
from duomodal.search.query import QueryError, parse_query
from duomodal.search.text_index import TextIndex, best_match_score, letters, tokens

if TYPE_CHECKING:  # the index module loads faiss, which the CLI's option parsing does not need
    from duomodal.search.index import Hit, ImageIndex

RRF_K = 60  # the constant of reciprocal rank fusion: how much a rank of 1 counts above a rank of 10
DEFAULT_TEXT_WEIGHT = 2.0  # the weight of the words in the fusion, CLIP's being 1 (docs/search.md: measured)
MAX_TEXT_WEIGHT = 100.0
CANDIDATES = 200  # images taken from each side before fusing (at least k)


@dataclass(frozen=True)
class TextQuery:
    """A query split for hybrid search."""

    clip_text: str  # what CLIP embeds: the query with its quotes removed
    phrases: tuple[str, ...]  # quoted phrases, each required in the image's words
    words: tuple[str, ...]  # the words of the positive terms, matched against the image's words


@dataclass(frozen=True)
class HybridHit:
    """A result and why it matched."""

    hit: Hit  # score: CLIP cosine similarity
    fused: float
    clip_rank: int
    text_rank: int | None  # None: its words do not match the query
    text: str  # the words read in the image ("" for none)
    matched: tuple[str, ...]  # the query's words found in them

    @property
    def reason(self) -> str:
        """One line: which sides matched, and their ranks."""
        if self.text_rank is None:
            return f"picture (CLIP rank {self.clip_rank})"
        words = ", ".join(self.matched) or "(phrase)"
        return f"words {words} (words rank {self.text_rank}) + picture (CLIP rank {self.clip_rank})"


def check_text_weight(weight: float) -> float:
    if isinstance(weight, bool) or not 0 <= weight <= MAX_TEXT_WEIGHT:
        raise ValueError(f"text weight must be from 0 to {MAX_TEXT_WEIGHT:g}, got {weight!r}")
    return float(weight)


def split_query(query: str) -> TextQuery:
    """``'"code works first" cat -dog'`` -> CLIP text ``code works first cat -dog``, the phrase, and
    the words ``code works first cat``. An unpaired quote is an error."""
    if query.count('"') % 2:
        raise QueryError(f"query {query!r} has an unpaired '\"'; close the quoted phrase")
    pieces = query.split('"')
    phrases = tuple(" ".join(p.split()) for p in pieces[1::2] if p.strip())
    if any(not tokens(p) for p in phrases):
        raise QueryError(f"query {query!r} has a quoted phrase without letters or digits")
    clip_text = " ".join(query.replace('"', " ").split())
    words = tuple(word for weight, term in parse_query(clip_text) if weight > 0 for word in term.split())
    return TextQuery(clip_text, phrases, words)


def hybrid_search(
    index: ImageIndex,
    text_index: TextIndex,
    vector: np.ndarray,
    query: TextQuery,
    k: int,
    text_weight: float = DEFAULT_TEXT_WEIGHT,
    filters: SearchFilters | None = None,
) -> list[HybridHit]:
    """The `k` best images for `query` by fused rank (see the module's docstring); `vector` is the
    query's CLIP vector (D,). `filters` select the candidates on both sides before fusing; their
    minimum score (on the CLIP score) and order apply to the fused top k."""
    text_weight = check_text_weight(text_weight)
    filters = filters or SearchFilters()
    depth = max(k, CANDIDATES)
    text_depth = depth * 4 if filters.selects else depth  # room for the ones the filter leaves out
    matches = {m.image_id: m for m in text_index.search(query.words, query.phrases, text_depth)}
    if filters.selects:
        admitted = admitted_among(index.index_dir, filters, list(matches))
        matches = {i: m for i, m in matches.items() if i in admitted}
    if query.phrases:
        ids = list(matches)[:depth]  # a phrase is required: only images whose words hold it
    else:
        selection = dataclasses.replace(filters, min_score=None, sort="score")  # the cut and order come after
        near = filtered_search(index, vector, depth, selection)
        ids = list(dict.fromkeys([h.id for h in near] + list(matches)[:depth]))
    if not ids:
        return []
    scores = index.vectors(ids) @ np.asarray(vector, dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    clip_rank = {ids[i]: rank for rank, i in enumerate(order, start=1)}
    best_score = best_match_score(query.words)

    def words_term(i: int) -> float:
        if i not in matches:
            return 0.0
        share = matches[i].score / best_score if best_score else 1.0  # a phrase-only query: the phrase is the match
        return text_weight * share / (RRF_K + matches[i].rank)

    fused = {i: 1.0 / (RRF_K + clip_rank[i]) + words_term(i) for i in ids}
    score_of = dict(zip(ids, scores.tolist()))
    best = sorted(ids, key=lambda i: (-fused[i], -score_of[i], i))[:k]
    rows = {i: index.get(i) for i in best}
    query_tokens = list(dict.fromkeys(t for w in query.words for t in tokens(w)))
    results = []
    for i in best:
        if rows[i] is None:  # deleted since the search
            continue
        text = matches[i].text if i in matches else ""
        hit = dataclasses.replace(rows[i], score=float(score_of[i]))
        found = letters(text)
        results.append(HybridHit(hit, fused[i], clip_rank[i], matches[i].rank if i in matches else None, text,
                                 tuple(t for t in query_tokens if letters(t) in found)))
    texts = text_index.text_of([r.hit.id for r in results if not r.text])
    results = [HybridHit(r.hit, r.fused, r.clip_rank, r.text_rank, texts.get(r.hit.id, ""), r.matched)
               if not r.text else r for r in results]
    kept = {id(h) for h in cut_and_sort([r.hit for r in results], filters)}
    if filters.sort == "date":
        results = sorted(results, key=lambda r: (-(r.hit.mtime_ns or 0), -r.fused))
    return [r for r in results if id(r.hit) in kept]

