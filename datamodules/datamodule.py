"""`MultiTaskDataModule`: sources -> tokenizer -> tokenized, cached datasets -> mixed batches.

The tokenizer is trained (or loaded from cache) the first time `.tokenizer` is read, which the
CLI does before building the model, so the vocabulary size reaches the backbone. Tasks come from
the model at setup: the model owns them, the data module only asks them how to tokenize and
collate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import datasets
import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.mixture import MixtureBatchSampler, MixtureConfig, mix_seed, mixing_rates
from datamodules.padding import mark_masks
from datamodules.sources import DataSource, load_split, read_text_lines
from datamodules.tokenizer import Tokenizer, TokenizerConfig, cache_root
from modules.checkpoint import read_checkpoint
from modules.errors import UserError


class TaggedExamples(Dataset):
    """Examples of every task, indexed by (task, index, seed) as the batch samplers yield them."""

    def __init__(self, examples: dict[str, Any]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples.values())

    def __getitem__(self, key: tuple[str, int, int]) -> tuple[str, Any, int]:
        task, index, seed = key
        return task, self.examples[task][index], seed


class TaskCollator:
    """Batch of tagged examples (all one task) -> that task's tensors plus the "task" tag and the
    masks that hide nothing (`mark_masks`)."""

    def __init__(self, tasks: dict, tokenizer: Tokenizer) -> None:
        self.tasks, self.tokenizer = tasks, tokenizer

    def __call__(self, items: list[tuple[str, Any, int]]) -> dict:
        task = items[0][0]
        batch = self.tasks[task].collate([e for _, e, _ in items], [s for _, _, s in items], self.tokenizer)
        batch["task"] = task
        return mark_masks(batch)


class EvalBatchSampler:
    """In-order batches of one task's examples for evaluation, the same number on every rank.

    The examples are cut into world_size x k near-equal batches of at most batch_size, and rank r
    takes batches r, r + world_size, ...: every example is scored once, on one rank, and no rank runs
    out early (Lightning needs a batch on every rank, and ranks that ran different numbers of steps
    would wait on each other's collectives). Seeds depend only on the example's index, so every
    evaluation scores the same masked positions however the batches fall.
    """

    def __init__(self, task: str, size: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        if 0 < size < world_size:
            raise UserError(
                f"task {task!r} has {size} evaluation examples, fewer than the {world_size} processes that "
                "share them; give it more examples or run on fewer devices"
            )
        self.task, self.size, self.batch_size, self.seed = task, size, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def _bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of this rank's batches."""
        per_rank = math.ceil(self.size / (self.batch_size * self.world_size))
        count = per_rank * self.world_size
        edges = [i * self.size // count for i in range(count + 1)]
        return [(edges[b], edges[b + 1]) for b in range(self.rank, count, self.world_size)]

    def __len__(self) -> int:
        return len(self._bounds())

    def __iter__(self):
        for start, stop in self._bounds():
            yield [(self.task, i, mix_seed(self.seed, 7919, i)) for i in range(start, stop)]


class ResumableLoader(DataLoader):
    """The training loader, stateful in Lightning's sense: a checkpoint stores how far into the
    epoch's stream of batches the run got, and a run resumed from it continues with the next batch
    instead of replaying the epoch from its start (the mixture sampler can start anywhere).

    batches_done: () -> training batches completed in the current epoch, asked at save time (the
    loader itself cannot count them: worker prefetching draws batches ahead of training).
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict(self.batches_done())

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


class MultiTaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        sources: dict[str, DataSource],
        tokenizer: TokenizerConfig = TokenizerConfig(),
        batch_size: int | None = None,
        global_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        mixture: MixtureConfig = MixtureConfig(),
        steps_per_epoch: int | None = None,
        group_by_length: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_checkpoint: str | None = None,
    ) -> None:
        """
        sources: task name (as in model.tasks) -> where its data comes from.
        tokenizer: how to train the sentencepiece vocabulary on the training text of all sources.
        batch_size: examples per step and process (global batch = batch_size x devices x nodes);
            32 unless global_batch_size is given instead.
        global_batch_size: examples per step over all processes, split evenly among them, so one
            config trains the same on 1 GPU or 8 x 4 nodes (it must be a multiple of devices x nodes).
        eval_batch_size: examples per validation/test batch and process (default: the training
            batch of one process).
        mixture: how steps are shared among tasks.
        steps_per_epoch: training steps per epoch (default: one pass over all examples).
        group_by_length: 0, or sort windows of this many global batches of each shuffled pass by
            length (50 is HF's choice), so batches of seq2seq, prefix-LM and MLM examples pad less.
        num_workers: dataloader worker processes (0: load in the main process).
        seed: seed of NSP pairings, masking and sampling; independent of the model's init seed.
        tokenizer_checkpoint: take the tokenizer from this polyhead checkpoint instead of training one
            (the CLI sets it from --ckpt_path, so a checkpoint is always run with its own vocabulary).
        """
        super().__init__()
        if not sources:
            raise UserError("data.sources is empty: give one source per task in model.tasks")
        if batch_size is not None and global_batch_size is not None:
            raise UserError(
                "set data.batch_size (per process) or data.global_batch_size (all processes), not both"
            )
        for key, value in (("batch_size", batch_size), ("global_batch_size", global_batch_size)):
            if value is not None and value <= 0:
                raise UserError(f"data.{key} must be positive, got {value}")
        self.sources = sources
        self.tokenizer_config = tokenizer
        self.batch_size = batch_size if batch_size is not None or global_batch_size is not None else 32
        self.global_batch_size, self.eval_batch_size = global_batch_size, eval_batch_size
        if group_by_length < 0:
            raise UserError(
                f"data.group_by_length must be 0 (off) or a number of batches, got {group_by_length}"
            )
        self.mixture, self.steps_per_epoch = mixture, steps_per_epoch
        self.group_by_length = group_by_length
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer_checkpoint = tokenizer_checkpoint
        self.examples: dict[str, dict[str, Any]] = {
            split: {} for split in ("train", "validation", "test", "predict")
        }  # split -> task -> examples
        self.tasks: dict = {}
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer: trained on the training text of every source, or loaded from cache."""
        if self._tokenizer is None and self.tokenizer_checkpoint:
            saved = read_checkpoint(self.tokenizer_checkpoint)["polyhead"]
            self._tokenizer = Tokenizer.from_state_dict(saved["tokenizer"])
        if self._tokenizer is None:
            lines = []
            for name, source in self.sources.items():
                lines.extend(read_text_lines(source, f"data.sources.{name}"))
            self._tokenizer = Tokenizer.train(
                lines, self.tokenizer_config, "the training data of data.sources"
            )
        return self._tokenizer

    def _tokenized(self, name: str, split: str) -> datasets.Dataset | None:
        """Run the task's tokenizer over one split through datasets.map, cached on disk by content key;
        None when the task's source has no data for the split."""
        task, source, where = self.tasks[name], self.sources[name], f"data.sources.{name}"
        if split == "predict" and source.predict_path:
            source = DataSource(
                path=source.predict_path, test_path=source.predict_path, encoding=source.encoding
            )
            dataset = load_split(
                source, task.predict_fields, "test", f"{where}.predict_path", list_fields=task.list_fields
            )
        else:  # predict without a predict_path reads the test split
            dataset = load_split(
                source,
                task.fields,
                "test" if split == "predict" else split,
                where,
                task.value_fields,
                task.list_fields,
                task.number_fields,
            )
        if dataset is None:
            return None
        key = hashlib.sha256(
            json.dumps(
                [
                    source_identity(source),
                    split,
                    type(task).__name__,
                    task.init_args(),
                    self.tokenizer.fingerprint,
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:24]
        path = cache_root() / "tokenized" / f"{key}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        return dataset.map(
            lambda batch: task.tokenize(batch, self.tokenizer),
            batched=True,
            remove_columns=dataset.column_names,
            cache_file_name=str(path),
            new_fingerprint=key,
            desc=f"tokenizing {name}/{split}",
        )

    def setup(self, stage: str) -> None:
        model_tasks = self.trainer.lightning_module.tasks if self.trainer else self.tasks
        unknown, unfed = (
            sorted(set(self.sources) - set(model_tasks)),
            sorted(set(model_tasks) - set(self.sources)),
        )
        if unknown or unfed:
            raise UserError(
                f"data.sources and model.tasks must name the same tasks: sources without a task {unknown}, "
                f"tasks without a source {unfed}"
            )
        self.tasks = dict(model_tasks)
        stage = str(getattr(stage, "value", stage))
        needed = {"fit": ("train", "validation"), "validate": ("validation",), "predict": ("predict",)}.get(
            stage, ("test",)
        )
        without: dict[str, list[str]] = {split: [] for split in needed}  # tasks with no data for it
        for name, task in self.tasks.items():
            for split in needed:
                if name in self.examples[split]:
                    continue
                seed = self.seed + {"train": 0, "validation": 1, "test": 2, "predict": 2}[split]
                tokenized = self._tokenized(name, split)
                if tokenized is None:
                    without[split].append(name)
                    continue
                self.examples[split][name] = task.build_examples(tokenized, self.tokenizer, split, seed)
        for split, names in without.items():
            if names and (split not in PARTIAL_SPLITS or not self.examples[split]):
                raise UserError(
                    f"this command needs {split} data: set data.sources.{names[0]}.{split}_path (a local "
                    f"file) or {split}_split (a hub split)"
                )
            if names:
                rank_zero_info(f"{split}: no {split} data for task(s) {', '.join(names)}; they are left out")

    def _world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _process_batch_size(self) -> int:
        """Training examples per step of this process: data.batch_size, or this process's share of
        data.global_batch_size."""
        if self.global_batch_size is None:
            return self.batch_size
        _, world_size = self._world()
        if self.global_batch_size % world_size:
            raise UserError(
                f"data.global_batch_size={self.global_batch_size} does not split evenly among {world_size} "
                f"processes (devices x nodes); make it a multiple of {world_size}"
            )
        return self.global_batch_size // world_size

    def _loader(
        self, examples: dict[str, Any], batch_sampler, loader_class=DataLoader, **extra
    ) -> DataLoader:
        return loader_class(
            TaggedExamples(examples),
            batch_sampler=batch_sampler,
            collate_fn=TaskCollator(self.tasks, self.tokenizer),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator),
            **extra,
        )

    def _example_lengths(self) -> dict[str, np.ndarray]:
        """Task -> (size,) tokens of each training example, for the tasks that report lengths."""
        lengths = {}
        for name, examples in self.examples["train"].items():
            task = self.tasks[name]
            if examples and task.example_length(examples[0]) is not None:
                lengths[name] = np.array([task.example_length(e) for e in examples], dtype=np.int64)
        return lengths

    def _batches_done(self) -> int:
        """Training batches whose step ran in the current epoch (what a resumed run must not see again)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        sizes = {name: len(examples) for name, examples in self.examples["train"].items()}
        rank, world_size = self._world()
        sampler = MixtureBatchSampler(
            sizes,
            mixing_rates(sizes, self.mixture),
            self._process_batch_size(),
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            steps_per_epoch=self.steps_per_epoch,
            lengths=self._example_lengths() if self.group_by_length else None,
            length_window=self.group_by_length,
        )
        return self._loader(self.examples["train"], sampler, ResumableLoader, batches_done=self._batches_done)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        """One in-order loader per task, so metrics and predictions stay per task."""
        rank, world_size = self._world()
        return [
            self._loader(
                self.examples[split],
                EvalBatchSampler(
                    name,
                    len(examples),
                    self.eval_batch_size or self._process_batch_size(),
                    self.seed,
                    rank,
                    world_size,
                ),
            )
            for name, examples in sorted(self.examples[split].items())
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("predict")


PARTIAL_SPLITS = ("test", "predict")
"""Splits a run may have for some tasks only: `polyhead test` / `predict` of a multi-task model
scores or predicts the tasks given data and leaves the others out."""


def source_identity(source: DataSource) -> dict:
    """What the cached tokenization of a source depends on: its settings and its files' size and age
    (each file of a mapping of aligned files)."""

    def file_identity(path: str) -> str | list:
        if not os.path.isfile(path):
            return path  # a glob, or a file that loading will report missing
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]

    identity = asdict(source)
    for key in ("path", "validation_path", "test_path", "predict_path"):
        path = identity[key]
        if isinstance(path, dict):
            identity[key] = {column: file_identity(file) for column, file in path.items()}
        elif path:
            identity[key] = file_identity(path)
    return identity
