"""Sentence splitting without a downloaded model.

MLM + NSP pairs sentences, sentence embeddings can embed each sentence of a document, and
ROUGE-Lsum scores summaries sentence by sentence. NLTK's punkt splitter would need a model
download at run time (and fails offline), so polyhead splits with one rule instead: a sentence
ends at . ! or ? followed by whitespace, and a line break always ends one.
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+")


def split_sentences(document: str) -> list[str]:
    """-> the non-empty sentences of `document`, stripped, in order."""
    return [s.strip() for s in SENTENCE_END.split(document) if s.strip()]
