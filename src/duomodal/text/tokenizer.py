"""The BPE tokenizer: trained on a dataset's captions with Hugging Face `tokenizers`.

Every caption goes through the same normaliser at training and at use (NFKC, lower case,
whitespace runs collapsed, ends stripped). Encoded captions are ``[BOS] tokens [EOS]`` padded
with ``[PAD]`` to a fixed context length. A caption longer than the context is an error naming
it, unless truncation is asked for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from duomodal.files import atomic_write_text

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3 in this order


class TokenizerError(ValueError):
    """A caption that does not fit the context, or a tokenizer file that is not ours."""


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )


def _decoder() -> decoders.Decoder:
    """Word-end markers become spaces, then punctuation attaches as in written text.

    The pre-tokenizer splits punctuation and digits into words of their own and drops the spaces,
    so whether "heart," had a space before the comma is not recorded; decoding assumes it had not:
    closing marks (. , ; : ! ? % ) ] }) attach to the word before, opening brackets to the word
    after, apostrophes, hyphens and slashes to both (don't, t-shirt, play/pause), and digits to
    each other (50%). Written as tokenizers decoders, so the rule is in tokenizer.json and goes
    with a Hugging Face export.
    """
    return decoders.Sequence([
        decoders.BPEDecoder(suffix="</w>"),
        decoders.Fuse(),  # one string, so that the replacements see across token boundaries
        decoders.Replace(Regex(r" (?=[.,;:!?%)\]}'/-])"), ""),
        decoders.Replace(Regex(r"(?<=[(\[{'/-]) "), ""),
        decoders.Replace(Regex(r"(?<=\d) (?=\d)"), ""),
    ])


class Tokenizer:
    """A thin, strict wrapper over a Hugging Face BPE tokenizer."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        for i, token in enumerate(SPECIAL_TOKENS):
            if hf_tokenizer.token_to_id(token) != i:
                raise TokenizerError(f"tokenizer must have {token} at id {i}; was it trained by duomodal?")
        self.hf = hf_tokenizer
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(len(SPECIAL_TOKENS))
        # A Hugging Face tokenizer is not safe to call from several threads at once (its Rust side
        # borrows itself mutably; concurrent calls can fail with "Already borrowed"): the server's
        # request threads and job worker share one, so every call goes through this lock.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # data-loader workers get a copy, with a lock of their own
        return {"hf": self.hf}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["hf"])

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Tokenizer:
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise TokenizerError(f"vocab_size {vocab_size} is too small; use at least {len(SPECIAL_TOKENS) + 1}")
        hf = HFTokenizer(models.BPE(unk_token=UNK))
        hf.normalizer = _normalizer()
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
        hf.decoder = _decoder()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
            end_of_word_suffix="</w>",
        )
        hf.model = models.BPE(unk_token=UNK, end_of_word_suffix="</w>")
        hf.train_from_iterator(captions, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer at {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a tokenizer file: {e}") from None
        if isinstance(hf.decoder, decoders.BPEDecoder):
            hf.decoder = _decoder()  # saved by an earlier duomodal ("heart , icon"); encoding is unchanged
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.hf.to_str(pretty=True))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def normalize(self, text: str) -> str:
        with self._lock:
            return self.hf.normalizer.normalize_str(text)

    def tokens(self, text: str) -> list[int]:
        """Token ids of `text` alone: no BOS/EOS, no padding."""
        with self._lock:
            return self.hf.encode(text).ids

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` that contain characters the tokenizer has never seen."""
        # Encode the normalised text (normalising is idempotent) so that the offsets, which count
        # in the encoder's input, index `normalized`.
        normalized = self.normalize(text)
        with self._lock:
            encoding = self.hf.encode(normalized)
        words = set()
        for token_id, offsets in zip(encoding.ids, encoding.offsets):
            if token_id == self.unk_id:
                start, end = offsets
                left = normalized.rfind(" ", 0, start) + 1
                right = normalized.find(" ", end)
                words.add(normalized[left : right if right != -1 else len(normalized)])
        return sorted(words)

    def encode(self, text: str, context_length: int, truncate: bool = False) -> list[int]:
        """``[BOS] tokens [EOS]`` padded to `context_length` with PAD."""
        if context_length < 2:
            raise TokenizerError(f"context_length {context_length} is too small; BOS and EOS need at least 2")
        ids = [self.bos_id, *self.tokens(text), self.eos_id]
        if len(ids) > context_length:
            if not truncate:
                raise TokenizerError(
                    f"caption {text!r} is {len(ids)} tokens with BOS/EOS, longer than the context of "
                    f"{context_length}; shorten it, raise the context length, or ask for truncation"
                )
            ids = ids[: context_length - 1] + [self.eos_id]
        return ids + [self.pad_id] * (context_length - len(ids))

    def encode_batch(self, texts: Sequence[str], context_length: int, truncate: bool = False) -> torch.Tensor:
        """(B, context_length) int64 tensor of encoded texts."""
        return torch.tensor([self.encode(t, context_length, truncate) for t in texts], dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        with self._lock:
            return self.hf.decode([i for i in ids if i >= len(SPECIAL_TOKENS)], skip_special_tokens=True)
