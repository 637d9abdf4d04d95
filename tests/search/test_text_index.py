"""Words in images: the OCR pass of an index run (incremental like the vectors), the FTS5 search,
and hybrid search (reciprocal rank fusion with CLIP), with a stand-in OCR engine that knows the
rendered memes' captions."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from duomodal.data.images import load_image
from duomodal.data.memes import render_meme, write_corpus
from duomodal.search.build import build_index, update_index
from duomodal.search.hybrid import RRF_K, check_text_weight, hybrid_search, split_query
from duomodal.search.index import ImageIndex
from duomodal.search.query import QueryError, parse_query, query_vector
from duomodal.search.text_index import TextIndex, letters, match_score, tokens

from .conftest import FakeEmbedder

pytestmark = pytest.mark.timeout(120)


class FakeOcr:
    """Reads a meme's planned text, found by the hash of its pixels (as the indexer loads them)."""

    kind = "rapidocr"

    def __init__(self, texts: dict[str, str], name: str = "fake-ocr 1"):
        self.texts = texts
        self.name = name
        self.calls = 0

    @staticmethod
    def key(image) -> str:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()

    def read_batch(self, images):
        self.calls += len(images)
        return [self.texts.get(self.key(image), "") for image in images]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("memes")
    memes = write_corpus(root / "photos", 10, seed=4, textless=2)
    texts = {FakeOcr.key(load_image(root / "photos" / m.file)): m.text for m in memes}
    return root / "photos", memes, texts


def indexed(corpus, tmp_path):
    photos, memes, texts = corpus
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    ocr = FakeOcr(texts)
    report = build_index(folder, tmp_path / "idx", FakeEmbedder(), progress=False, ocr=ocr)
    return folder, memes, ocr, report


def id_of(index_dir, path: str) -> int:
    with ImageIndex.open(index_dir) as index:
        return next(h.id for h in (index.get(i) for i in range(1, 200)) if h is not None and h.path == path)


def test_build_reads_every_image_and_fts_finds_the_phrase(corpus, tmp_path):
    folder, memes, ocr, report = indexed(corpus, tmp_path)
    assert report.ocr.read == 12 and report.ocr.copied == 0 and not report.ocr.skipped
    with TextIndex(tmp_path / "idx") as text_index:
        assert text_index.engine() == "rapidocr" and text_index.count() == 12
        for meme in memes:
            found = text_index.search([], [meme.phrase], 5)
            if meme.phrase:
                assert id_of(tmp_path / "idx", meme.file) in [m.image_id for m in found]
                assert all(meme.phrase in " ".join(tokens(m.text)) for m in found)
        text_free = next(m for m in memes if not m.phrase)
        assert text_index.text_of([id_of(tmp_path / "idx", text_free.file)]) == {
            id_of(tmp_path / "idx", text_free.file): ""
        }


def test_update_reads_only_what_changed(corpus, tmp_path):
    folder, memes, ocr, _ = indexed(corpus, tmp_path)
    index_dir = tmp_path / "idx"
    with_text = [m for m in memes if m.phrase and m.file.endswith(".png")]
    renamed, changed, deleted, copied = with_text[:4]
    moved_id = id_of(index_dir, renamed.file)
    (folder / renamed.file).rename(folder / "renamed.png")
    render_meme(copied).save(folder / "copy.png")
    (folder / deleted.file).unlink()
    other = next(m for m in memes if m.phrase and m not in with_text[:4])
    changed_id = id_of(index_dir, changed.file)
    shutil.copyfile(folder / other.file, folder / changed.file.replace(".png", ".tmp"))
    image = load_image(folder / other.file)
    image.save(folder / changed.file)  # new content under the old path
    (folder / changed.file.replace(".png", ".tmp")).unlink()

    before = ocr.calls
    report = update_index(index_dir, FakeEmbedder(), progress=False, ocr=ocr)
    assert ocr.calls - before == 1 and report.ocr.read == 1  # only the changed file was read
    assert report.ocr.copied == 1  # the copy took the words read from its content
    assert report.moved == 1 and report.removed == 1
    with TextIndex(index_dir) as text_index:
        assert text_index.count() == 12  # 12 - 1 deleted + 1 copy
        assert text_index.text_of([moved_id]) == {moved_id: renamed.text}  # kept through the move
        assert text_index.text_of([changed_id]) == {changed_id: other.text}  # read again
        assert text_index.search([], [deleted.phrase], 5) == [] or all(
            m.text != deleted.text for m in text_index.search([], [deleted.phrase], 5)
        )
    assert update_index(index_dir, FakeEmbedder(), progress=False, ocr=ocr).ocr.read == 0

    another = FakeOcr(ocr.texts, name="fake-ocr 2")  # a new engine version re-reads everything
    assert update_index(index_dir, FakeEmbedder(), progress=False, ocr=another).ocr.read == 11


def test_an_image_the_engine_cannot_load_is_skipped_and_read_later(corpus, tmp_path):
    photos, memes, texts = corpus
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    build_index(folder, tmp_path / "idx", FakeEmbedder(), progress=False)
    first = sorted(m.file for m in memes)[0]
    with TextIndex(tmp_path / "idx") as text_index:
        skipped = []

        def load(path):
            if path == first:
                raise OSError("disk on fire")
            return load_image(folder / path)

        report = text_index.read_missing(FakeOcr(texts), load, on_skip=lambda p, r: skipped.append((p, r)))
        assert report.read == 11 and skipped == [(first, "OCR: disk on fire")]
        assert [row[1] for row in text_index.unread("fake-ocr 1")] == [first]
        assert text_index.read_missing(FakeOcr(texts), lambda p: load_image(folder / p)).read == 1


