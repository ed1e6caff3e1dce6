"""What to learn: one file per task. Importing this package registers every task class, so a config
names a task by its class (`class_path: MaskedLMNextSentence`)."""

from tasks.base import Task
from tasks.classify import Classify
from tasks.mlm import MaskedLM
from tasks.mlm_nsp import MaskedLMNextSentence
from tasks.prefix_lm import PrefixLM
from tasks.seq2seq import Seq2Seq
from tasks.span_qa import SpanQA
from tasks.triplet import SentenceEmbedding

__all__ = [
    "Task",
    "Classify",
    "MaskedLM",
    "MaskedLMNextSentence",
    "PrefixLM",
    "Seq2Seq",
    "SpanQA",
    "SentenceEmbedding",
]
