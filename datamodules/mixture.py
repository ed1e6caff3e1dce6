"""Multi-task mixing: which task each training step draws from, and which examples.

Rates follow the T5 paper: examples-proportional (with an optional cap K on a task's size),
temperature-scaled (rates ** 1/T, renormalised) and equal. Every batch holds one task. The
sampler is a pure function of (seed, epoch, step): each task reads an endless stream of shuffled
passes over its examples, so a run resumed at any step draws exactly what the uninterrupted run
would have, and under DDP each rank takes its own slice of the same global batch.

Length grouping (as HF's `group_by_length`): each shuffled pass is cut into windows of a few
dozen global batches and each window is sorted by length, so a batch holds examples of similar
length and pads little, while which examples meet in a window stays random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch.utils.data import Sampler

from modules.errors import UserError


@dataclass
class MixtureConfig:
    strategy: Literal["proportional", "temperature", "equal"] = "proportional"
    """How often each task is drawn: by dataset size, size smoothed by a temperature, or uniformly."""
    cap: int | None = None
    """Examples-proportional cap K: a task counts as at most K examples."""
    temperature: float = 2.0
    """Temperature T for the "temperature" strategy (1 = proportional, large = equal)."""


def mixing_rates(sizes: dict[str, int], config: MixtureConfig) -> dict[str, float]:
    """Task -> probability of drawing a batch from it."""
    if config.cap is not None and config.cap <= 0:
        raise UserError(f"data.mixture.cap must be positive, got {config.cap}")
    if config.strategy == "temperature" and config.temperature <= 0:
        raise UserError(f"data.mixture.temperature must be positive, got {config.temperature}")
    sizes_capped = {t: min(n, config.cap) if config.cap else n for t, n in sizes.items()}
    if config.strategy == "equal":
        weights = {t: 1.0 for t in sizes}
    elif config.strategy == "temperature":
        weights = {t: float(n) ** (1.0 / config.temperature) for t, n in sizes_capped.items()}
    else:
        weights = {t: float(n) for t, n in sizes_capped.items()}
    total = sum(weights.values())
    if total <= 0:
        raise UserError("data.mixture: every task has zero weight; each task needs training examples")
    return {t: w / total for t, w in weights.items()}


def mix_seed(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): independent seeds from structured indices."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class MixtureBatchSampler(Sampler):
    """Yields batches of (task, example index, example seed), one task per batch.

    sizes: examples per task; batch_size is per process; steps_per_epoch defaults to one pass over
    all examples at the global batch size.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        rates: dict[str, float],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: int | None = None,
        lengths: dict[str, np.ndarray] | None = None,
        length_window: int = 0,
    ) -> None:
        """lengths: task -> (size,) tokens of each example, for the tasks to group by length;
        length_window: global batches per sorted window (0: no grouping)."""
        self.tasks = sorted(sizes)
        self.sizes = [sizes[t] for t in self.tasks]
        self.rates = np.array([rates[t] for t in self.tasks], dtype=np.float64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if steps_per_epoch is None:
            steps_per_epoch = max(1, sum(self.sizes) // self.global_batch)
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.start_step = 0, 0
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        lengths = lengths if length_window > 0 else {}
        self.lengths = [lengths.get(t) for t in self.tasks]
        self.length_window = length_window

    def __len__(self) -> int:
        """The whole epoch, even when resumed midway: Lightning counts on from the batches done."""
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at each epoch start."""
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def state_dict(self, steps_done_in_epoch: int) -> dict:
        return {"epoch": self.epoch, "step": steps_done_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the given step of the given epoch."""
        self.epoch, self.start_step, self.seed = state["epoch"], state["step"], state["seed"]

    def _choices(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch,) task index per step of an epoch."""
        if len(self.tasks) == 1:
            return np.zeros(self.steps_per_epoch, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.choice(len(self.tasks), size=self.steps_per_epoch, p=self.rates)

    def _permutation(self, task: int, pass_number: int) -> np.ndarray:
        key = (task, pass_number)
        if key not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, task, pass_number])
            order = rng.permutation(self.sizes[task])
            lengths = self.lengths[task]
            if lengths is not None:  # longest first within each window of the shuffled pass
                window = self.global_batch * self.length_window
                windows = [order[i : i + window] for i in range(0, len(order), window)]
                order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")] for w in windows])
            self._permutations[key] = order
        return self._permutations[key]

    def __iter__(self):
        consumed = np.zeros(len(self.tasks), dtype=np.int64)  # stream position per task
        for epoch in range(self.epoch):
            consumed += np.bincount(self._choices(epoch), minlength=len(self.tasks)) * self.global_batch
        choices = self._choices(self.epoch)
        consumed += np.bincount(choices[: self.start_step], minlength=len(self.tasks)) * self.global_batch
        for step in range(self.start_step, self.steps_per_epoch):
            task = int(choices[step])
            first = int(consumed[task]) + self.rank * self.batch_size
            batch = []
            for k in range(first, first + self.batch_size):
                pass_number, position = divmod(k, self.sizes[task])
                index = int(self._permutation(task, pass_number)[position])
                batch.append((self.tasks[task], index, mix_seed(self.seed, task, pass_number, index)))
            consumed[task] += self.global_batch
            yield batch
        self.start_step = 0