def test_letters_match_across_dropped_spaces_and_rank_the_phrase_first(tmp_path):
    assert letters("Deadline-HUNGRY, ok!") == "deadlinehungryok" and tokens("t-shirt NEAR(x)*") == ["t", "shirt", "near", "x"]
    assert match_score(["deadline", "hungry"], "meetingdeadlinehungry") == 3  # 2 words + the pair
    assert match_score(["hungry", "deadline"], "meetingdeadlinehungry") == 2  # out of order: no pair
    photos = tmp_path / "photos"
    photos.mkdir()
    texts = {}
    for n, text in enumerate(["MEETING DEADLINEHUNGRY", "hungry deadline meeting", "nothing here",
                              'NEAR "AND" OR *', "a b"]):
        image = Image.new("RGB", (8, 8), (n * 40, 0, 0))
        image.save(photos / f"{n}.png")
        texts[FakeOcr.key(image)] = text
    build_index(photos, tmp_path / "idx", FakeEmbedder(), progress=False, ocr=FakeOcr(texts))
    with TextIndex(tmp_path / "idx") as text_index:
        def paths(words, phrases):
            found = text_index.search(words, phrases, 10)
            return [{"MEETING DEADLINEHUNGRY": 0, "hungry deadline meeting": 1, "nothing here": 2,
                     'NEAR "AND" OR *': 3, "a b": 4}[m.text] for m in found]

        assert paths(["deadline hungry"], []) == [0, 1]  # both words in both; the pair only in 0
        assert paths([], ["deadline hungry"]) == [0]  # a phrase: letters consecutive, spaces ignored
        assert paths(["near", "and", "or"], []) == [3]  # FTS5 operators are plain words here
        assert paths([], ['"and" or']) == [3]
        assert paths([], ["a b"]) == [4]  # shorter than a trigram: scanned
        assert paths(["zebra"], []) == [] and paths(["!!"], []) == []


def test_split_query_phrases_and_words():
    query = split_query('"code works first" cat -dog')
    assert query.clip_text == "code works first cat -dog"
    assert query.phrases == ("code works first",)
    assert query.words == ("code", "works", "first", "cat")
    with pytest.raises(QueryError, match="unpaired"):
        split_query('"code works')
    with pytest.raises(QueryError, match="without letters or digits"):
        split_query('cat "!!"')
    with pytest.raises(ValueError, match="text weight must be from 0 to 100"):
        check_text_weight(-1)


def test_hybrid_fuses_ranks_and_quoted_phrases_are_required(corpus, tmp_path):
    folder, memes, _, _ = indexed(corpus, tmp_path)
    embedder = FakeEmbedder()
    target = next(m for m in memes if m.phrase)
    with ImageIndex.open(tmp_path / "idx") as index, TextIndex(tmp_path / "idx") as text_index:
        query = split_query(target.phrase)
        vector = query_vector(embedder, parse_query(query.clip_text))
        hits = hybrid_search(index, text_index, vector, query, 12, text_weight=2.0)
        assert hits[0].hit.path == target.file and hits[0].text_rank == 1
        assert set(hits[0].matched) == set(target.phrase.split())
        assert hits[0].text == target.text and "words rank 1" in hits[0].reason
        best = 2 * len(target.phrase.split()) - 1  # every word and every adjacent pair
        matched = {m.image_id: m.score for m in text_index.search(query.words, [], 100)}
        assert matched[hits[0].hit.id] == best
        for hit in hits:  # the documented formula, in the order returned
            words = 2.0 * (matched[hit.hit.id] / best) / (RRF_K + hit.text_rank) if hit.text_rank else 0.0
            assert hit.fused == pytest.approx(1 / (RRF_K + hit.clip_rank) + words)
        assert [h.fused for h in hits] == sorted((h.fused for h in hits), reverse=True)
        assert sorted(h.clip_rank for h in hits) == list(range(1, 13))  # every image is a candidate here
        assert hits[0].hit.score == pytest.approx(float(index.vector(hits[0].hit.id) @ vector), abs=1e-5)

        pictures = hybrid_search(index, text_index, vector, query, 12, text_weight=0.0)
        assert [h.clip_rank for h in pictures] == list(range(1, 13))
        assert [h.hit.score for h in pictures] == pytest.approx([h.score for h in index.search(vector, 12)], abs=1e-5)

        quoted = split_query(f'"{target.phrase}"')
        only = hybrid_search(index, text_index, query_vector(embedder, parse_query(quoted.clip_text)), quoted, 12)
        assert [h.hit.path for h in only] == [target.file]
        reversed_phrase = " ".join(reversed(target.phrase.split()))
        nowhere = split_query(f'"{reversed_phrase}"')
        if reversed_phrase not in " ".join(" ".join(tokens(m.text)) for m in memes):
            assert hybrid_search(index, text_index, vector, nowhere, 12) == []
        assert np.isfinite([h.fused for h in hits]).all()
