"""Decoding with fixed shapes (`GenerationConfig.cuda_graph`, `KVCache.fix_shapes`) decodes as the growing cache does.

With fixed shapes, a step writes the column a device tensor names and attends over the whole capacity,
the columns not yet written masked: what a GPU records once and replays (modules/decode_graph.py). On
the CPU the same fixed-shape step runs unrecorded, so these tests check, against the growing cache as
reference, everything the replayed step computes: every position scheme, padding on either side,
grouped-query attention, LSH and reversible layers, beam reordering. The recording itself needs a GPU
(the last test, skipped without one).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import pytest
import torch

from modules.decode_graph import GraphedStep
from modules.generation import GenerationConfig, generate
from tests.test_generation import (
    LAYOUTS,
    STEPS,
    eos_for_some_rows,
    left_padded,
    model,
    right_padded,
    tiny,
)

LONG_INPUTS = {  # LSH self-attention in the upper layer; reversible layers (pre-norm, decoder-only)
    "lsh": dict(attention=["full", "lsh"], lsh_n_hashes=2, lsh_bucket_size=4),
    "reversible": dict(reversible=True, norm="pre"),
}
DECODINGS = {
    "greedy": GenerationConfig(max_new_tokens=STEPS),
    "beam": GenerationConfig(strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=STEPS),
    "sample": GenerationConfig(strategy="sample", num_return_sequences=2, seed=3, max_new_tokens=STEPS),
}


def both_ways(backbone, project, ids, mask, settings: GenerationConfig, start_id: int | None):
    """(growing cache, fixed shapes) generations of the same call."""
    return [
        generate(backbone, project, ids, mask, replace(settings, cuda_graph=fixed), start_id=start_id)
        for fixed in (False, True)
    ]


def assert_same(grown, fixed) -> None:
    assert fixed.tokens.tolist() == grown.tokens.tolist()
    if grown.scores is not None:
        torch.testing.assert_close(fixed.scores, grown.scores)


@pytest.mark.parametrize("decoding", DECODINGS)
@pytest.mark.parametrize("layout", [*LAYOUTS, "lsh"])
def test_fixed_shapes_decode_as_the_growing_cache_encoder_decoder(layout, decoding):
    """Right-padded sources of several lengths; beam search reorders the cache every step."""
    base = "learned" if layout in LONG_INPUTS else layout
    backbone, project = model(tiny(base, **LONG_INPUTS.get(layout, {})))
    source, mask = right_padded([7, 4, 6], total=7)
    grown, fixed = both_ways(backbone, project, source, mask, DECODINGS[decoding], start_id=0)
    assert_same(grown, fixed)


@pytest.mark.parametrize("decoding", DECODINGS)
@pytest.mark.parametrize("layout", ["learned", "relative", "llama", "qwen", *LONG_INPUTS])
def test_fixed_shapes_decode_as_the_growing_cache_decoder_only(layout, decoding):
    """Left-padded prompts: padding inside the prefilled columns stays hidden on every fixed-shape step."""
    base = "learned" if layout in LONG_INPUTS else layout
    config = tiny(base, encoder_layers=0, **LONG_INPUTS.get(layout, {}))
    backbone, project = model(config)
    torch.manual_seed(1)
    prompt, mask = left_padded([torch.randint(2, 40, (n,)) for n in (5, 2, 4)])
    grown, fixed = both_ways(backbone, project, prompt, mask, DECODINGS[decoding], start_id=None)
    assert_same(grown, fixed)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_fixed_shapes_stop_at_eos_and_ban_repeats_as_the_growing_cache(strategy):
    """An eos that ends some rows early (picked from a free run) and no_repeat_ngram_size 2."""
    backbone, project = model(tiny("t5"))
    source, mask = right_padded([7, 4, 6, 5], total=7)
    free = generate(backbone, project, source, mask, GenerationConfig(max_new_tokens=STEPS), start_id=0)
    settings = replace(DECODINGS[strategy], eos_id=eos_for_some_rows(free.tokens), no_repeat_ngram_size=2)
    grown, fixed = both_ways(backbone, project, source, mask, settings, start_id=0)
    assert_same(grown, fixed)
    assert (grown.tokens == settings.pad_id).any()  # some row did stop early


@torch.no_grad()
def test_columns_not_yet_written_are_never_attended():
    """Whatever the capacity's unwritten columns hold, a fixed-shape step's output is the same: here
    they are filled with large keys and values, which any weight on them would show."""
    backbone, _ = model(tiny("t5", encoder_layers=0))
    prompt = torch.randint(2, 40, (2, 4))
    outputs = []
    for garbage in (0.0, 1e3):
        cache = backbone.decoder_cache(capacity=12)
        backbone.decode(prompt, cache=cache)
        cache.fix_shapes(batch=2, device=prompt.device)
        for layer in cache.layers:
            layer.keys[:, :, cache.length :] = garbage
            layer.values[:, :, cache.length :] = garbage
        steps = [backbone.decode(prompt[:, i : i + 1], cache=cache) for i in range(3)]  # (2, 1, D) each
        outputs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    assert cache.length == 7 and int(cache.column) == 7


@torch.no_grad()
@pytest.mark.parametrize("layout", ["t5", "llama", "learned"])
def test_a_fixed_shape_step_reads_no_host_count(layout):
    """A replayed step runs none of its Python, so nothing it computes may come from the host's count
    of filled columns: with every layer's count made wrong before each step, the outputs are the same."""
    backbone, _ = model(tiny(layout))
    memory = backbone.encode(torch.randint(2, 40, (2, 6)))
    outputs = []
    for wrong in (0, 3):
        cache = backbone.decoder_cache(capacity=8)
        backbone.decode(torch.zeros(2, 1, dtype=torch.long), memory=memory, cache=cache)
        cache.fix_shapes(batch=2, device=memory.device)
        steps = []
        for i in range(4):
            true_length = cache.length
            for layer in cache.layers:
                layer.length = (true_length + wrong) % 5
            ids = torch.full((2, 1), 2 + i)
            steps.append(
                backbone.decode(ids, memory=memory, cache=cache, positions=torch.full((2, 1), 1 + i))
            )
            for layer in cache.layers:
                layer.length = true_length + 1
        outputs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_the_cache_is_freed_when_generate_returns(monkeypatch):
    """Nothing keeps a generation's cache (or, on a GPU, its recordings) alive in a reference cycle,
    which only Python's rare full collections would free: validation generates once per batch."""
    backbone, project = model(tiny("t5"))
    made = []
    make_cache = type(backbone).decoder_cache
    monkeypatch.setattr(
        type(backbone), "decoder_cache", lambda self, n: made.append(make_cache(self, n)) or made[-1]
    )
    source, mask = right_padded([7, 4, 6], total=7)
    gc.disable()
    try:
        for fixed in (False, True):
            settings = replace(DECODINGS["beam"], cuda_graph=fixed)
            generate(backbone, project, source, mask, settings, start_id=0)
            cache = weakref.ref(made.pop())
            assert cache() is None
    finally:
        gc.enable()


