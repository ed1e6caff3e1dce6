"""The mixture sampler: rates, exact resume, and disjoint DDP shards of the same global batch."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.mixture import MixtureBatchSampler, MixtureConfig, mixing_rates
from modules.errors import UserError


def test_rates_follow_the_t5_definitions():
    sizes = {"a": 9000, "b": 1000}
    assert mixing_rates(sizes, MixtureConfig("proportional")) == pytest.approx({"a": 0.9, "b": 0.1})
    assert mixing_rates(sizes, MixtureConfig("proportional", cap=2000)) == pytest.approx(
        {"a": 2 / 3, "b": 1 / 3}
    )
    assert mixing_rates(sizes, MixtureConfig("equal")) == pytest.approx({"a": 0.5, "b": 0.5})
    t2 = mixing_rates(sizes, MixtureConfig("temperature", temperature=2.0))
    assert t2["a"] == pytest.approx(3 / 4)  # sqrt(9000) : sqrt(1000) = 3 : 1
    with pytest.raises(UserError):
        mixing_rates({"a": 0, "b": 0}, MixtureConfig())


def _draw(sampler, epochs=2):
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.extend(list(sampler))
    return out


def test_one_task_epoch_is_one_pass_without_repeats():
    sampler = MixtureBatchSampler({"t": 64}, {"t": 1.0}, batch_size=8)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8
    assert sorted(i for b in batches for _, i, _ in b) == list(range(64))


def test_task_shares_match_rates():
    sampler = MixtureBatchSampler({"a": 3000, "b": 1000}, {"a": 0.75, "b": 0.25}, batch_size=4, seed=3)
    tasks = [b[0][0] for b in sampler]
    assert abs(tasks.count("a") / len(tasks) - 0.75) < 0.05
    assert all(len({t for t, _, _ in b}) == 1 for b in sampler), "a batch mixes tasks"


def test_resume_at_any_step_continues_the_same_stream():
    args = ({"a": 50, "b": 30}, {"a": 0.6, "b": 0.4}, 4)
    full = _draw(MixtureBatchSampler(*args, seed=1), epochs=3)
    steps = MixtureBatchSampler(*args, seed=1).steps_per_epoch
    for epoch, step in [(0, 5), (1, 0), (2, steps - 1)]:
        resumed = MixtureBatchSampler(*args, seed=1)
        resumed.load_state_dict(resumed.state_dict(0) | {"epoch": epoch, "step": step})
        rest = list(resumed)
        for later in range(epoch + 1, 3):
            resumed.set_epoch(later)
            rest.extend(list(resumed))
        assert rest == full[epoch * steps + step :]


def test_ddp_ranks_split_the_global_batch_disjointly():
    sizes, rates = {"a": 100, "b": 60}, {"a": 0.5, "b": 0.5}
    single = list(MixtureBatchSampler(sizes, rates, batch_size=8, seed=2, steps_per_epoch=10))
    ranks = [
        list(
            MixtureBatchSampler(sizes, rates, batch_size=4, seed=2, rank=r, world_size=2, steps_per_epoch=10)
        )
        for r in range(2)
    ]
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
        assert not {i for _, i, _ in ranks[0][step]} & {i for _, i, _ in ranks[1][step]}


def test_length_grouping_reorders_within_windows_and_pads_less():
    """Each pass still holds every example once, only reordered inside windows of 4 batches; the
    examples of a batch differ little in length, so padding (to the longest of the batch) shrinks."""
    lengths = np.random.default_rng(0).integers(5, 200, size=256)

    def padding(sampler) -> int:
        return sum(
            int(lengths[[i for _, i, _ in b]].max()) * len(b) - int(lengths[[i for _, i, _ in b]].sum())
            for b in sampler
        )

    plain = MixtureBatchSampler({"t": 256}, {"t": 1.0}, batch_size=8, seed=5)
    grouped = MixtureBatchSampler(
        {"t": 256}, {"t": 1.0}, batch_size=8, seed=5, lengths={"t": lengths}, length_window=4
    )
    batches = list(grouped)
    assert sorted(i for b in batches for _, i, _ in b) == list(range(256))
    windows = [list(plain)[w : w + 4] for w in range(0, 32, 4)], [batches[w : w + 4] for w in range(0, 32, 4)]
    for before, after in zip(*windows, strict=True):  # the same examples meet in a window
        assert sorted(i for b in before for _, i, _ in b) == sorted(i for b in after for _, i, _ in b)
    assert padding(grouped) < padding(plain) / 3
