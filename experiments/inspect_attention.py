"""`polyhead inspect attention`: heatmaps of where a trained model looks, for one input of yours.

The input is written the way the chosen task writes its own. A text-to-text task (Seq2Seq,
PrefixLM) fills its prompt template, generates its output with its decoding settings, and the maps
cover that output: encoder and decoder self-attention and cross-attention (decoder rows: the start
token, then the generated tokens; encoder columns: the source) for Seq2Seq, self-attention over
prompt + output for PrefixLM. Any other task reads [CLS] text [SEP] (text_pair [SEP]) with the
encoder. By default the first text-to-text task of the checkpoint is chosen, as it shows every
kind of attention the backbone has.

The maps are recorded from a plain forward pass over those tokens (teacher-forced for the output),
so they are the weights the model uses, not an approximation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datamodules.tokenizer import Tokenizer
from experiments.attention_maps import AttentionMap, AttentionRecorder, draw_maps, label_maps, select_maps
from modules.backbone import Backbone
from modules.errors import UserError
from modules.model import MultiTaskModel
from tasks.base import Task
from tasks.generative import GenerativeTask


@dataclass
class Tokens:
    """What the backbone reads for the input: (1, S) encoder and/or (1, T) decoder ids."""

    encoder: Tensor | None = None
    segments: Tensor | None = None  # (1, S) token types of a text pair
    decoder: Tensor | None = None
    generated: str = ""  # the output the model wrote, for the title
    notes: list[str] = field(default_factory=list)  # what the user should know: a cut input


def chosen_task(model: MultiTaskModel, name: str | None) -> str:
    """--task, or the first text-to-text task, or the first task."""
    if name is not None:
        if name not in model.tasks:
            raise UserError(f"--task {name!r}: the checkpoint's tasks are {sorted(model.tasks)}")
        return name
    generative = [n for n, task in model.tasks.items() if isinstance(task, GenerativeTask)]
    return (generative or list(model.tasks))[0]


def longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut tokens from the end of the longer of two texts until both fit `budget` (BERT's rule)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def encoder_tokens(tokenizer: Tokenizer, text: str, pair: str | None, max_len: int) -> Tokens:
    """[CLS] text [SEP] (pair [SEP]) with segments 0 / 1, cut to the backbone's max_len."""
    a = tokenizer.encode([text])[0]
    b = tokenizer.encode([pair])[0] if pair is not None else []
    specials = 3 if pair is not None else 2
    notes = []
    if len(a) + len(b) + specials > max_len:
        notes.append(
            f"the input is {len(a) + len(b) + specials} tokens, more than the {max_len} this model reads "
            f"(model.backbone.max_len); cut to {max_len}, the longer text first"
        )
        a, b = longest_first(a, b, max_len - specials)
    ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
    segments = [0] * len(ids)
    if pair is not None:
        ids += [*b, tokenizer.sep_id]
        segments += [1] * (len(b) + 1)
    return Tokens(encoder=torch.tensor([ids]), segments=torch.tensor([segments]), notes=notes)


def prompt_of(task: GenerativeTask, name: str, text: str, pair: str | None) -> str:
    """The task's template filled with --text (and --text-pair, for a template of two fields)."""
    given = [text] if pair is None else [text, pair]
    fields = task.input_fields
    if len(given) != len(fields):
        wanted = "--text" if len(fields) == 1 else "--text and --text-pair"
        raise UserError(
            f"task {name!r} ({type(task).__name__}) writes its input {task.template!r} from "
            f"{len(fields)} text(s) {list(fields)}: give {wanted}"
        )
    return task.prompt(dict(zip(fields, given, strict=True)))


def prompt_limit(task: GenerativeTask, backbone: Backbone) -> tuple[int, str]:
    """The most prompt tokens the task reads, and why: its max_source_length, and for a decoder-only
    model room left in the position table for the tokens it will generate."""
    config = backbone.config
    if task.stacks == "decoder" and config.absolute_positions:
        room = config.max_len - task.decoding.max_new_tokens + 1
        if room < task.max_source_length:
            return room, "model.backbone.max_len less generation.max_new_tokens"
    return task.max_source_length, "the task's max_source_length"


