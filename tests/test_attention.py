"""Masks do what they promise: causal attention never looks ahead, padding is never looked at."""

from __future__ import annotations

import pytest
import torch

from modules.attention import attention_bias, causal_mask_bias
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.layers import FeedForward


def small(**overrides) -> BackboneConfig:
    values = dict(
        vocab_size=50,
        d_model=32,
        n_heads=4,
        d_ff=64,
        encoder_layers=2,
        decoder_layers=0,
        max_len=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    values.update(overrides)
    return BackboneConfig(**values)


def test_causal_bias_is_upper_triangle_minus_infinity():
    bias = causal_mask_bias(4, 4)
    assert torch.isinf(bias.triu(1)[torch.ones(4, 4).triu(1).bool()]).all()
    assert (bias.tril() == 0).all()
    cached = causal_mask_bias(2, 5)  # the last 2 of 5 positions
    assert cached[0].tolist() == [0, 0, 0, 0, float("-inf")]
    assert cached[1].tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "relative", "rotary"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_outputs_never_depend_on_later_tokens(position, norm):
    torch.manual_seed(0)
    model = Backbone(small(encoder_layers=0, decoder_layers=2, position=position, norm=norm)).eval()
    ids = torch.randint(7, 50, (2, 12))
    base = model.decode(ids)
    for j in (3, 7, 11):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 5) % 43 + 7
        out = model.decode(changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # the change is visible where it may be


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
@pytest.mark.parametrize("position", ["learned", "relative", "rotary"])
def test_pad_token_ids_never_change_real_outputs(arch, position):
    torch.manual_seed(0)
    layers = (
        dict(encoder_layers=2, decoder_layers=0)
        if arch == "encoder"
        else dict(encoder_layers=0, decoder_layers=2)
    )
    model = Backbone(small(position=position, **layers)).eval()
    ids = torch.randint(7, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    run = model.encode if arch == "encoder" else model.decode
    base = run(ids, mask)
    garbage = torch.where(mask.bool(), ids, torch.randint(7, 50, ids.shape))
    out = run(garbage, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], base[real], rtol=0, atol=1e-6)
    if arch == "encoder":  # without the mask the same change does leak into real positions
        assert (run(garbage)[real] - run(ids)[real]).abs().max() > 1e-4


def test_cross_attention_ignores_padded_memory():
    torch.manual_seed(0)
    model = Backbone(
        small(decoder_layers=2, position="relative", norm="pre", norm_type="rmsnorm", bias=False)
    ).eval()
    src = torch.randint(7, 50, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 4:] = 0
    tgt = torch.randint(7, 50, (2, 5))
    memory = model.encode(src, src_mask)
    base = model.decode(tgt, memory=memory, memory_mask=src_mask)
    noisy = memory.clone()
    noisy[1, 4:] = torch.randn_like(noisy[1, 4:]) * 10
    torch.testing.assert_close(model.decode(tgt, memory=noisy, memory_mask=src_mask), base, rtol=0, atol=1e-6)


def test_copies_of_a_source_share_its_memory_row():
    """Decoding c beams per source keeps one memory row per source: the decoder's output for each copy
    must equal decoding against that memory repeated c times, padding included."""
    torch.manual_seed(0)
    model = Backbone(small(decoder_layers=2, position="relative", norm="pre", bias=False)).eval()
    src = torch.randint(7, 50, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 5:] = 0
    memory = model.encode(src, src_mask)  # (2, S, D)
    tgt = torch.randint(7, 50, (6, 4))  # 3 copies of each source, grouped by source
    rows = torch.arange(2).repeat_interleave(3)
    repeated = model.decode(tgt, memory=memory[rows], memory_mask=src_mask[rows])
    shared = model.decode(tgt, memory=memory, memory_mask=src_mask)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 2 query rows, got 5"):
        model.decode(tgt[:5], memory=memory, memory_mask=src_mask)


def test_fully_padded_row_stays_finite():
    bias = attention_bias(3, 3, key_padding_mask=torch.zeros(1, 3), causal=True)
    scores = torch.softmax(torch.zeros(1, 1, 3, 3) + bias, dim=-1)
    assert torch.isfinite(scores).all()


def test_feed_forward_dropout_is_its_own_setting():
    """BERT drops out no feed-forward hidden units (an imported BERT sets ff_dropout 0.0), T5 does;
    with ff_dropout 0 the feed-forward block is deterministic in training even with dropout on."""
    x = torch.randn(2, 5, 16)
    for ff_dropout, deterministic in ((0.0, True), (None, False)):
        config = BackboneConfig(
            vocab_size=50, d_model=16, n_heads=2, d_ff=64, dropout=0.5, ff_dropout=ff_dropout
        )
        feed_forward = FeedForward(config).train()
        assert torch.equal(feed_forward(x), feed_forward(x)) == deterministic
    with pytest.raises(UserError, match=r"model.backbone.ff_dropout must be in \[0, 1\), got 1.0"):
        BackboneConfig(vocab_size=50, ff_dropout=1.0)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_positions_beyond_the_table_are_refused_by_name(position):
    """Given or implied, a position past max_len names the setting instead of indexing out of range."""
    backbone = Backbone(small(position=position, max_len=8, decoder_layers=1)).eval()
    with pytest.raises(ValueError, match="position 8 is beyond model.backbone.max_len=8"):
        backbone.encode(torch.randint(1, 20, (1, 9)))
    with pytest.raises(ValueError, match="position 9 is beyond model.backbone.max_len=8"):
        backbone.decode(torch.randint(1, 20, (1, 2)), positions=torch.tensor([[3, 9]]))
    backbone.decode(torch.randint(1, 20, (1, 2)), positions=torch.tensor([[6, 7]]))  # the last row fits
