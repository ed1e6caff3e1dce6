"""A sentencepiece tokenizer trained on the run's own training text, cached, and saved in checkpoints.

Settings that make encode -> decode reproduce the text exactly (extractive QA maps answers back
to characters through `encode_with_offsets`): byte fallback for unseen characters, the identity normalisation, and no
whitespace collapsing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from modules.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]")
"""Fixed ids 0..6 in this order in every polyhead vocabulary."""


def cache_root() -> Path:
    """Tokenizers and other derived files; POLYHEAD_CACHE overrides ~/.cache/polyhead."""
    return Path(os.environ.get("POLYHEAD_CACHE", Path.home() / ".cache" / "polyhead"))


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    """Pieces in the vocabulary, including the 7 special tokens and 256 byte-fallback pieces."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """sentencepiece's algorithm."""
    lowercase: bool = False
    """Lower-case text before encoding (decoding then returns lower-case text)."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; the rarest fall back to bytes."""
    max_training_lines: int = 1_000_000
    """Lines sampled for training; more only costs time."""


class Tokenizer:
    """One tokenizer interface for every task: text <-> ids, plus the special-token ids."""

    def __init__(self, model_proto: bytes, lowercase: bool = False) -> None:
        self.model_proto, self.lowercase = model_proto, lowercase
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if self.sp.piece_to_id(token) != expected_id:
                raise UserError(
                    f"tokenizer does not have {token} at id {expected_id}: not a polyhead tokenizer"
                )
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.cls_id, self.sep_id, self.mask_id = range(7)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """Stable id of this exact vocabulary, for caching tokenized data."""
        return hashlib.sha256(self.model_proto + bytes([self.lowercase])).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Texts -> token ids, without special tokens (tasks add the ones their format needs)."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return self.sp.encode(texts)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Texts -> (ids, spans) per text, ids as `encode` gives them and spans[i] = (start, end): the
        characters of the original text that piece i stands for, so `text[start:end]` is its surface.

        The spans come from sentencepiece itself (its offset mapping) and tile the text in order: the
        dummy-prefix space has an empty span, and a character split into byte-fallback pieces belongs
        to its last byte piece (the others have empty spans). Extractive QA maps predicted pieces back
        to the exact characters of a context with them. With `lowercase`, a character whose lower case
        is longer (İ -> i̇) belongs whole to every piece that holds part of it.
        """
        lowered = [t.lower() for t in texts] if self.lowercase else texts
        out = []
        for text, low, encoded in zip(
            texts, lowered, self.sp.encode(lowered, out_type="offset_mapping"), strict=True
        ):
            spans = encoded["offsets"]
            if len(low) != len(text):
                ends = list(accumulate(len(c.lower()) for c in text))  # where each character ends in `low`
                spans = [
                    (bisect_right(ends, s), bisect_left(ends, e) + 1 if e > s else bisect_right(ends, s))
                    for s, e in spans
                ]
            out.append((encoded["ids"], [tuple(span) for span in spans]))
        return out

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; special tokens are dropped."""
        return self.sp.decode([i for i in ids if i >= len(SPECIAL_TOKENS)])

    def id_to_piece(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def state_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with torch.load(weights_only=True)."""
        return {"sentencepiece_model": self.model_proto, "lowercase": self.lowercase}

    @classmethod
    def from_state_dict(cls, state: dict) -> Tokenizer:
        return cls(state["sentencepiece_model"], state["lowercase"])

    @classmethod
    def train(cls, lines: Iterable[str], config: TokenizerConfig, where: str) -> Tokenizer:
        """Train on `lines` (or reuse the cached result of the same lines and settings).

        `where` names the data in error messages.
        """
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise UserError(f"{where}: no text to train the tokenizer on; the training data is empty")
        digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
        for line in lines:
            digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
        cached = cache_root() / "tokenizers" / f"{digest.hexdigest()[:24]}.model"
        if cached.exists():
            return cls(cached.read_bytes(), config.lowercase)
        model = io.BytesIO()
        text = (line.lower() for line in lines) if config.lowercase else iter(lines)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=text,
                model_writer=model,
                vocab_size=config.vocab_size,
                model_type=config.model_type,
                character_coverage=config.character_coverage,
                input_sentence_size=config.max_training_lines,
                shuffle_input_sentence=True,
                max_sentence_length=1 << 16,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                user_defined_symbols=list(SPECIAL_TOKENS[4:]),
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1]
            raise UserError(
                f"data.tokenizer: sentencepiece could not train a vocabulary of {config.vocab_size} on {where} "
                f"({reason}); lower data.tokenizer.vocab_size or add training text"
            ) from None
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".tmp{os.getpid()}")
        partial.write_bytes(model.getvalue())
        partial.replace(cached)  # atomic: a concurrent or killed run never sees half a model
        return cls(model.getvalue(), config.lowercase)
