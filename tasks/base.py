"""`Task`: everything one objective needs on top of the shared backbone.

A task turns raw examples into tensors (tokenize -> build_examples -> collate), runs the
backbone and its own head (forward), scores the result (loss, metrics) and names a trivial
baseline to compare with. Adding a task is one subclass in `tasks/` and one config; the model,
data module and CLI find it by its class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn
from torchmetrics import MetricCollection

from datamodules.padding import real_tokens
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError


def check_fits_positions(config: BackboneConfig, length: int, what: str) -> None:
    """Refuse, when the model is built, an input length beyond the backbone's learned or sinusoidal
    positions: otherwise the first long enough batch would fail mid-run. Relative and rotary positions
    have no limit."""
    if length > config.max_len and config.absolute_positions:
        raise UserError(
            f"{what} = {length} exceeds model.backbone.max_len={config.max_len}; lower it or raise max_len"
        )


class Task:
    stacks: ClassVar[str] = "encoder"
    """Which backbone stacks the task needs: "encoder", "decoder" or "encoder-decoder"."""
    fields: tuple[str, ...] = ()
    """Text fields every raw example must have (after the source's column mapping)."""
    value_fields: tuple[str, ...] = ()
    """Non-text fields every raw example must have: scores, labels."""
    number_fields: tuple[str, ...] = ()
    """Those of `value_fields` read as numbers (scores): a value that is not one stops the run, naming the line."""
    list_fields: tuple[str, ...] = ()
    """Text fields that may hold a list of texts instead of one (sentences of a document, several
    references); the task's tokenize receives them as lists."""
    special_tokens: tuple[str, ...] = ()
    """Special tokens the task builds its inputs with, by role ("pad", "cls", "sep", "mask", "eos",
    "start"; see datamodules/tokenizer.py): a vocabulary without one is refused when the model is built."""

    @property
    def predict_fields(self) -> tuple[str, ...]:
        """Text fields of the inputs `polyhead predict` reads (a task may predict from less than it trains on)."""
        return self.fields

    def __init__(self, loss_weight: float = 1.0) -> None:
        """loss_weight: multiplies this task's loss in the training objective."""
        if loss_weight < 0:
            raise UserError(f"loss_weight must be >= 0, got {loss_weight}")
        self.loss_weight = loss_weight

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments, saved in checkpoints so the task can be rebuilt without a config."""
        raise NotImplementedError

    def build_head(self, config: BackboneConfig) -> nn.Module:
        raise NotImplementedError

    def use_tokenizer(self, tokenizer: Tokenizer, name: str) -> None:
        """Called once when the model is built with the run's tokenizer (`name`: this task's name in
        it): refuse a vocabulary that lacks a special token the task needs, before any data is read.
        A task that needs token ids where no tokenizer is passed (generation) keeps them here."""
        tokenizer.require(self.special_tokens, f"model.tasks.{name} ({type(self).__name__})")

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        """A batch of raw examples (column -> values) -> tokenized columns; run through datasets.map."""
        raise NotImplementedError

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int) -> Sequence[Any]:
        """Tokenized dataset -> the indexable examples of one split ("train", "validation", "test" or
        "predict"; predict data hold only the predict fields)."""
        return tokenized

    def on_train_epoch_start(self, model, name: str) -> None:
        """Called by the model at every training epoch start (`model` is the MultiTaskModel, `name` this
        task's name in it): the place for work between epochs, such as mining new hard negatives."""

    def example_length(self, example: Any) -> int | None:
        """Tokens of one training example, for `data.group_by_length`; None (the default): this task's
        batches keep their random composition (a P x K batch of groups, say, must not be reordered)."""
        return None

    def collate(self, examples: list[Any], seeds: list[int], tokenizer: Tokenizer) -> dict[str, Tensor]:
        """Examples -> one batch of tensors. `seeds` make per-example randomness (masking) reproducible.
        Every stack's (B, T) mask of real tokens goes under a key ending in "attention_mask": that is
        how throughput (tokens per second, `batch_tokens`) counts what a batch holds."""
        raise NotImplementedError

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """-> named losses; "loss" is the one optimised, the others are logged beside it."""
        raise NotImplementedError

    def metrics(self, vocab_size: int) -> MetricCollection:
        """Fresh validation metrics (torchmetrics syncs them across processes)."""
        raise NotImplementedError

    def update_metrics(
        self,
        metrics: MetricCollection,
        outputs: dict[str, Tensor],
        batch: dict[str, Tensor],
        tokenizer: Tokenizer,
    ) -> None:
        """Add one evaluation batch to the metrics (`tokenizer` turns generated ids into text)."""
        raise NotImplementedError

    def take_samples(self) -> tuple[list[str], list[list[str]]] | None:
        """(column names, rows) of a few examples from the last evaluation, shown as a W&B table
        (generated text beside its input and reference); None when the task keeps none. Taking
        them empties the buffer for the next evaluation."""
        return None

    def predict(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], tokenizer: Tokenizer
    ) -> list[dict]:
        """Model outputs -> one JSON-ready record per example (what `polyhead predict` writes)."""
        raise NotImplementedError

    @property
    def monitor(self) -> tuple[str, str]:
        """(metric name, "min" | "max"): the one number that says how well this task is doing."""
        return "loss", "min"


