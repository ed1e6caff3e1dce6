"""Decoding with fixed shapes (`GenerationConfig.cuda_graph`, `KVCache.fix_shapes`) decodes as the growing cache does.

With fixed shapes, a step writes the column a device tensor names and attends over the whole capacity,
the columns not yet written masked: what a GPU records once and replays (modules/decode_graph.py). On
the CPU the same fixed-shape step runs unrecorded, so these tests check, against the growing cache as
reference, everything the replayed step computes: every position scheme, padding on either side,
grouped-query attention, LSH and reversible layers, beam reordering. The recording itself needs a GPU
(the last test, skipped without one).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from modules.generation import GenerationConfig, generate
from tests.test_generation import LAYOUTS, STEPS, left_padded, model, right_padded, tiny

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


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("layout", ["learned", "relative", "llama", *LONG_INPUTS])
def test_fixed_shapes_decode_as_the_growing_cache_decoder_only(layout, decoding):
    """Left-padded prompts: padding inside the prefilled columns stays hidden on every fixed-shape step."""
    base = "learned" if layout in LONG_INPUTS else layout
    config = tiny(base, encoder_layers=0, **LONG_INPUTS.get(layout, {}))
    backbone, project = model(config)
    torch.manual_seed(1)
    prompt, mask = left_padded([torch.randint(2, 40, (n,)) for n in (5, 2, 4)])
    grown, fixed = both_ways(backbone, project, prompt, mask, DECODINGS[decoding], start_id=None)
    assert_same(grown, fixed)


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
def test_fixed_shapes_take_one_token_per_row():
    backbone, _ = model(tiny("learned", encoder_layers=0))
    cache = backbone.decoder_cache(capacity=8)
    backbone.decode(torch.randint(2, 40, (2, 3)), cache=cache)
    cache.fix_shapes(batch=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="one real token per row"):
        backbone.decode(torch.randint(2, 40, (2, 2)), cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a GPU")
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("layout", ["t5", "llama"])
def test_replayed_cuda_graph_decodes_as_the_eager_step_on_a_gpu(layout, decoding):
    """The recorded step (beam search: two recordings, one per buffer set) gives the eager step's tokens."""
    backbone, _ = model(tiny(layout))
    backbone = backbone.cuda()
    weight = torch.randn(40, backbone.config.d_model, device="cuda")
    source, mask = (t.cuda() for t in right_padded([7, 4, 6], total=7))
    settings = replace(DECODINGS[decoding], max_new_tokens=2 * STEPS)
    grown, fixed = both_ways(backbone, lambda h: h @ weight.T, source, mask, settings, start_id=0)
    assert_same(grown, fixed)