def generated_tokens(task: GenerativeTask, name: str, model: MultiTaskModel, prompt: str) -> Tokens:
    """Prompt -> the task's generated output, and the token ids the recording pass reads."""
    tokenizer, backbone = model.tokenizer, model.backbone
    ids = task.prompt_ids([prompt], tokenizer)[0]
    limit, why = prompt_limit(task, backbone)
    prompt_ids, cut = task.cut(ids, limit, tokenizer.eos_id)
    notes = []
    if cut:
        notes.append(
            f"the prompt is {len(ids) + 1} tokens, more than the {limit} this model reads ({why}); cut to {limit}"
        )
    example = {"prompt_ids": np.asarray(prompt_ids, dtype=np.int64), "prompt": prompt, "lead": ""}
    batch = task.collate([example], [0], tokenizer)
    output = task.forward(backbone, model.heads[name], batch)["generated"][0].tolist()
    if tokenizer.eos_id in output:
        output = output[: output.index(tokenizer.eos_id) + 1]
    output = [t for t in output if t != tokenizer.pad_id]
    text = task.decode_rows(torch.tensor([output]), tokenizer)[0]
    if task.stacks == "decoder":  # prompt, its </s>, and the continuation: one causal sequence
        return Tokens(decoder=torch.tensor([prompt_ids + output]), generated=text, notes=notes)
    decoder = [tokenizer.start_id, *output]
    if backbone.config.absolute_positions:
        decoder = decoder[: backbone.config.max_len]
    return Tokens(
        encoder=torch.tensor([prompt_ids]), decoder=torch.tensor([decoder]), generated=text, notes=notes
    )


def record(backbone: Backbone, tokens: Tokens) -> dict:
    """One forward pass over the tokens with every attention recording -> (kind, layer) -> (H, T, S)."""
    with AttentionRecorder(backbone) as recorder:
        memory = None
        if tokens.encoder is not None:
            memory = backbone.encode(tokens.encoder, token_type_ids=tokens.segments)  # (1, S, D)
        if tokens.decoder is not None:
            backbone.decode(tokens.decoder, memory=memory)  # (1, T, D)
    return recorder.weights


def task_tokens(task: Task, name: str, model: MultiTaskModel, text: str, pair: str | None) -> Tokens:
    if isinstance(task, GenerativeTask):
        return generated_tokens(task, name, model, prompt_of(task, name, text, pair))
    return encoder_tokens(model.tokenizer, text, pair, model.backbone.config.max_len)


def pieces(tokenizer: Tokenizer, ids: Tensor | None) -> list[str]:
    return tokenizer.id_to_piece(ids[0].tolist()) if ids is not None else []


def inspect_attention(
    checkpoint: str,
    text: str,
    out: Path,
    text_pair: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    task_name: str | None = None,
) -> list[AttentionMap]:
    """Draw the attention of `checkpoint` on one input into `out` (PNG); -> the maps drawn."""
    if not text.strip() or (text_pair is not None and not text_pair.strip()):
        raise UserError("inspect attention: --text (and --text-pair, when given) must hold some text")
    model = MultiTaskModel.from_checkpoint(checkpoint)
    name = chosen_task(model, task_name)
    task = model.tasks[name]
    with torch.no_grad():
        tokens = task_tokens(task, name, model, text, text_pair)
        weights = record(model.backbone, tokens)
    for message in tokens.notes:
        print(f"polyhead inspect: note: {message}", file=sys.stderr)
    if not weights:
        raise UserError(
            f"{checkpoint}: no layer of this model has full attention, so there are no weights to draw"
        )
    maps = label_maps(
        weights, pieces(model.tokenizer, tokens.encoder), pieces(model.tokenizer, tokens.decoder)
    )
    maps = select_maps(maps, layer, head)
    title = f"{Path(checkpoint).name}, task {name} ({type(task).__name__})"
    if tokens.generated:
        title += f": generated {tokens.generated[:80]!r}"
    draw_maps(out, maps, title)
    print(f"polyhead inspect: wrote {out}: {len(maps)} layer maps x {len(maps[0].heads)} head(s) ({title})")
    return maps
