"""HF BERT and T5, converted with modules/convert_bert.py and convert_t5.py, give the same outputs from our Backbone and heads,
and convert back to the same tensors.

Small randomly initialised HF models (no downloads), every parameter perturbed so that a swapped or
dropped tensor (biases and norms start at 0 and 1) cannot go unnoticed; eval mode, fp32. Outputs
must agree to ATOL = 1e-5 (absolute; with RTOL = 1e-5), over all positions, padding included.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from modules.backbone import Backbone
from modules.convert_bert import (
    backbone_config_from_bert,
    bert_config_to_hf,
    bert_to_polyhead,
    polyhead_to_bert,
)
from modules.convert_t5 import backbone_config_from_t5, polyhead_to_t5, t5_config_to_hf, t5_to_polyhead
from modules.errors import UserError
from modules.heads import MaskedLMHead, PooledClassifierHead

from .hf_models import ATOL, RTOL, perturb, tiny_t5_config, transformers

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(ours: Tensor, theirs: Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def padded_mask(lengths: list[int], total: int) -> Tensor:
    """(B, total) with 1 on the first `length` positions of each row and 0 after (right padding)."""
    return (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()


# ---------------------------------------------------------------------------------------------- BERT


def bert_pair(tie: bool):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    hf = transformers.BertForPreTraining(hf_config).eval()
    perturb(hf)
    config = backbone_config_from_bert(hf_config)
    assert config.ff_dropout == 0.0, "BERT has no dropout between its feed-forward projections"
    backbone_sd, head_sd = bert_to_polyhead(hf.state_dict(), config)
    backbone = Backbone(config).eval()
    backbone.load_state_dict(backbone_sd, strict=True)
    head = nn.ModuleDict(
        {"mlm": MaskedLMHead(config), "nsp": PooledClassifierHead(config, num_classes=2)}
    ).eval()
    head.load_state_dict(head_sd, strict=True)
    return hf, backbone, head


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_bert_outputs_match(tie: bool) -> None:
    hf, backbone, head = bert_pair(tie)
    b, t = 3, 12
    input_ids = torch.randint(1, 300, (b, t))
    attention_mask = padded_mask([12, 9, 5], t)
    token_type_ids = (torch.arange(t)[None, :] >= torch.tensor([6, 4, 3])[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        base = hf.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = backbone.encode(input_ids, attention_mask, token_type_ids)  # (B, T, D)
        pooled = backbone.pool(hidden)
        mlm = head["mlm"](hidden.reshape(b * t, -1), backbone.token_embedding).view(b, t, -1)
        nsp = head["nsp"](pooled)
        unpadded = backbone.encode(input_ids)  # the all-ones, mask-free path
        theirs_unpadded = hf.bert(input_ids=input_ids).last_hidden_state
    assert_close(hidden, base.last_hidden_state)
    assert_close(pooled, base.pooler_output)
    assert_close(mlm, theirs.prediction_logits)
    assert_close(nsp, theirs.seq_relationship_logits)
    assert_close(unpadded, theirs_unpadded)


def test_bert_config_fields() -> None:
    hf_config = transformers.BertConfig(
        vocab_size=300, hidden_size=64, num_attention_heads=4, hidden_act="gelu_new"
    )
    config = backbone_config_from_bert(hf_config)
    assert (config.d_model, config.n_heads, config.attention_head_dim, config.activation) == (
        64,
        4,
        16,
        "gelu_tanh",
    )
    assert (config.norm, config.position, config.pooler, config.norm_eps) == ("post", "learned", True, 1e-12)
    with pytest.raises(ValueError, match="position_embedding_type"):
        backbone_config_from_bert(transformers.BertConfig(position_embedding_type="relative_key"))


def test_bert_unconsumed_missing_and_legacy_names() -> None:
    hf, _, _ = bert_pair(tie=True)
    config = backbone_config_from_bert(hf.config)
    state = dict(hf.state_dict())
    state["bert.encoder.layer.2.attention.self.query.weight"] = torch.zeros(64, 64)  # a layer too many
    del state["cls.seq_relationship.bias"]
    with pytest.raises(
        ValueError, match=r"(?s)missing keys: \['cls.seq_relationship.bias'\].*not consumed.*layer\.2"
    ):
        bert_to_polyhead(state, config)

    # TF-ported names and the legacy position_ids buffer are understood; the tied decoder copy may be absent
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf.state_dict().items()
        if k not in ("cls.predictions.decoder.weight",)
    }
    legacy["bert.embeddings.position_ids"] = torch.arange(64)[None]
    backbone_sd, head_sd = bert_to_polyhead(legacy, config)
    reference_backbone, reference_head = bert_to_polyhead(hf.state_dict(), config)
    assert backbone_sd.keys() == reference_backbone.keys() and head_sd.keys() == reference_head.keys()

    tampered = dict(hf.state_dict())
    tampered["cls.predictions.decoder.weight"] = tampered["cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="tied duplicates that differ"):
        bert_to_polyhead(tampered, config)


# ------------------------------------------------------------------------------------------------ T5


def t5_pair(feed_forward_proj: str, tie: bool, model_class: str = "T5ForConditionalGeneration"):
    torch.manual_seed(0)
    hf_config = tiny_t5_config(120, feed_forward_proj, tie)
    hf = getattr(transformers, model_class)(hf_config).eval()
    perturb(hf)
    if not tie and hasattr(hf, "lm_head"):
        # transformers 5 always ties T5's lm_head (only the output scaling follows the flag); give it its
        # own weights so the untied path is really exercised
        hf.lm_head.weight = nn.Parameter(torch.randn(120, 32) * 32**-0.5)
    config = backbone_config_from_t5(hf_config)
    backbone_sd, lm_head = t5_to_polyhead(hf.state_dict(), config)
    backbone = Backbone(config).eval()
    backbone.load_state_dict(backbone_sd, strict=True)
    return hf, config, backbone, lm_head


def t5_inputs():
    b, s, t = 3, 11, 7  # s > relative_max_distance / 2, so the logarithmic buckets are used
    input_ids = torch.randint(2, 120, (b, s))
    attention_mask = padded_mask([11, 8, 4], s)
    decoder_input_ids = torch.randint(2, 120, (b, t))
    decoder_attention_mask = padded_mask([7, 7, 5], t)
    return input_ids, attention_mask, decoder_input_ids, decoder_attention_mask


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"], ids=["v1.0-relu", "v1.1-gated-gelu"])
def test_t5_outputs_match(feed_forward_proj: str, tie: bool) -> None:
    hf, config, backbone, lm_head = t5_pair(feed_forward_proj, tie)
    assert config.gated_ff == (feed_forward_proj == "gated-gelu")
    assert config.tie_embeddings == config.scale_tied_output == tie
    assert (lm_head is None) == tie
    input_ids, attention_mask, decoder_input_ids, decoder_attention_mask = t5_inputs()
    with torch.no_grad():
        enc_theirs = hf.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        dec_theirs = hf.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=enc_theirs,
            encoder_attention_mask=attention_mask,
        ).last_hidden_state
        logits_theirs = hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            use_cache=False,
        ).logits

        memory = backbone.encode(input_ids, attention_mask)  # (B, S, D)
        hidden = backbone.decode(
            decoder_input_ids, decoder_attention_mask, memory=memory, memory_mask=attention_mask
        )
        if config.tie_embeddings:
            logits = (hidden * config.d_model**-0.5) @ backbone.token_embedding.T  # (B, T, V)
        else:
            logits = hidden @ lm_head.T
    assert_close(memory, enc_theirs)
    assert_close(hidden, dec_theirs)
    assert_close(logits, logits_theirs)


def test_t5_model_without_lm_head() -> None:
    """`T5Model` has no LM head; the decoder output itself must still match (no padding in the decoder)."""
    hf, config, backbone, lm_head = t5_pair("gated-gelu", tie=False, model_class="T5Model")
    assert lm_head is None
    input_ids, attention_mask, decoder_input_ids, _ = t5_inputs()
    with torch.no_grad():
        theirs = hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )
        memory = backbone.encode(input_ids, attention_mask)
        hidden = backbone.decode(decoder_input_ids, memory=memory, memory_mask=attention_mask)
    assert_close(memory, theirs.encoder_last_hidden_state)
    assert_close(hidden, theirs.last_hidden_state)


def test_t5_unconsumed_and_missing_keys() -> None:
    hf, config, _, _ = t5_pair("relu", tie=True)
    state = dict(hf.state_dict())
    state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    del state["decoder.final_layer_norm.weight"]
    with pytest.raises(
        ValueError, match=r"(?s)missing keys: \['decoder.final_layer_norm.weight'\].*not consumed"
    ):
        t5_to_polyhead(state, config)

    state = dict(hf.state_dict())
    state["lm_head.weight"] = torch.zeros(120, 32)
    with pytest.raises(ValueError, match="lm_head.weight: differs"):
        t5_to_polyhead(state, config)

    # the gated checkpoint's wi_0 / wi_1 are not a ReLU model's wi: a config mismatch is reported, not guessed
    gated, _, _, _ = t5_pair("gated-gelu", tie=True)
    with pytest.raises(
        ValueError, match=r"(?s)missing keys: \[.*DenseReluDense\.wi\.weight.*not consumed.*wi_0"
    ):
        t5_to_polyhead(gated.state_dict(), config)


def test_t5_initialisation_has_the_scale_of_hf_t5s() -> None:
    """init: t5 draws every matrix at HF T5's scale, so a T5-layout model trains from scratch as T5 does.

    HF's fresh weights are mapped into our layout; per matrix (fused q/k/v compared block by block)
    the standard deviations must agree within three standard errors of their ratio (about 1 / sqrt(n)
    for n entries; 5% at least). A query without its folded 1/sqrt(head_dim), an
    N(0, 0.02) embedding or a fan-out instead of fan-in scale is off by 4x or more.
    """
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=500, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    config = backbone_config_from_t5(hf_config)
    assert config.init == "t5"
    theirs, _ = t5_to_polyhead(transformers.T5ForConditionalGeneration(hf_config).state_dict(), config)
    ours = Backbone(config).state_dict()
    compared = 0
    for key, weight in ours.items():
        if weight.ndim != 2:  # RMSNorm scales start at one in both
            continue
        blocks = 3 if key.endswith("qkv.weight") else 2 if key.endswith(".kv.weight") else 1
        for mine, reference in zip(weight.chunk(blocks), theirs[key].chunk(blocks), strict=True):
            tolerance = max(0.05, 3 / mine.numel() ** 0.5)
            assert mine.std().item() == pytest.approx(reference.std().item(), rel=tolerance), key
            compared += 1
    assert compared > 20


# ------------------------------------------------------------------------------------ export back


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_bert_export_inverts_import_tensor_for_tensor(tie: bool) -> None:
    hf, _, _ = bert_pair(tie)
    config = backbone_config_from_bert(hf.config)
    backbone_sd, head_sd = bert_to_polyhead(hf.state_dict(), config)
    theirs = hf.state_dict()
    back = polyhead_to_bert(backbone_sd, head_sd, config)
    tied_copies = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} if tie else set()
    assert back.keys() == theirs.keys() - tied_copies - {"bert.embeddings.position_ids"}
    if not tie:  # untied, HF computes with the decoder's bias; its cls.predictions.bias is then unused
        theirs["cls.predictions.bias"] = theirs["cls.predictions.decoder.bias"]
    for key, tensor in back.items():
        assert torch.equal(tensor, theirs[key]), key
    encoder_only = polyhead_to_bert(backbone_sd, None, config)  # BertModel's names
    assert torch.equal(
        encoder_only["embeddings.word_embeddings.weight"], theirs["bert.embeddings.word_embeddings.weight"]
    )
    assert (
        backbone_config_from_bert(SimpleNamespace(**bert_config_to_hf(config, 0, with_heads=True))) == config
    )


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_export_inverts_import_tensor_for_tensor(feed_forward_proj: str) -> None:
    tie = feed_forward_proj == "relu"
    hf, config, _, lm_head = t5_pair(feed_forward_proj, tie)
    backbone_sd, lm_head = t5_to_polyhead(hf.state_dict(), config)
    back = polyhead_to_t5(backbone_sd, lm_head, config)
    theirs = hf.state_dict()
    assert back.keys() == theirs.keys() - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} - (
        {"lm_head.weight"} if tie else set()
    )
    for key, tensor in back.items():
        assert torch.equal(tensor, theirs[key]), key
    hf_config = t5_config_to_hf(config, pad_id=0, eos_id=1, start_id=0)
    assert backbone_config_from_t5(SimpleNamespace(**hf_config), lm_head_in_weights=not tie) == config


def test_backbones_hf_cannot_compute_are_refused_naming_the_key() -> None:
    bert = backbone_config_from_bert(
        transformers.BertConfig(vocab_size=300, hidden_size=64, num_attention_heads=4)
    )
    for change, key in [
        ({"norm": "pre"}, "model.backbone.norm='pre'"),
        ({"position": "relative"}, "model.backbone.position='relative'"),
        ({"pooler": False}, "model.backbone.pooler=False"),
        ({"head_dim": 8}, "model.backbone.head_dim=8"),
        ({"type_vocab_size": 0}, "model.backbone.type_vocab_size=0"),
    ]:
        with pytest.raises(UserError, match=re.escape(key)):
            bert_config_to_hf(dataclasses.replace(bert, **change), 0, with_heads=True)
    t5 = t5_pair("relu", tie=True)[1]
    for change, key in [
        ({"type_vocab_size": 2}, "model.backbone.type_vocab_size=2"),
        ({"activation": "gelu", "gated_ff": True}, "model.backbone.activation='gelu'"),
        ({"tie_embeddings": False}, "scale_tied_output=True with tie_embeddings=False"),
    ]:
        with pytest.raises(UserError, match=re.escape(key)):
            t5_config_to_hf(dataclasses.replace(t5, **change), 0, 1, 0)
