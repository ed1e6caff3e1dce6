"""Generation on the KV cache gives what recomputing the whole sequence gives.

References are independent of modules/generation.py: greedy decoding that re-runs the full decoder each
step without a cache, each prompt decoded alone without padding, exhaustive enumeration of every
sequence for beam search (HF's `generate` is the reference in test_generation_hf.py).
Models are tiny, randomly initialised with init_std 0.1 (5x the default) so that outputs depend on the
context (a wrong cache, position or mask changes the tokens); eval mode, fp32. Where eos matters it is
picked from a free run so that some rows end early and others run on.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.generation import GenerationConfig, generate

STEPS = 10


LLAMA = dict(  # rotary positions, grouped-query attention (2 kv heads for 4), SwiGLU
    position="rotary",
    n_kv_heads=2,
    norm="pre",
    norm_type="rmsnorm",
    bias=False,
    embedding_norm=False,
    type_vocab_size=0,
    gated_ff=True,
    activation="silu",
)
LAYOUTS = {
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "relative": dict(position="relative"),
    "t5": dict(
        position="relative",
        norm="pre",
        norm_type="rmsnorm",
        bias=False,
        embedding_norm=False,
        type_vocab_size=0,
        scale_attention=False,
    ),
    "llama": LLAMA,
    # q/k/v biases (Qwen2), per-head query/key norms and a head width of its own (Qwen3)
    "qwen": LLAMA | dict(qkv_bias=True, qk_norm=True, head_dim=6),
}


def tiny(layout: str = "learned", encoder_layers: int = 2, **overrides) -> BackboneConfig:
    values = dict(
        vocab_size=40,
        d_model=32,
        n_heads=4,
        d_ff=64,
        encoder_layers=encoder_layers,
        decoder_layers=2,
        max_len=40,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=0.1,
        relative_buckets=8,
        relative_max_distance=16,
        **LAYOUTS[layout],
    )
    values.update(overrides)
    return BackboneConfig(**values)


def model(config: BackboneConfig, vocab_out: int = 40, seed: int = 0):
    """A backbone and a random output projection (N, D) -> (N, vocab_out)."""
    torch.manual_seed(seed)
    backbone = Backbone(config).eval()
    weight = torch.randn(vocab_out, config.d_model)

    def project(hidden: Tensor) -> Tensor:
        return hidden @ weight.T

    return backbone, project


def right_padded(lengths: list[int], total: int, vocab: int = 40) -> tuple[Tensor, Tensor]:
    """Random ids 2..vocab-1, mask 1 on each row's first `length` positions; pads hold garbage ids."""
    ids = torch.randint(2, vocab, (len(lengths), total))
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def left_padded(prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Prompts right-aligned in one batch; pads hold garbage ids so an unmasked pad would show."""
    total = max(len(p) for p in prompts)
    ids = torch.randint(2, 40, (len(prompts), total))
    mask = torch.zeros(len(prompts), total, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, total - len(prompt) :] = prompt
        mask[row, total - len(prompt) :] = 1
    return ids, mask


def eos_for_some_rows(tokens: Tensor) -> int:
    """A token that some rows of a free run (B, L) produce and others never do: used as eos, it ends
    some rows early while the rest run on. The earliest such token, so rows end after a few steps."""
    rows = [set(row) for row in tokens.tolist()]
    for column in range(tokens.size(1)):
        for token in tokens[:, column].tolist():
            if not all(token in row for row in rows):
                return token
    raise AssertionError("every row produces the same tokens; the case needs a different model")


@torch.no_grad()
def greedy_without_cache(backbone, project, source, source_mask, start_id: int, steps: int) -> Tensor:
    """Seq2seq greedy that re-runs the decoder over the whole prefix every step. -> (B, steps)"""
    memory = backbone.encode(source, source_mask)
    out = torch.full((source.size(0), 1), start_id)
    for _ in range(steps):
        hidden = backbone.decode(out, memory=memory, memory_mask=source_mask)[:, -1]
        out = torch.cat([out, project(hidden).argmax(-1, keepdim=True)], dim=1)
    return out[:, 1:]


@torch.no_grad()
def greedy_alone(backbone, project, prompt: Tensor, steps: int) -> Tensor:
    """Decoder-only greedy on one unpadded prompt (T,), recomputing everything each step. -> (steps,)"""
    ids = prompt[None]
    for _ in range(steps):
        ids = torch.cat([ids, project(backbone.decode(ids)[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :]


# ----------------------------------------------------------------------------------- cache correctness


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_decode_matches_full_decode(layout):
    """The cache API itself: prefill + one token at a time gives the hidden states of one full pass,
    and cross-attention projects the memory once per layer, not once per step."""
    backbone, _ = model(tiny(layout))
    source, source_mask = right_padded([9, 5], 9)
    target = torch.randint(2, 40, (2, 8))
    projections = []
    for layer in backbone.decoder.layers:
        layer.cross_attn.kv.register_forward_hook(lambda *args: projections.append(1))
    with torch.no_grad():
        memory = backbone.encode(source, source_mask)
        full = backbone.decode(target, memory=memory, memory_mask=source_mask)
        cache = backbone.decoder_cache(8)
        projections.clear()
        steps = [backbone.decode(target[:, :3], memory=memory, memory_mask=source_mask, cache=cache)]
        for t in range(3, 8):
            steps.append(
                backbone.decode(target[:, t : t + 1], memory=memory, memory_mask=source_mask, cache=cache)
            )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert len(projections) == len(backbone.decoder.layers)
    with pytest.raises(ValueError, match="capacity 8 exceeded"):
        backbone.decode(target[:, :1], memory=memory, memory_mask=source_mask, cache=cache)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_with_cache_equals_recomputation_encoder_decoder(layout):
    backbone, project = model(tiny(layout))
    source, source_mask = right_padded([11, 7, 3], 11)
    out = generate(
        backbone, project, source, source_mask, GenerationConfig(max_new_tokens=STEPS), start_id=0
    ).tokens
    reference = greedy_without_cache(backbone, project, source, source_mask, start_id=0, steps=STEPS)
    assert out.tolist() == reference.tolist()
    assert len({tuple(row) for row in out.tolist()}) == 3, "rows differ, so the source matters"


def test_a_given_encoding_is_used_and_masks_that_hide_nothing_are_dropped(monkeypatch):
    """Seq2seq validation passes the encoder output it computed for the loss: the source is not
    encoded again. A source or prompt mask of all ones reaches the decoder as no mask (the unmasked
    attention kernel; the backbone leaves a GPU mask unread), with the same tokens."""
    backbone, project = model(tiny())
    source, _ = right_padded([9, 9], 9)
    full = torch.ones_like(source)
    settings = GenerationConfig(max_new_tokens=4)
    calls = {"encode": 0, "masks": []}
    encode, decode = Backbone.encode, Backbone.decode
    monkeypatch.setattr(
        Backbone,
        "encode",
        lambda self, *a, **k: calls.update(encode=calls["encode"] + 1) or encode(self, *a, **k),
    )
    monkeypatch.setattr(
        Backbone,
        "decode",
        lambda self, ids, mask=None, memory=None, memory_mask=None, **k: (
            calls["masks"].append((mask, memory_mask)) or decode(self, ids, mask, memory, memory_mask, **k)
        ),
    )
    with torch.no_grad():
        memory = encode(backbone, source, full)
        given = generate(backbone, project, source, full, settings, start_id=0, memory=memory).tokens
        assert calls["encode"] == 0 and all(m is None and mm is None for m, mm in calls["masks"])
        assert torch.equal(given, generate(backbone, project, source, None, settings, start_id=0).tokens)
        calls["masks"].clear()
        decoder_only = generate(backbone, project, source, full, settings).tokens
        assert calls["masks"] and all(m is None for m, _ in calls["masks"])
        assert torch.equal(decoder_only, generate(backbone, project, source, None, settings).tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("encoder_layers", [0, 2], ids=["decoder-only", "decoder-of-encoder-decoder"])
def test_left_padded_batch_equals_each_prompt_alone_without_cache(layout, encoder_layers):
    """A left-padded batch on the cache gives every row the tokens its unpadded prompt gets with full
    recomputation; with encoder layers, the decoder runs without cross-attention (a prefix LM)."""
    backbone, project = model(tiny(layout, encoder_layers=encoder_layers))
    prompts = [torch.randint(2, 40, (n,)) for n in (6, 2, 4)]
    ids, mask = left_padded(prompts)
    out = generate(backbone, project, ids, mask, GenerationConfig(max_new_tokens=STEPS)).tokens
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == greedy_alone(backbone, project, prompt, STEPS).tolist()


def test_left_padded_beam_batch_equals_each_prompt_alone():
    backbone, project = model(tiny("learned", encoder_layers=0))
    prompts = [torch.randint(2, 40, (n,)) for n in (5, 1, 3)]
    ids, mask = left_padded(prompts)
    settings = GenerationConfig(
        strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=6, eos_id=2
    )
    batch = generate(backbone, project, ids, mask, settings)
    ended = (batch.tokens == 2).any(dim=1)
    assert ended.any() and not ended.all(), "the case needs hypotheses that end early and ones that run on"
    for row, prompt in enumerate(prompts):
        alone = generate(backbone, project, prompt[None], None, settings)
        width = alone.tokens.size(1)
        assert batch.tokens[2 * row : 2 * row + 2, :width].tolist() == alone.tokens.tolist()
        assert (batch.tokens[2 * row : 2 * row + 2, width:] == 0).all()
        torch.testing.assert_close(batch.scores[2 * row : 2 * row + 2], alone.scores, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ stopping rules


def test_stops_at_eos_pads_finished_rows_and_stops_at_max_new_tokens():
    backbone, project = model(tiny("relative"))
    source, source_mask = right_padded([8, 6, 4, 8], 8)
    free = generate(
        backbone, project, source, source_mask, GenerationConfig(max_new_tokens=STEPS), start_id=0
    )
    assert free.tokens.shape == (4, STEPS)  # no eos: every row runs to max_new_tokens
    eos = eos_for_some_rows(free.tokens)
    out = generate(
        backbone,
        project,
        source,
        source_mask,
        GenerationConfig(max_new_tokens=STEPS, eos_id=eos, pad_id=39),
        0,
    ).tokens
    for row, tokens in zip(out.tolist(), free.tokens.tolist(), strict=True):
        end = tokens.index(eos) + 1 if eos in tokens else STEPS
        assert row[:end] == tokens[:end]
        assert row[end:] == [39] * (len(row) - end)
    assert out.size(1) == max(
        tokens.index(eos) + 1 if eos in tokens else STEPS for tokens in free.tokens.tolist()
    )

    # when every row ends, generation stops early: the output is only as wide as the longest row
    row = next(i for i, tokens in enumerate(free.tokens.tolist()) if eos in tokens)
    alone = generate(
        backbone,
        project,
        source[row : row + 1],
        source_mask[row : row + 1],
        GenerationConfig(max_new_tokens=STEPS, eos_id=eos),
        0,
    )
    assert alone.tokens.tolist() == [free.tokens[row, : free.tokens[row].tolist().index(eos) + 1].tolist()]


# ------------------------------------------------------------------------------------------ beam search


@pytest.mark.parametrize("encoder_layers", [0, 2], ids=["decoder-only", "encoder-decoder"])
def test_beam_of_width_one_is_greedy(encoder_layers):
    backbone, project = model(tiny("learned", encoder_layers=encoder_layers))
    ids, mask = right_padded([7, 7, 7], 7) if encoder_layers == 0 else right_padded([7, 4, 2], 7)
    start = None if encoder_layers == 0 else 0
    greedy = generate(backbone, project, ids, mask, GenerationConfig(max_new_tokens=STEPS), start)
    eos = eos_for_some_rows(greedy.tokens)
    greedy = generate(backbone, project, ids, mask, GenerationConfig(max_new_tokens=STEPS, eos_id=eos), start)
    beam = generate(
        backbone,
        project,
        ids,
        mask,
        GenerationConfig(strategy="beam", num_beams=1, length_penalty=0.0, max_new_tokens=STEPS, eos_id=eos),
        start,
    )
    assert beam.tokens.tolist() == greedy.tokens.tolist()


@torch.no_grad()
def enumerate_sequences(
    backbone, project, prefix: list[int], memory, memory_mask, vocab: int, eos: int, steps: int, alpha: float
):
    """Every sequence of at most `steps` tokens that ends at its first eos or at `steps`, with its score
    log p(sequence) / length ** alpha, computed by full decoder passes over prefix + sequence (prefix:
    the start token of an encoder-decoder, or a decoder-only prompt). Best first."""
    scored = []
    for length in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos in seq[:-1] or (length < steps and seq[-1] != eos):
                continue
            ids = torch.tensor([[*prefix, *seq[:-1]]])
            hidden = backbone.decode(ids, memory=memory, memory_mask=memory_mask)[0, len(prefix) - 1 :]
            log_probs = project(hidden).log_softmax(-1)  # (length, vocab)
            total = log_probs[torch.arange(length), torch.tensor(seq)].sum().item()
            scored.append((total / length**alpha, list(seq)))
    return sorted(scored, reverse=True)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_finds_the_best_sequences_of_an_exhaustive_enumeration(alpha):
    """With 4 output tokens and 16 beams, beam search over 3 steps keeps every live prefix, so its n-best
    list must be the n best of all sequences, scored independently by full decoder passes."""
    vocab, eos, steps, n = 4, 1, 3, 3
    backbone, project = model(tiny("relative"), vocab_out=vocab, seed=1)
    source, source_mask = right_padded([6, 3], 6)
    settings = GenerationConfig(
        strategy="beam",
        num_beams=vocab**2,
        num_return_sequences=n,
        length_penalty=alpha,
        max_new_tokens=steps,
        eos_id=eos,
    )
    out = generate(backbone, project, source, source_mask, settings, start_id=0)
    memory = backbone.encode(source, source_mask)
    for row in range(2):
        best = enumerate_sequences(
            backbone,
            project,
            [0],
            memory[row : row + 1],
            source_mask[row : row + 1],
            vocab,
            eos,
            steps,
            alpha,
        )[:n]
        for rank, (score, seq) in enumerate(best):
            got = out.tokens[row * n + rank].tolist()
            assert got[: len(seq)] == seq and all(t == 0 for t in got[len(seq) :])
            assert out.scores[row * n + rank].item() == pytest.approx(score, abs=1e-4)
        assert best[0][1] != best[1][1]


def test_decoder_only_beam_search_finds_the_best_continuations_of_an_exhaustive_enumeration():
    """Decoder-only: each left-padded prompt runs once and its cache is copied to its 16 beams; the
    n-best continuations must still be the n best of all, scored by full passes over prompt + sequence."""
    vocab, eos, steps, n = 4, 1, 3, 3
    backbone, project = model(tiny("relative", encoder_layers=0), vocab_out=vocab, seed=1)
    prompts = [torch.randint(2, 40, (length,)) for length in (6, 3)]
    ids, mask = left_padded(prompts)
    settings = GenerationConfig(
        strategy="beam", num_beams=vocab**2, num_return_sequences=n, max_new_tokens=steps, eos_id=eos
    )
    out = generate(backbone, project, ids, mask, settings)
    for row, prompt in enumerate(prompts):
        best = enumerate_sequences(backbone, project, prompt.tolist(), None, None, vocab, eos, steps, 1.0)[:n]
        for rank, (score, seq) in enumerate(best):
            got = out.tokens[row * n + rank].tolist()
            assert got[: len(seq)] == seq and all(t == 0 for t in got[len(seq) :])
            assert out.scores[row * n + rank].item() == pytest.approx(score, abs=1e-4)


# ----------------------------------------------------------------------------------------- sampling


def test_sampling_top_k_1_is_greedy_and_a_seed_repeats_its_samples():
    backbone, project = model(tiny("learned"))
    source, source_mask = right_padded([8, 5, 3], 8)
    greedy = generate(
        backbone, project, source, source_mask, GenerationConfig(max_new_tokens=STEPS), 0
    ).tokens
    top1 = GenerationConfig(strategy="sample", top_k=1, temperature=2.0, max_new_tokens=STEPS, seed=3)
    assert generate(backbone, project, source, source_mask, top1, 0).tokens.tolist() == greedy.tolist()

    hot = GenerationConfig(
        strategy="sample", temperature=3.0, num_return_sequences=4, max_new_tokens=STEPS, seed=7
    )
    first = generate(backbone, project, source, source_mask, hot, 0).tokens
    again = generate(backbone, project, source, source_mask, hot, 0).tokens
    other = generate(backbone, project, source, source_mask, replace(hot, seed=8), 0)
    assert first.shape == (3 * 4, STEPS)
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tokens.tolist()
    assert len({tuple(r) for r in first[:4].tolist()}) > 1, "the samples of one row differ"


@pytest.mark.parametrize(
    ("top_p", "nucleus"), [(0.75, {0, 1}), (0.5, {0}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_never_samples_outside_the_nucleus(top_p, nucleus):
    """A fixed distribution (0.5, 0.3, 0.1, 0.05, 0.05): the nucleus is the fewest top tokens holding top_p."""
    backbone, _ = model(tiny("learned", encoder_layers=0))
    logits = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]).log()

    def project(hidden: Tensor) -> Tensor:
        return logits.expand(hidden.size(0), -1)

    settings = GenerationConfig(
        strategy="sample", top_p=top_p, max_new_tokens=4, num_return_sequences=250, seed=0
    )
    tokens = generate(backbone, project, torch.tensor([[3, 4]]), None, settings).tokens  # 1000 draws
    assert set(tokens.unique().tolist()) == nucleus
    kept = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])[sorted(nucleus)]
    frequency = torch.bincount(tokens.flatten(), minlength=5)[sorted(nucleus)] / tokens.numel()
    torch.testing.assert_close(frequency, kept / kept.sum(), rtol=0, atol=0.05)


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(strategy="sample", temperature=0.0), "temperature must be > 0"),
        (dict(strategy="sample", temperature=-1.0), "temperature must be > 0"),
        (dict(strategy="sample", top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(strategy="sample", top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(strategy="sample", top_k=-1), "top_k must be >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0"),
        (dict(strategy="beam", num_beams=2, num_return_sequences=3), "num_return_sequences .* <= num_beams"),
        (dict(strategy="topk"), "strategy must be one of"),
        (dict(top_p=0.9), "top_p applies to strategy 'sample', not 'greedy'"),
        (dict(strategy="sample", num_beams=2), "num_beams applies to strategy 'beam', not 'sample'"),
        (dict(num_return_sequences=2), "num_return_sequences applies to strategy 'beam' or 'sample'"),
    ],
)
def test_invalid_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=f"GenerationConfig.{message}"):
        GenerationConfig(**settings)


def test_refuses_right_padded_prompts_and_too_long_outputs():
    backbone, project = model(tiny("learned", encoder_layers=0))
    ids, mask = right_padded([5, 3], 5)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(backbone, project, ids, mask)
    with pytest.raises(ValueError, match="max_new_tokens=41 .* beyond model.backbone.max_len=40"):
        generate(backbone, project, ids[:, :1], None, GenerationConfig(max_new_tokens=41))
    assert generate(
        backbone, project, ids[:, :1], None, GenerationConfig(max_new_tokens=40)
    ).tokens.shape == (2, 40)