@torch.no_grad()
def test_fixed_shapes_take_one_token_per_row():
    backbone, _ = model(tiny("learned", encoder_layers=0))
    cache = backbone.decoder_cache(capacity=8)
    backbone.decode(torch.randint(2, 40, (2, 3)), cache=cache)
    cache.fix_shapes(batch=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="one real token per row"):
        backbone.decode(torch.randint(2, 40, (2, 2)), cache=cache)


GPU_CASES = {  # (layout, encoder layers): T5 and LLaMA encoder-decoder, GPT-2-like decoder-only
    "t5": ("t5", 2),
    "llama": ("llama", 2),
    "decoder-only": ("learned", 0),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a GPU")
@pytest.mark.parametrize("decoding", DECODINGS)
@pytest.mark.parametrize("case", GPU_CASES)
def test_replayed_cuda_graph_decodes_as_the_eager_step_on_a_gpu(case, decoding, monkeypatch):
    """The recorded step gives the eager step's tokens on the GPU, recorded once (beam search: twice,
    one per cache buffer set). In float64, so that no near-tie can flip with the order of a sum."""
    layout, encoder_layers = GPU_CASES[case]
    backbone, _ = model(tiny(layout, encoder_layers=encoder_layers))
    backbone = backbone.cuda().double()
    weight = torch.randn(40, backbone.config.d_model, device="cuda", dtype=torch.float64)
    recordings = []
    record = GraphedStep._record
    monkeypatch.setattr(GraphedStep, "_record", lambda self, key: recordings.append(key) or record(self, key))
    if encoder_layers:
        ids, mask = right_padded([7, 4, 6], total=7)
    else:
        ids, mask = left_padded([torch.randint(2, 40, (n,)) for n in (5, 2, 4)])
    settings = replace(DECODINGS[decoding], max_new_tokens=2 * STEPS)
    start = 0 if encoder_layers else None
    grown, fixed = both_ways(backbone, lambda h: h @ weight.T, ids.cuda(), mask.cuda(), settings, start)
    assert_same(grown, fixed)
    assert len(recordings) == (2 if decoding == "beam" else 1)