def task_class(name: str) -> type[Task]:
    """The Task subclass called `name` (checkpoints store task classes by name)."""
    pending, found = list(Task.__subclasses__()), {}
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    if name not in found:
        raise UserError(f"unknown task {name!r}; known tasks: {sorted(found)}")
    return found[name]


def label_positions(labels: Tensor, ignore: int = -100) -> Tensor:
    """(R, T) labels with `ignore` where a position has none -> (N,) flat indices of the labelled
    positions, row by row. Collate computes them on the host: a training step then gathers those
    positions with index_select, where a boolean mask would make the GPU stop and count them."""
    return (labels != ignore).flatten().nonzero().squeeze(1)


def at_positions(values: Tensor, positions: Tensor) -> Tensor:
    """(R, T, ...) values per position -> (N, ...) those at `positions`, flat indices into R * T
    (`label_positions`, or packed rows' [CLS] columns)."""
    return values.flatten(0, 1).index_select(0, positions)


def packed_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Which inputs share each row when packing: consecutive inputs while their lengths fit in
    `capacity` (first fit in order, so the inputs keep their order along the rows)."""
    rows: list[list[int]] = []
    used = capacity
    for i, length in enumerate(lengths):
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


def batch_examples(batch: dict) -> int:
    """Examples in a batch: the leading size of its first tensor (every task's tensors share it; a
    packed row counts once, as counting its documents would stall a GPU step to read them)."""
    return len(next(v for v in batch.values() if isinstance(v, Tensor)))


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch: every attention mask of every stack, summed."""
    return sum(real_tokens(batch, k) for k in batch if k.endswith("attention_mask"))


def batch_stack_sizes(batch: dict) -> tuple[int, int, int, int]:
    """(real tokens, padded length) of what the first stack reads (every attention mask but a
    decoder's and a generation prompt's: an encoder's inputs, or a decoder-only model's sequence),
    then the same of an encoder-decoder's decoder inputs ((0, 0) without any): what the model
    FLOPs of a training step (modules/flops.py) are counted over."""
    masks = {k: v for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith("prompt")}
    first = [k for k in masks if not k.startswith("decoder_")]
    decoder = masks.get("decoder_attention_mask")
    return (
        sum(real_tokens(batch, k) for k in first),
        max(masks[k].size(-1) for k in first),
        0 if decoder is None else real_tokens(batch, "decoder_attention_mask"),
        0 if decoder is None else decoder.size(-1),
    )
