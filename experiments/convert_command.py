"""`polyhead convert`: HuggingFace BERT / T5 / GPT-2 / LLaMA / Qwen -> a polyhead checkpoint, and back.

    polyhead convert SOURCE OUT.ckpt [--task NAME]   SOURCE: a local HF model directory, or a hub name
    polyhead convert --to-hf CKPT OUT_DIR            a polyhead checkpoint -> a HF model directory
    polyhead convert --to-peft CKPT OUT_DIR          a LoRA run's checkpoint -> a HF peft adapter directory

The checkpoint runs like one polyhead trained: fine-tune it with `polyhead fit --config X.yaml
--model.init_from OUT.ckpt` (its architecture and tokenizer come with it). The files are read and
written by modules/hf_import.py (import), modules/hf_export.py (export) and modules/peft_export.py
(adapters); this module parses the command line and prints what was done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.terminal import CommandParser
from modules.errors import UserError
from modules.hf_export import export_hf
from modules.hf_files import Conversion
from modules.hf_import import import_hf
from modules.peft_export import export_peft


def parser() -> argparse.ArgumentParser:
    convert = CommandParser(
        prog="polyhead convert",
        usage="polyhead convert SOURCE OUT.ckpt [--task NAME] | polyhead convert --to-hf | --to-peft CKPT OUT_DIR",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "source", help="HF model directory or hub name (with --to-hf / --to-peft: a polyhead checkpoint)"
    )
    convert.add_argument(
        "out", help="the polyhead checkpoint to write (with --to-hf / --to-peft: the HF directory)"
    )
    direction = convert.add_mutually_exclusive_group()
    direction.add_argument(
        "--to-hf",
        action="store_true",
        help="export a polyhead checkpoint as a HF BERT, T5, GPT-2, LLaMA, Qwen2 or Qwen3 directory",
    )
    direction.add_argument(
        "--to-peft",
        action="store_true",
        help="export a LoRA run's adapters (and what trained beside them) as a HF peft adapter directory "
        "for the HF model of the checkpoint the run started from",
    )
    convert.add_argument(
        "--task",
        help="name of the pretraining task in the checkpoint (default mlm_nsp / seq2seq / prefix_lm); heads load by "
        "task name, so name it as your fine-tuning config does to start from its head (an untied T5's LM head)",
    )
    return convert


def report(done: Conversion, exported: bool) -> str:
    """A few lines: what was converted, its size and vocabulary, where it went."""
    tokenizer = done.tokenizer
    rows = (
        f" for an embedding table of {done.embedding_rows} rows"
        if done.embedding_rows != tokenizer.vocab_size
        else ""
    )
    lines = [
        f"polyhead convert: {done.model_type} ({done.architecture}) "
        + ("LoRA adapter " if done.base else "")
        + (f"from polyhead checkpoint {done.source}" if exported else f"from {done.source}"),
        f"  parameters  {done.parameters:,}",
        f"  vocabulary  {tokenizer.vocab_size:,} ids{rows}, {tokenizer.backend}",
    ]
    if exported:
        lines.append(f"  written     {done.written}/ ({', '.join(done.files)})")
        if done.base:
            lines.append(
                f'  goes on     {done.base}: peft.PeftModel.from_pretrained(model, "{done.written}")'
            )
    else:
        tasks = ", ".join(f"{name} ({cls})" for name, cls in done.tasks.items())
        size = done.written.stat().st_size / 2**20
        lines += [
            f"  tasks       {tasks}",
            f"  written     {done.written} ({size:.1f} MiB)",
            f"  fine-tune   polyhead fit --config YOUR.yaml --model.init_from {done.written}",
        ]
    return "\n".join(lines)


def convert(args: list[str]) -> Conversion:
    """Run `polyhead convert ARGS`; user mistakes raise UserError."""
    options = parser().parse_args(args)
    exported = options.to_hf or options.to_peft
    if exported and options.task:
        raise UserError(
            "convert: --task names the task of an imported checkpoint; it does nothing with --to-hf / --to-peft"
        )
    if options.to_peft:
        done = export_peft(Path(options.source), Path(options.out))
    elif options.to_hf:
        done = export_hf(Path(options.source), Path(options.out))
    else:
        done = import_hf(options.source, Path(options.out), options.task)
    print(report(done, exported))
    return done
