"""HuggingFace BERT <-> polyhead: `BertForPreTraining` / `BertModel` configs and state dicts to a
post-LN `Backbone` with a pooler and tasks/mlm_nsp.py's MLM/NSP heads, and back, by one key table
(`bert_keys`; the shared machinery is in modules/convert.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from modules.config import BackboneConfig
from modules.convert import (
    OUR_ACTIVATIONS_IN_HF,
    KeyLedger,
    KeyMap,
    StateDict,
    export_tensors,
    fused,
    hf_activation,
    import_tensors,
    layernorm_maps,
    linear_maps,
    one_to_one,
    refuse_differences,
    require_same,
)
from modules.errors import UserError

BERT_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "absolute",
    "tie_word_embeddings": True,
}
"""transformers.BertConfig's defaults, for config.json files that leave a key out."""


def backbone_config_from_bert(hf_config: Any) -> BackboneConfig:
    """`transformers.BertConfig` (or any object with its attributes) -> `BackboneConfig` (post-LN
    encoder, learned positions, segments, pooler).

    Only the absolute-position encoder is expressible; BERT used as a decoder or with relative
    position embeddings raises.
    """
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UserError(f"BERT position_embedding_type={position_type!r} is not supported (only 'absolute')")
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise UserError("BERT configured as a decoder (is_decoder / add_cross_attention) is not supported")
    return BackboneConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        d_ff=hf_config.intermediate_size,
        encoder_layers=hf_config.num_hidden_layers,
        decoder_layers=0,
        max_len=hf_config.max_position_embeddings,
        position="learned",
        type_vocab_size=hf_config.type_vocab_size,
        norm="post",
        norm_type="layernorm",
        norm_eps=hf_config.layer_norm_eps,
        embedding_norm=True,
        activation=hf_activation(hf_config.hidden_act, "BERT hidden_act"),  # type: ignore[arg-type]
        gated_ff=False,
        bias=True,
        scale_attention=True,
        dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        ff_dropout=0.0,  # BERT drops out the feed-forward output only
        pooler=True,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        scale_tied_output=False,
        init_std=hf_config.initializer_range,
    )


