"""One tokenizer interface with two backends, saved in checkpoints and named by a fingerprint.

- `SentencePieceTokenizer`: polyhead's own vocabulary, trained on the run's training text and
  cached (`Tokenizer.train`); or an imported sentencepiece model such as T5's `spiece.model`,
  whose special tokens are given by name instead of polyhead's fixed layout.
- `HFTokenizer`: a HuggingFace `tokenizer.json` run by the `tokenizers` library (BERT's WordPiece).

Tasks see only `Tokenizer`: text <-> ids, character offsets for extractive QA, and the special
tokens by role (`pad_id`, `unk_id`, `start_id`, `eos_id`, `cls_id`, `sep_id`, `mask_id`, `bos_id`;
None where the vocabulary has no such token, as T5 has no [CLS]). A task names the roles it needs and is
refused when the model is built if the vocabulary lacks one (`Tokenizer.require`).

polyhead's own vocabularies are made so that encode -> decode reproduces the text exactly
(extractive QA maps answers back to characters through `encode_with_offsets`): byte fallback for
unseen characters, the identity normalisation, and no whitespace collapsing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Literal

import sentencepiece as spm
import tokenizers
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from modules.atomic_write import write_atomically
from modules.errors import UserError

SPECIAL_ROLES = ("pad", "unk", "start", "eos", "cls", "sep", "mask", "bos")
"""What special tokens are for: padding, unknown text, the decoder's first input, end of a
sequence, BERT's sequence start and separator, the masked-LM blank, and the token an imported
decoder-only model's text begins with (LLaMA's <s>; polyhead's own vocabularies have none)."""
POLYHEAD_SPECIALS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "start": "<s>",
    "eos": "</s>",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}
SPECIAL_TOKENS = tuple(POLYHEAD_SPECIALS.values())
"""Fixed ids 0..6 in this order in every vocabulary polyhead trains."""


def cache_root() -> Path:
    """Tokenizers and other derived files; POLYHEAD_CACHE overrides ~/.cache/polyhead."""
    return Path(os.environ.get("POLYHEAD_CACHE", Path.home() / ".cache" / "polyhead"))


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    """Pieces in the vocabulary, including the 7 special tokens and 256 byte-fallback pieces; a
    corpus too small to fill it gets the pieces it holds (unigram), and the run says so."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """sentencepiece's algorithm."""
    lowercase: bool = False
    """Lower-case text before encoding (decoding then returns lower-case text)."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; the rarest fall back to bytes."""
    max_training_lines: int = 1_000_000
    """Lines sampled for training; more only costs time."""


