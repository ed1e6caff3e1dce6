"""`polyhead inspect`: pictures of what a trained model learned.

    polyhead inspect attention --ckpt CKPT --text "..." [--text-pair "..."] [--layer L] [--head H]
                               [--task NAME] --out FILE.png
    polyhead inspect embeddings --ckpt CKPT --data FILE [--text-column C] [--label-column C]
                                [--task NAME] [--method pca|tsne|umap] [--clusters K]
                                [--queries N] [--neighbours K] [--max-texts N] --out FILE.png

attention: heatmaps of the attention weights on one input, layers x heads (or the chosen one),
tokens on the axes; for a text-to-text task also the decoder's self-attention and its
cross-attention over the source while it writes its output (experiments/inspect_attention.py).
embeddings: the sentence embeddings of a file's texts projected to 2-D, coloured by label or
cluster, and a nearest-neighbour table for a few of them (experiments/inspect_embeddings.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.embedding_maps import METHODS
from experiments.inspect_attention import inspect_attention
from experiments.inspect_embeddings import inspect_embeddings
from experiments.terminal import CommandParser
from modules.errors import UserError


def parser() -> argparse.ArgumentParser:
    inspect = CommandParser(
        prog="polyhead inspect",
        usage="polyhead inspect {attention,embeddings} --ckpt CKPT ... --out FILE.png",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = inspect.add_subparsers(
        dest="kind", metavar="{attention,embeddings}", required=True, parser_class=CommandParser
    )
    attention = kinds.add_parser(
        "attention", prog="polyhead inspect attention", help="attention heatmaps for one input"
    )
    attention.add_argument(
        "--text", required=True, help="the input text (a task's prompt template is applied)"
    )
    attention.add_argument(
        "--text-pair", help="a second text: sentence B of [CLS] A [SEP] B [SEP], or a template's second field"
    )
    attention.add_argument(
        "--layer", type=int, help="only this layer of each stack (negative: from the last)"
    )
    attention.add_argument("--head", type=int, help="only this head")
    attention.add_argument(
        "--task",
        help="the task whose input format is used (default: the first text-to-text task, else the first)",
    )
    embeddings = kinds.add_parser(
        "embeddings",
        prog="polyhead inspect embeddings",
        help="a 2-D map of sentence embeddings and their neighbours",
    )
    embeddings.add_argument(
        "--data", required=True, help="a .txt (one text per line), .jsonl, .json, .csv or .tsv file"
    )
    embeddings.add_argument(
        "--text-column", default="text", help="the column holding the texts (default: text)"
    )
    embeddings.add_argument(
        "--label-column", help="colour the points by this column (default: by k-means cluster)"
    )
    embeddings.add_argument(
        "--method", default="pca", choices=METHODS, help="the 2-D projection (default: pca)"
    )
    embeddings.add_argument(
        "--clusters", type=int, default=8, help="k of the k-means colouring without labels"
    )
    embeddings.add_argument("--queries", type=int, default=5, help="texts whose neighbours are listed")
    embeddings.add_argument("--neighbours", type=int, default=3, help="neighbours listed per query")
    embeddings.add_argument(
        "--max-texts", type=int, default=2000, help="draw at most this many distinct texts"
    )
    embeddings.add_argument("--task", help="the SentenceEmbedding task to use (default: the first)")
    for kind in (attention, embeddings):
        kind.add_argument("--ckpt", required=True, help="a polyhead checkpoint")
        kind.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    return inspect


def inspect(args: list[str]) -> None:
    """Run `polyhead inspect ARGS`; user mistakes raise UserError."""
    options = parser().parse_args(args)
    if options.out.suffix.lower() != ".png":
        raise UserError(f"inspect {options.kind}: --out {str(options.out)!r} must be a .png file")
    if options.kind == "attention":
        inspect_attention(
            options.ckpt,
            options.text,
            options.out,
            options.text_pair,
            options.layer,
            options.head,
            options.task,
        )
        return
    for flag in ("clusters", "queries", "neighbours", "max_texts"):
        if getattr(options, flag) < 1:
            raise UserError(f"inspect embeddings: --{flag.replace('_', '-')} must be at least 1")
    inspect_embeddings(
        options.ckpt,
        options.data,
        options.out,
        options.text_column,
        options.label_column,
        options.task,
        options.method,
        options.clusters,
        options.queries,
        options.neighbours,
        options.max_texts,
    )
