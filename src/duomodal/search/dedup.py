"""Near-duplicate grouping of search results (as clip-retrieval's deduplication does).

Results are taken best first; a result whose vector has cosine similarity >= threshold with an
earlier group's leader joins that group instead of starting its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from duomodal.search.index import MAX_K, Hit, ImageIndex


@dataclass(frozen=True)
class Group:
    hit: Hit  # the best-scoring member
    duplicates: list[Hit] = field(default_factory=list)  # the others, best first


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def group_near_duplicates(hits: list[Hit], vectors: np.ndarray, threshold: float) -> list[Group]:
    """Group `hits` (best first) whose `vectors` (N, D, normalised) are at least `threshold` alike."""
    threshold = check_threshold(threshold)
    if len(hits) != len(vectors):
        raise ValueError(f"{len(hits)} hits but {len(vectors)} vectors")
    leaders: list[int] = []
    groups: list[Group] = []
    for i, hit in enumerate(hits):
        if leaders:
            similarity = vectors[leaders] @ vectors[i]
            best = int(np.argmax(similarity))
            if similarity[best] >= threshold:
                groups[best].duplicates.append(hit)
                continue
        leaders.append(i)
        groups.append(Group(hit))
    return groups


def search_grouped(index: ImageIndex, vector: np.ndarray, k: int, threshold: float) -> list[Group]:
    """Up to `k` groups of near-duplicates, looking at up to 4k results (at most the index's limit)."""
    check_threshold(threshold)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    hits = index.search(vector, min(MAX_K, 4 * k))
    groups = group_near_duplicates(hits, index.vectors([h.id for h in hits]), threshold)
    return groups[:k]
