"""Rotary positions and grouped-query attention (modules/rotary.py, MultiHeadAttention's kv_heads):
the rotation equals RoPE written with complex numbers, attention scores under it depend on the
offset alone, and grouped-query attention equals full multi-head attention whose key/value heads
are copied per group; per-head query/key norms (qk_norm) keep T5's initial query scale; bad
settings name their key. Decoding with both (KV cache, left padding,
beam search) is covered by tests/test_generation.py's "llama" layout, and agreement with HF's
LLaMA by tests/test_convert_llama.py."""

from __future__ import annotations

import pytest
import torch

from modules.attention import MultiHeadAttention
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.rotary import RotaryEmbedding, rotate

HEAD_DIM, BASE = 8, 10000.0


def rope_by_complex_numbers(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, Dh) -> each pair (x_i, x_{i + Dh/2}) as the complex number x_i + j x_{i + Dh/2},
    multiplied by e^{j p theta_i}, theta_i = BASE ** (-2i / Dh): RoPE from its definition."""
    half = x.size(-1) // 2
    theta = BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / x.size(-1))  # (Dh/2,)
    turn = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None] * theta)
    pairs = torch.complex(x[..., :half], x[..., half:]) * turn  # (B, H, T, Dh/2)
    return torch.cat([pairs.real, pairs.imag], dim=-1)


def test_rotation_is_rope_by_its_complex_definition():
    x = torch.randn(2, 3, 7, HEAD_DIM, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 5, 40, 999, 4096])
    ours = rotate(x, RotaryEmbedding(HEAD_DIM, BASE)(positions))
    # the angles are float32, as HF's LLaMA computes them: at position 4096 they carry ~1e-4 rad of error
    torch.testing.assert_close(ours, rope_by_complex_numbers(x, positions.double()), atol=1e-4, rtol=1e-4)


def test_scores_depend_on_the_offset_alone():
    rotary = RotaryEmbedding(HEAD_DIM, BASE)
    q, k = torch.randn(1, 1, 1, HEAD_DIM), torch.randn(1, 1, 1, HEAD_DIM)

    def score(query_at: int, key_at: int) -> float:
        turned_q = rotate(q, rotary(torch.tensor([query_at])))
        turned_k = rotate(k, rotary(torch.tensor([key_at])))
        return (turned_q * turned_k).sum().item()

    for offset in (0, 3, -5):
        scores = [score(p + offset, p) for p in (0, 7, 100)]
        assert scores == pytest.approx([scores[0]] * 3, abs=1e-4)
    assert score(9, 3) != pytest.approx(score(3, 3), abs=1e-3)  # and the offset does matter


@pytest.mark.parametrize("step_by_step", [False, True], ids=["sdpa", "written-out"])
def test_grouped_query_attention_is_full_attention_with_kv_heads_copied_per_group(step_by_step):
    """4 query heads over 2 kv heads: query heads 0, 1 read kv head 0, heads 2, 3 kv head 1."""
    torch.manual_seed(0)
    d, heads, kv_heads, dh = 16, 4, 2, 4
    grouped = MultiHeadAttention(d, heads, dh, bias=True, dropout=0.0, scale=True, kv_heads=kv_heads).eval()
    full = MultiHeadAttention(d, heads, dh, bias=True, dropout=0.0, scale=True).eval()
    q_rows, k_rows, v_rows = grouped.qkv.weight.split(grouped.split)
    q_bias, k_bias, v_bias = grouped.qkv.bias.split(grouped.split)

    def per_query_head(rows: torch.Tensor) -> torch.Tensor:  # (Hkv * Dh, ...) -> (H * Dh, ...)
        return rows.unflatten(0, (kv_heads, dh)).repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1)

    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([q_rows, per_query_head(k_rows), per_query_head(v_rows)]))
        full.qkv.bias.copy_(torch.cat([q_bias, per_query_head(k_bias), per_query_head(v_bias)]))
        full.out.load_state_dict(grouped.out.state_dict())
    if step_by_step:  # the path that hands out the softmax weights
        for module in (grouped, full):
            module.on_weights = lambda weights: None
    x = torch.randn(2, 5, d)
    rotation = RotaryEmbedding(dh, BASE)(torch.arange(5))
    with torch.no_grad():
        ours, reference = (
            grouped(x, is_causal=True, rotation=rotation),
            full(x, is_causal=True, rotation=rotation),
        )
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    assert grouped.qkv.weight.shape == (heads * dh + 2 * kv_heads * dh, d)


def test_t5_initialisation_puts_the_query_scale_into_the_query_norm():
    """Unscaled attention (T5's scheme) starts with queries 1/sqrt(head_dim) smaller; a query norm
    would undo that in the projection, so the norm's own scale carries it."""
    config = BackboneConfig(
        vocab_size=20, d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1, init="t5",
        scale_attention=False, norm="pre", norm_type="rmsnorm", qk_norm=True,
    )  # fmt: skip
    decoder = Backbone(config).decoder.layers[0]
    for attention in (decoder.self_attn, decoder.cross_attn):
        assert torch.equal(attention.q_norm.weight, torch.full((8,), 8**-0.5))
        assert torch.equal(attention.k_norm.weight, torch.ones(8))
        assert attention.query_weight.std() > 0.9 * 32**-0.5  # N(0, fan_in ** -0.5), not scaled again


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads (3) must be positive and divide"),
        ({"n_heads": 4, "n_kv_heads": 0}, "n_kv_heads (0) must be positive"),
        ({"position": "rotary", "d_model": 30, "n_heads": 2}, "head width (15) must be even"),
        ({"position": "rotary", "attention": "lsh"}, "'lsh' needs absolute positions"),
        ({"n_kv_heads": 2, "attention": "lsh"}, "n_kv_heads must be left unset"),
        ({"qk_norm": True, "attention": "lsh"}, "model.backbone.qk_norm must be false"),
    ],
)
def test_bad_head_settings_name_their_key(settings, key):
    with pytest.raises(UserError, match=key.replace("(", r"\(").replace(")", r"\)")):
        BackboneConfig(encoder_layers=0, decoder_layers=1, **settings)