class Tokenizer(ABC):
    """What every task uses: text <-> ids, offsets, and the special tokens by role.

    A backend resolves its special pieces (role -> piece) to ids and names every id that is not
    text (`special_ids`): those are never masked or drawn as random replacements by masked-LM,
    never counted as words, and dropped by `decode`.
    """

    backend: str
    """The backend's name, for reports."""

    def __init__(self, special: Mapping[str, str], special_ids: Iterable[int]) -> None:
        unknown_roles = sorted(set(special) - set(SPECIAL_ROLES))
        if unknown_roles:
            raise UserError(
                f"tokenizer special tokens: unknown roles {unknown_roles}; known: {SPECIAL_ROLES}"
            )
        self.special = dict(special)
        ids = {role: self.piece_id(piece, role) for role, piece in self.special.items()}
        (
            self.pad_id,
            self.unk_id,
            self.start_id,
            self.eos_id,
            self.cls_id,
            self.sep_id,
            self.mask_id,
            self.bos_id,
        ) = (ids.get(role) for role in SPECIAL_ROLES)
        self.special_ids = frozenset({*special_ids, *ids.values()})
        self.special_mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # (V,): True where not text
        self.special_mask[sorted(self.special_ids)] = True
        self.replacement_ids = (~self.special_mask).nonzero().flatten()  # (V - specials,)
        """The ids a masked-LM input may be replaced by at random: every id that stands for text."""

    @abstractmethod
    def piece_id(self, piece: str, role: str) -> int:
        """The id of a special piece; UserError naming the role when the vocabulary lacks it."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce (a model's embedding table may have more rows)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Stable id of this exact vocabulary and settings, for caching tokenized data."""

    @abstractmethod
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Texts -> token ids, without special tokens (tasks add the ones their format needs)."""

    @abstractmethod
    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Texts -> (ids, spans) per text, ids as `encode` gives them and spans[i] = (start, end): the
        characters of the ORIGINAL text that piece i stands for, so `text[start:end]` is its surface.
        Spans are in order and never overlap (extractive QA binary-searches them)."""

    @abstractmethod
    def _decode_text(self, ids: list[int]) -> str:
        """Ids of text pieces only -> text."""

    @abstractmethod
    def id_to_piece(self, ids: list[int]) -> list[str]:
        """Ids -> the vocabulary's pieces (for showing predictions)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with torch.load(weights_only=True)."""

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; special tokens, and ids outside the vocabulary (rows a model's embedding
        table may have beyond it), are dropped."""
        return self._decode_text([i for i in ids if 0 <= i < self.vocab_size and i not in self.special_ids])

    def is_special(self, ids: Tensor) -> Tensor:
        """ids (any shape) -> bool of the same shape: True where the id is not text."""
        return self.special_mask.to(ids.device)[ids]

    def require(self, roles: Iterable[str], who: str) -> None:
        """Refuse a vocabulary that lacks a special token `who` (a task) needs, naming both."""
        for role in roles:
            if getattr(self, f"{role}_id") is None:
                token = {"start": "decoder start", "bos": "beginning-of-text"}.get(role) or POLYHEAD_SPECIALS[
                    role
                ]
                raise UserError(
                    f"{who} needs a {token} token ({role}_id), which this vocabulary ({self.backend}) does "
                    f"not have; it defines {sorted(self.special)}. Use a task this model's vocabulary supports"
                )

    @staticmethod
    def from_state_dict(state: dict) -> Tokenizer:
        """The tokenizer a checkpoint saved, whichever backend it has."""
        if "sentencepiece_model" in state:
            return SentencePieceTokenizer(
                state["sentencepiece_model"],
                state["lowercase"],
                state.get("special"),
                state.get("extra_ids", 0),
            )
        return HFTokenizer(state["tokenizer_json"], state["special"])

    @staticmethod
    def train(lines: Iterable[str], config: TokenizerConfig, where: str) -> SentencePieceTokenizer:
        """polyhead's own vocabulary: sentencepiece trained on `lines` (or the cached result of the same
        lines and settings), with SPECIAL_TOKENS at ids 0..6. `where` names the data in error messages.
        """
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise UserError(f"{where}: no text to train the tokenizer on; the training data is empty")
        digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
        for line in lines:
            digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
        cached = cache_root() / "tokenizers" / f"{digest.hexdigest()[:24]}.model"
        if cached.exists():
            return SentencePieceTokenizer(cached.read_bytes(), config.lowercase)
        model = io.BytesIO()
        text = (line.lower() for line in lines) if config.lowercase else iter(lines)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=text,
                model_writer=model,
                vocab_size=config.vocab_size,
                hard_vocab_limit=False,  # a small corpus gets the pieces it has, not an error
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
                f"({reason}); data.tokenizer.vocab_size must hold the 7 special tokens, the 256 byte pieces and "
                "every character the text needs"
            ) from None
        write_atomically(cached, lambda handle: handle.write(model.getvalue()))  # no run sees half a model
        tokenizer = SentencePieceTokenizer(model.getvalue(), config.lowercase)
        if tokenizer.vocab_size < config.vocab_size:
            rank_zero_info(
                f"data.tokenizer: {where} holds only {tokenizer.vocab_size} pieces; the vocabulary has "
                f"{tokenizer.vocab_size}, not vocab_size {config.vocab_size}"
            )
        return tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model: polyhead's own layout, or an imported one with its special pieces named.

    special: role -> piece, e.g. T5's {"pad": "<pad>", "eos": "</s>", "unk": "<unk>", "start":
        "<pad>"} (T5's decoder starts from pad). None: polyhead's layout, SPECIAL_TOKENS at 0..6,
        which is checked.
    extra_ids: T5's sentinel tokens, which live after the sentencepiece pieces: id
        `pieces + extra_ids - 1 - k` is `<extra_id_k>`. They are special: never produced by
        `encode` and dropped by `decode`.
    """

    backend = "sentencepiece"

    def __init__(
        self,
        model_proto: bytes,
        lowercase: bool = False,
        special: Mapping[str, str] | None = None,
        extra_ids: int = 0,
    ) -> None:
        self.model_proto, self.lowercase, self.extra_ids = model_proto, lowercase, extra_ids
        self.polyhead_layout = special is None
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as error:
            raise UserError(f"not a readable sentencepiece model ({type(error).__name__})") from None
        if self.polyhead_layout:
            for expected_id, token in enumerate(SPECIAL_TOKENS):
                if self.sp.piece_to_id(token) != expected_id:
                    raise UserError(
                        f"tokenizer does not have {token} at id {expected_id}: not a polyhead tokenizer"
                    )
        pieces = self.sp.get_piece_size()
        not_text = [i for i in range(pieces) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        super().__init__(
            POLYHEAD_SPECIALS if special is None else special, [*not_text, *range(pieces, self.vocab_size)]
        )

    def piece_id(self, piece: str, role: str) -> int:
        if piece.startswith("<extra_id_") and piece[10:-1].isdigit() and int(piece[10:-1]) < self.extra_ids:
            return self.vocab_size - 1 - int(piece[10:-1])
        found = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(found) != piece:
            raise UserError(f"the sentencepiece model has no piece {piece!r} for its {role} token")
        return found

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + self.extra_ids

    @property
    def fingerprint(self) -> str:
        identity = self.model_proto + bytes([self.lowercase])
        if not self.polyhead_layout:  # polyhead's own fingerprints stay as they were
            identity += json.dumps([self.special, self.extra_ids], sort_keys=True).encode()
        return hashlib.sha256(identity).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return self.sp.encode(texts)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """See `Tokenizer.encode_with_offsets`. The spans come from sentencepiece itself (its offset
        mapping) and tile the text: the dummy-prefix space has an empty span, and a character split
        into byte-fallback pieces belongs to its last byte piece (the others have empty spans). With
        `lowercase`, a character whose lower case is longer (İ -> i̇) belongs whole to every piece that
        holds part of it.
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

    def _decode_text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, ids: list[int]) -> list[str]:
        pieces = self.sp.get_piece_size()
        return [
            self.sp.id_to_piece(i) if i < pieces else f"<extra_id_{self.vocab_size - 1 - i}>" for i in ids
        ]

    def state_dict(self) -> dict:
        """polyhead's own: {"sentencepiece_model", "lowercase"}, as every checkpoint has always held;
        imported ones add their special pieces and sentinel count."""
        state = {"sentencepiece_model": self.model_proto, "lowercase": self.lowercase}
        if not self.polyhead_layout:
            state |= {"special": dict(self.special), "extra_ids": self.extra_ids}
        return state


class HFTokenizer(Tokenizer):
    """A HuggingFace `tokenizer.json` (BERT's WordPiece, or any other) run by the `tokenizers` library.

    special: role -> piece, e.g. BERT's {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep":
        "[SEP]", "mask": "[MASK]"}. Every token the file marks special counts as special too.

    The file's post-processor (BERT's [CLS] A [SEP]) is kept for exporting but never applied: tasks
    add their own special tokens. Truncation and padding stored in the file are switched off, so no
    text is cut silently.
    """

    def __init__(self, tokenizer_json: str, special: Mapping[str, str]) -> None:
        self.tokenizer_json = tokenizer_json
        try:
            self.tk = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"not a readable tokenizer.json ({reason})") from None
        self.tk.no_truncation()
        self.tk.no_padding()
        self.backend = f"tokenizers ({json.loads(tokenizer_json)['model']['type']}, tokenizer.json)"
        added = self.tk.get_added_tokens_decoder()
        super().__init__(special, [i for i, token in added.items() if token.special])

    def piece_id(self, piece: str, role: str) -> int:
        found = self.tk.token_to_id(piece)
        if found is None:
            raise UserError(f"tokenizer.json has no token {piece!r} for its {role} token")
        return found

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        identity = json.dumps([self.tokenizer_json, self.special], sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """See `Tokenizer.encode_with_offsets`. The offsets are the library's alignments through its
        normaliser (lower-casing, accent stripping), so they point into the original text; the
        whitespace between words belongs to no piece."""
        return [
            (e.ids, [tuple(span) for span in e.offsets])
            for e in self.tk.encode_batch(texts, add_special_tokens=False)
        ]

    def _decode_text(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def leading_special(self) -> str | None:
        """The special token the file's post-processor puts before a text (LLaMA's <s>), if any: what
        HF's tokenizer(text) adds in front, and what a model trained with it expects to read first."""
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        lead = full[: len(full) - len(plain)] if full[-len(plain) :] == plain else []
        return self.tk.id_to_token(lead[0]) if len(lead) == 1 else None

    def id_to_piece(self, ids: list[int]) -> list[str]:
        return [self.tk.id_to_token(i) for i in ids]

    def state_dict(self) -> dict:
        return {"tokenizer_json": self.tokenizer_json, "special": dict(self.special)}