def bert_config_to_hf(config: BackboneConfig, pad_id: int | None, with_heads: bool) -> dict:
    """`BackboneConfig` -> the config.json of `BertForPreTraining` (`with_heads`) or `BertModel`.

    A backbone BERT cannot compute (relative positions, pre-norm, no pooler, ...) is refused with
    the config keys that differ.
    """
    hf = {
        "architectures": ["BertForPreTraining" if with_heads else "BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.encoder_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": OUR_ACTIVATIONS_IN_HF[config.activation],
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_len,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.init_std,
        "layer_norm_eps": config.norm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": pad_id or 0,
        "tie_word_embeddings": config.tie_embeddings,
    }
    # absolute positions; init is spent; ff_dropout acts in training only (BERT has none there)
    unused = {"init", "relative_buckets", "relative_max_distance", "ff_dropout"}
    refuse_differences(config, backbone_config_from_bert(SimpleNamespace(**hf)), "BERT", unused)
    if not config.type_vocab_size:
        raise UserError(
            "this backbone cannot be written as HF BERT: model.backbone.type_vocab_size=0 (BERT has segments)"
        )
    return hf


def bert_keys(config: BackboneConfig, prefix: str = "bert.") -> tuple[list[KeyMap], list[KeyMap]]:
    """(backbone table, MLM/NSP head table) of `BertForPreTraining`; `prefix=""` names `BertModel`'s
    keys. The head dict is keyed as tasks/mlm_nsp.py's `nn.ModuleDict({"mlm": MaskedLMHead, "nsp":
    PooledClassifierHead})`. Key patterns (i = layer):

        bert.embeddings.word_embeddings.weight (V, D)       -> embeddings.tokens.weight
        bert.embeddings.position_embeddings.weight (L, D)   -> embeddings.positions.weight
        bert.embeddings.token_type_embeddings.weight (S, D) -> embeddings.segments.weight
        bert.embeddings.LayerNorm.{weight,bias} (D,)        -> embeddings.norm.*
        bert.encoder.layer.i.attention.self.{query,key,value}.{weight (I, D), bias (I,)}
                                                            -> encoder.layers.i.self_attn.qkv.* (3I, D), (3I,)
        bert.encoder.layer.i.attention.output.dense.*       -> encoder.layers.i.self_attn.out.*  (D, I)
        bert.encoder.layer.i.attention.output.LayerNorm.*   -> encoder.layers.i.self_attn_norm.*
        bert.encoder.layer.i.intermediate.dense.*           -> encoder.layers.i.ff.up.*    (F, D)
        bert.encoder.layer.i.output.dense.*                 -> encoder.layers.i.ff.down.*  (D, F)
        bert.encoder.layer.i.output.LayerNorm.*             -> encoder.layers.i.ff_norm.*
        bert.pooler.dense.*                                 -> pooler.*  (D, D)
        cls.predictions.transform.dense.*                   -> mlm.transform.*  (D, D)
        cls.predictions.transform.LayerNorm.*               -> mlm.norm.*
        cls.predictions.bias (V,)                           -> mlm.bias
        cls.predictions.decoder.weight (V, D)               -> mlm.decoder.weight (untied only)
        cls.seq_relationship.*                              -> nsp.classifier.*  (2, D)
    """
    d, inner, ff, v = (
        config.d_model,
        config.n_heads * config.attention_head_dim,
        config.d_ff,
        config.vocab_size,
    )
    emb = f"{prefix}embeddings"
    backbone = [
        one_to_one("embeddings.tokens.weight", f"{emb}.word_embeddings.weight", v, d),
        one_to_one("embeddings.positions.weight", f"{emb}.position_embeddings.weight", config.max_len, d),
    ]
    if config.type_vocab_size:
        backbone.append(
            one_to_one(
                "embeddings.segments.weight", f"{emb}.token_type_embeddings.weight", config.type_vocab_size, d
            )
        )
    backbone += layernorm_maps("embeddings.norm", f"{emb}.LayerNorm", d)
    for i in range(config.encoder_layers):
        src, dst = f"{prefix}encoder.layer.{i}", f"encoder.layers.{i}"
        attn = f"{src}.attention.self"
        for part, shape in (("weight", (inner, d)), ("bias", (inner,))):
            qkv = tuple(f"{attn}.{name}.{part}" for name in ("query", "key", "value"))
            backbone.append(fused(f"{dst}.self_attn.qkv.{part}", qkv, *shape))
        backbone += linear_maps(f"{dst}.self_attn.out", f"{src}.attention.output.dense", d, inner)
        backbone += layernorm_maps(f"{dst}.self_attn_norm", f"{src}.attention.output.LayerNorm", d)
        backbone += linear_maps(f"{dst}.ff.up", f"{src}.intermediate.dense", ff, d)
        backbone += linear_maps(f"{dst}.ff.down", f"{src}.output.dense", d, ff)
        backbone += layernorm_maps(f"{dst}.ff_norm", f"{src}.output.LayerNorm", d)
    backbone += linear_maps("pooler", f"{prefix}pooler.dense", d, d)

    head = linear_maps("mlm.transform", "cls.predictions.transform.dense", d, d)
    head += layernorm_maps("mlm.norm", "cls.predictions.transform.LayerNorm", d)
    head.append(one_to_one("mlm.bias", "cls.predictions.bias", v))
    if not config.tie_embeddings:
        head.append(one_to_one("mlm.decoder.weight", "cls.predictions.decoder.weight", v, d))
    head += linear_maps("nsp.classifier", "cls.seq_relationship", 2, d)
    return backbone, head


def _bert_names_of_today(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Older BERT checkpoints (ported from TensorFlow) name LayerNorm parameters gamma/beta; HF's
    forward adds `cls.predictions.decoder.bias`, which older versions alias to `cls.predictions.bias`
    and newer ones keep beside it, so the decoder's bias wins and the other is discarded."""
    renamed: StateDict = {}
    for key, tensor in state_dict.items():
        new = key
        if key.endswith("LayerNorm.gamma"):
            new = key[: -len("gamma")] + "weight"
        elif key.endswith("LayerNorm.beta"):
            new = key[: -len("beta")] + "bias"
        if new in renamed:
            raise UserError(f"BERT state dict has both {key!r} and its modern name {new!r}")
        renamed[new] = tensor
    if "cls.predictions.decoder.bias" in renamed:
        renamed["cls.predictions.bias"] = renamed.pop("cls.predictions.decoder.bias")
    return renamed


def _check_bert_shape(config: BackboneConfig) -> None:
    if config.norm != "post" or config.position != "learned" or not config.pooler or config.decoder_layers:
        raise UserError(
            "BERT conversion needs a config from backbone_config_from_bert (post-norm encoder with pooler)"
        )


def bert_to_polyhead(
    hf_state_dict: Mapping[str, Tensor], config: BackboneConfig
) -> tuple[StateDict, StateDict]:
    """`BertForPreTraining` state dict -> (Backbone state dict, MLM/NSP head state dict), by `bert_keys`.

    When tied, `cls.predictions.decoder.weight` may be absent and, if present, must equal the word
    embeddings. Consumed and discarded: the non-learned buffers `bert.embeddings.position_ids` /
    `bert.embeddings.token_type_ids` that some checkpoints carry. TF-style `LayerNorm.gamma`/`beta`
    names and both names of the MLM bias are accepted (see `_bert_names_of_today`).
    """
    _check_bert_shape(config)
    ledger = KeyLedger(_bert_names_of_today(hf_state_dict), "BertForPreTraining")
    backbone_table, head_table = bert_keys(config)
    backbone, head = import_tensors(ledger, backbone_table), import_tensors(ledger, head_table)
    if config.tie_embeddings:
        decoder = ledger.take_optional("cls.predictions.decoder.weight", (config.vocab_size, config.d_model))
        tokens = backbone.get("embeddings.tokens.weight")
        require_same(ledger, "cls.predictions.decoder.weight", decoder, tokens, "tie_embeddings is set")
    ledger.take_optional("bert.embeddings.position_ids")  # buffers, not weights
    ledger.take_optional("bert.embeddings.token_type_ids")
    ledger.close()
    return backbone, head


def polyhead_to_bert(
    backbone: Mapping[str, Tensor], head: Mapping[str, Tensor] | None, config: BackboneConfig
) -> StateDict:
    """(Backbone state dict, MLM/NSP head state dict) -> `BertForPreTraining` state dict, by `bert_keys`;
    without a head, `BertModel`'s (unprefixed keys). Tied copies (the decoder's weight and bias) are
    left to HF's tying, as its own `save_pretrained` leaves them out."""
    _check_bert_shape(config)
    backbone_table, head_table = bert_keys(config, "bert." if head is not None else "")
    out = export_tensors(ledger := KeyLedger(backbone, "polyhead backbone"), backbone_table)
    ledger.close()
    if head is not None:
        out |= export_tensors(ledger := KeyLedger(head, "polyhead MLM/NSP head"), head_table)
        ledger.close()
        if not config.tie_embeddings:  # HF ties the decoder's bias to the MLM bias only with the embeddings
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    return out
