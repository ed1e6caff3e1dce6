"""HuggingFace BERT and T5 <-> polyhead's `Backbone` (and BERT's MLM/NSP heads, T5's LM head).

Per model family: a `BackboneConfig` from the HF config (and the HF config back from ours), and
one key table, `bert_keys` / `t5_keys`: every tensor of ours with the HF tensors it is made of.
Import reads the table one way, export the other, so the two directions cannot drift apart.

Every source key must be used: keys left over (an unsupported variant, a layer count that does not
match) and keys not found both end the conversion with a UserError that lists them, so nothing is
dropped silently. The few keys that are accepted and deliberately discarded on import are named in
each function's docstring.

Where HF keeps separate projections that we fuse, the weights are concatenated on the output
dimension (nn.Linear weights are (out_features, in_features)), in the order our modules split them:
self-attention q|k|v (`MultiHeadAttention.qkv`), cross-attention k|v (`MultiHeadAttention.kv`),
gated feed-forward gate|up (`FeedForward.up`, T5's wi_0|wi_1).

Shapes below: D = d_model, H = n_heads, Dh = head_dim, I = H * Dh, F = d_ff, V = vocab, L = max_len,
S = type_vocab_size, R = relative_buckets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from modules.config import BackboneConfig
from modules.errors import UserError

StateDict = dict[str, Tensor]

HF_ACTIVATIONS = {
    "gelu": "gelu",  # HF's "gelu" is the exact erf form
    "gelu_new": "gelu_tanh",  # the tanh approximation, written out by hand in HF
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
OUR_ACTIVATIONS_IN_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
SHOWN_KEYS = 12  # keys listed per kind of problem; the rest are counted


def _activation(name: str, source: str) -> str:
    """HF activation name -> ours; anything we cannot compute identically is refused."""
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise UserError(
            f"{source}: activation {name!r} has no polyhead equivalent; supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


def _listed(keys: list[str]) -> str:
    """At most SHOWN_KEYS keys, and how many more: a wrong checkpoint may miss hundreds."""
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{keys[:SHOWN_KEYS]}{more}"


class _KeyLedger:
    """Hands out the tensors of a source state dict by exact key and keeps the books: which keys were
    never asked for, which were asked for and absent, which had the wrong shape, which tied duplicates
    disagree. `close()` raises one UserError listing them all, so a conversion reports every problem
    at once.
    """

    def __init__(self, state_dict: Mapping[str, Tensor], source: str) -> None:
        self.remaining = dict(state_dict)
        self.source = source
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []
        self.conflicts: list[str] = []

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor | None:
        """The tensor under `key` (checked against `shape`), or None after noting it missing."""
        if key not in self.remaining:
            self.missing.append(key)
            return None
        return self._checked(key, self.remaining.pop(key), shape)

    def take_optional(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor | None:
        """Like `take`, for keys a valid checkpoint may leave out (tied duplicates, legacy buffers)."""
        if key not in self.remaining:
            return None
        return self._checked(key, self.remaining.pop(key), shape)

    def _checked(self, key: str, tensor: Tensor, shape: tuple[int, ...] | None) -> Tensor | None:
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            self.bad_shapes.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(shape)}")
            return None
        return tensor

    def close(self) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing keys: {_listed(self.missing)}")
        if self.bad_shapes:
            problems.append(
                f"keys with unexpected shapes (does the config match the weights?): {_listed(self.bad_shapes)}"
            )
        if self.conflicts:
            problems.append(f"tied duplicates that differ: {_listed(self.conflicts)}")
        if self.remaining:
            problems.append(f"keys not consumed: {_listed(sorted(self.remaining))}")
        if problems:
            raise UserError(f"cannot convert {self.source} state dict; " + "; ".join(problems))


def _require_same(
    ledger: _KeyLedger, key: str, tensor: Tensor | None, reference: Tensor | None, why: str
) -> None:
    """A tied duplicate must equal the tensor it duplicates: we hold only one copy."""
    if tensor is not None and reference is not None and not torch.equal(tensor, reference):
        ledger.conflicts.append(f"{key}: differs from its tied counterpart ({why})")


# ------------------------------------------------------------------------------------ the key tables


@dataclass(frozen=True)
class KeyMap:
    """Our tensor `ours` is HF's tensors `theirs`, each of shape `shape`, concatenated on dim 0."""

    ours: str
    theirs: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def our_shape(self) -> tuple[int, ...]:
        return (self.shape[0] * len(self.theirs), *self.shape[1:])


def _one(ours: str, theirs: str, *shape: int) -> KeyMap:
    return KeyMap(ours, (theirs,), shape)


def _linear(ours: str, theirs: str, out_f: int, in_f: int, bias: bool = True) -> list[KeyMap]:
    weight = [_one(f"{ours}.weight", f"{theirs}.weight", out_f, in_f)]
    return weight + ([_one(f"{ours}.bias", f"{theirs}.bias", out_f)] if bias else [])


def _layernorm(ours: str, theirs: str, d: int) -> list[KeyMap]:
    return [_one(f"{ours}.weight", f"{theirs}.weight", d), _one(f"{ours}.bias", f"{theirs}.bias", d)]


def _import(ledger: _KeyLedger, table: list[KeyMap]) -> StateDict:
    """HF tensors -> ours along the table; missing and misshapen ones are left to the ledger's report."""
    out: StateDict = {}
    for entry in table:
        parts = [ledger.take(key, entry.shape) for key in entry.theirs]
        if all(part is not None for part in parts):
            out[entry.ours] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def _export(ledger: _KeyLedger, table: list[KeyMap]) -> StateDict:
    """Our tensors -> HF's along the table, each a tensor of its own (safetensors refuses shared storage)."""
    out: StateDict = {}
    for entry in table:
        tensor = ledger.take(entry.ours, entry.our_shape)
        if tensor is not None:
            for key, part in zip(entry.theirs, tensor.chunk(len(entry.theirs)), strict=True):
                out[key] = part.contiguous().clone()
    return out


def _refuse_differences(
    config: BackboneConfig, expressed: BackboneConfig, family: str, ignored: set[str]
) -> None:
    """Export writes a HF config; reading it back must give this very backbone, or HF would compute
    something else. Every field that differs is named, with the value HF would have."""
    differ = [
        f"model.backbone.{field.name}={getattr(config, field.name)!r} ({family} has {getattr(expressed, field.name)!r})"
        for field in dataclasses.fields(BackboneConfig)
        if field.name not in {*ignored, "head_dim"}
        and getattr(config, field.name) != getattr(expressed, field.name)
    ]
    if config.attention_head_dim != expressed.attention_head_dim:
        differ.append(
            f"model.backbone.head_dim={config.head_dim!r} ({family} has {expressed.attention_head_dim})"
        )
    if differ:
        raise UserError(f"this backbone cannot be written as HF {family}: " + "; ".join(differ))


# ---------------------------------------------------------------------------------------------- BERT

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
        activation=_activation(hf_config.hidden_act, "BERT hidden_act"),  # type: ignore[arg-type]
        gated_ff=False,
        bias=True,
        scale_attention=True,
        dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
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
    unused = {"init", "relative_buckets", "relative_max_distance"}  # absolute positions; init is spent
    _refuse_differences(config, backbone_config_from_bert(SimpleNamespace(**hf)), "BERT", unused)
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
        _one("embeddings.tokens.weight", f"{emb}.word_embeddings.weight", v, d),
        _one("embeddings.positions.weight", f"{emb}.position_embeddings.weight", config.max_len, d),
    ]
    if config.type_vocab_size:
        backbone.append(
            _one(
                "embeddings.segments.weight", f"{emb}.token_type_embeddings.weight", config.type_vocab_size, d
            )
        )
    backbone += _layernorm("embeddings.norm", f"{emb}.LayerNorm", d)
    for i in range(config.encoder_layers):
        src, dst = f"{prefix}encoder.layer.{i}", f"encoder.layers.{i}"
        attn = f"{src}.attention.self"
        for part, shape in (("weight", (inner, d)), ("bias", (inner,))):
            qkv = tuple(f"{attn}.{name}.{part}" for name in ("query", "key", "value"))
            backbone.append(KeyMap(f"{dst}.self_attn.qkv.{part}", qkv, shape))
        backbone += _linear(f"{dst}.self_attn.out", f"{src}.attention.output.dense", d, inner)
        backbone += _layernorm(f"{dst}.self_attn_norm", f"{src}.attention.output.LayerNorm", d)
        backbone += _linear(f"{dst}.ff.up", f"{src}.intermediate.dense", ff, d)
        backbone += _linear(f"{dst}.ff.down", f"{src}.output.dense", d, ff)
        backbone += _layernorm(f"{dst}.ff_norm", f"{src}.output.LayerNorm", d)
    backbone += _linear("pooler", f"{prefix}pooler.dense", d, d)

    head = _linear("mlm.transform", "cls.predictions.transform.dense", d, d)
    head += _layernorm("mlm.norm", "cls.predictions.transform.LayerNorm", d)
    head.append(_one("mlm.bias", "cls.predictions.bias", v))
    if not config.tie_embeddings:
        head.append(_one("mlm.decoder.weight", "cls.predictions.decoder.weight", v, d))
    head += _linear("nsp.classifier", "cls.seq_relationship", 2, d)
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
    ledger = _KeyLedger(_bert_names_of_today(hf_state_dict), "BertForPreTraining")
    backbone_table, head_table = bert_keys(config)
    backbone, head = _import(ledger, backbone_table), _import(ledger, head_table)
    if config.tie_embeddings:
        decoder = ledger.take_optional("cls.predictions.decoder.weight", (config.vocab_size, config.d_model))
        tokens = backbone.get("embeddings.tokens.weight")
        _require_same(ledger, "cls.predictions.decoder.weight", decoder, tokens, "tie_embeddings is set")
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
    out = _export(ledger := _KeyLedger(backbone, "polyhead backbone"), backbone_table)
    ledger.close()
    if head is not None:
        out |= _export(ledger := _KeyLedger(head, "polyhead MLM/NSP head"), head_table)
        ledger.close()
        if not config.tie_embeddings:  # HF ties the decoder's bias to the MLM bias only with the embeddings
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    return out


# ------------------------------------------------------------------------------------------------ T5

T5_DEFAULTS = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
"""transformers.T5Config's defaults, for config.json files that leave a key out."""


def _t5_feed_forward(feed_forward_proj: str) -> tuple[bool, str]:
    """T5's feed_forward_proj ("relu", "gated-gelu", "gated-silu", ...) -> (gated, our activation).

    HF maps "gated-gelu" (T5 v1.1) to its tanh-approximated gelu_new, for backwards compatibility.
    """
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"T5 feed_forward_proj={feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
    if feed_forward_proj == "gated-gelu":
        return True, "gelu_tanh"
    return len(parts) == 2, _activation(parts[-1], "T5 feed_forward_proj")


def _t5_scales_output(hf_config: Any) -> bool:
    """Whether T5 multiplies the decoder output by d_model**-0.5 before the LM head.

    transformers 4.x keyed this on `tie_word_embeddings` (True for T5 v1.0, False for v1.1); 5.x
    always ties and keeps the old flag as `scale_decoder_outputs`.
    """
    scale = getattr(hf_config, "scale_decoder_outputs", None)
    return bool(hf_config.tie_word_embeddings if scale is None else scale)


def backbone_config_from_t5(hf_config: Any, lm_head_in_weights: bool = True) -> BackboneConfig:
    """`transformers.T5Config` (or any object with its attributes) -> `BackboneConfig` (pre-RMSNorm
    encoder-decoder, relative bias, no biases).

    v1.0 (feed_forward_proj "relu", tied, scaled output) and v1.1 ("gated-gelu", untied, unscaled)
    both map. Scaled checkpoints get `tie_embeddings` and `scale_tied_output`; unscaled ones neither,
    and their lm_head comes back separately from `t5_to_polyhead`, unless the weights have no
    `lm_head.weight` (`lm_head_in_weights=False`): transformers 5 then ties the unscaled head to
    `shared` (it saves v1.1 models so), and so do we. `max_len` keeps its default: relative
    positions need no table. `init` is T5's per-matrix scheme, which new heads start from.
    """
    gated, activation = _t5_feed_forward(hf_config.feed_forward_proj)
    scaled = _t5_scales_output(hf_config)
    tied = scaled or not lm_head_in_weights
    return BackboneConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.d_model,
        n_heads=hf_config.num_heads,
        head_dim=hf_config.d_kv,
        d_ff=hf_config.d_ff,
        encoder_layers=hf_config.num_layers,
        decoder_layers=hf_config.num_decoder_layers
        if hf_config.num_decoder_layers is not None
        else hf_config.num_layers,
        position="relative",
        relative_buckets=hf_config.relative_attention_num_buckets,
        relative_max_distance=hf_config.relative_attention_max_distance,
        type_vocab_size=0,
        norm="pre",
        norm_type="rmsnorm",
        norm_eps=hf_config.layer_norm_epsilon,
        embedding_norm=False,
        activation=activation,  # type: ignore[arg-type]
        gated_ff=gated,
        bias=False,
        scale_attention=False,
        dropout=hf_config.dropout_rate,
        attention_dropout=hf_config.dropout_rate,
        pooler=False,
        tie_embeddings=tied,
        scale_tied_output=scaled,
        init="t5",
    )


def t5_config_to_hf(config: BackboneConfig, pad_id: int, eos_id: int, start_id: int) -> dict:
    """`BackboneConfig` -> the config.json of `T5ForConditionalGeneration`.

    HF T5 has one dropout_rate, which gets `dropout` (attention_dropout is not written); `max_len`
    and the initialisation do not change what the model computes. A backbone T5 cannot compute is
    refused with the config keys that differ.
    """
    act = OUR_ACTIVATIONS_IN_HF[config.activation]
    hf = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.attention_head_dim,
        "d_ff": config.d_ff,
        "num_layers": config.encoder_layers,
        "num_decoder_layers": config.decoder_layers,
        "num_heads": config.n_heads,
        "relative_attention_num_buckets": config.relative_buckets,
        "relative_attention_max_distance": config.relative_max_distance,
        "dropout_rate": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "feed_forward_proj": ("gated-gelu" if act == "gelu_new" else f"gated-{act}")
        if config.gated_ff
        else act,
        "tie_word_embeddings": config.scale_tied_output,  # what both transformers 4 and 5 scale by
        "initializer_factor": 1.0,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "decoder_start_token_id": start_id,
    }
    if config.scale_tied_output and not config.tie_embeddings:
        raise UserError(
            "this backbone cannot be written as HF T5: model.backbone.scale_tied_output=True with "
            "tie_embeddings=False (T5 scales only a tied output)"
        )
    expressed = backbone_config_from_t5(SimpleNamespace(**hf), lm_head_in_weights=not config.tie_embeddings)
    unused = {"init", "init_std", "max_len", "attention_dropout"}  # see the docstring
    _refuse_differences(config, expressed, "T5", unused)
    return hf


def t5_keys(config: BackboneConfig) -> list[KeyMap]:
    """The backbone table of `T5ForConditionalGeneration` / `T5Model`. Key patterns (i = layer; each
    stack is "encoder" or "decoder" in both; HF block i holds sub-layers in order: layer.0
    self-attention, [layer.1 cross-attention,] then the feed-forward):

        shared.weight (V, D)                       -> embeddings.tokens.weight
        {stack}.block.i.layer.0.SelfAttention.{q,k,v}.weight (I, D) -> {stack}.layers.i.self_attn.qkv.weight
        {stack}.block.i.layer.0.SelfAttention.o.weight (D, I)       -> {stack}.layers.i.self_attn.out.weight
        decoder.block.i.layer.1.EncDecAttention.q.weight            -> decoder.layers.i.cross_attn.q.weight
        decoder.block.i.layer.1.EncDecAttention.{k,v}.weight        -> decoder.layers.i.cross_attn.kv.weight
        {stack}.block.i.layer.N.DenseReluDense.wi.weight (F, D), or wi_0|wi_1 when gated (2F, D)
                                                   -> {stack}.layers.i.ff.up.weight
        {stack}.block.i.layer.N.DenseReluDense.wo.weight (D, F)     -> {stack}.layers.i.ff.down.weight
        {stack}.block.i.layer.*.layer_norm.weight (D,)              -> the layer's norms
        {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight (R, H)
                                                   -> {stack}.relative_bias.bias.weight (block 0 owns it)
        {stack}.final_layer_norm.weight (D,)       -> {stack}.final_norm.weight
    """
    d, inner, ff = config.d_model, config.n_heads * config.attention_head_dim, config.d_ff
    table = [_one("embeddings.tokens.weight", "shared.weight", config.vocab_size, d)]
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        decoder = stack == "decoder"
        for i in range(n_layers):
            src, dst = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            attn = f"{src}.0.SelfAttention"
            table.append(
                KeyMap(f"{dst}.self_attn.qkv.weight", tuple(f"{attn}.{n}.weight" for n in "qkv"), (inner, d))
            )
            table.append(_one(f"{dst}.self_attn.out.weight", f"{attn}.o.weight", d, inner))
            table.append(_one(f"{dst}.self_attn_norm.weight", f"{src}.0.layer_norm.weight", d))
            if decoder:
                cross = f"{src}.1.EncDecAttention"
                table.append(_one(f"{dst}.cross_attn.q.weight", f"{cross}.q.weight", inner, d))
                table.append(
                    KeyMap(
                        f"{dst}.cross_attn.kv.weight", (f"{cross}.k.weight", f"{cross}.v.weight"), (inner, d)
                    )
                )
                table.append(_one(f"{dst}.cross_attn.out.weight", f"{cross}.o.weight", d, inner))
                table.append(_one(f"{dst}.cross_attn_norm.weight", f"{src}.1.layer_norm.weight", d))
            ff_src = f"{src}.{2 if decoder else 1}"
            dense = f"{ff_src}.DenseReluDense"
            up = (
                (f"{dense}.wi_0.weight", f"{dense}.wi_1.weight")
                if config.gated_ff
                else (f"{dense}.wi.weight",)
            )
            table.append(KeyMap(f"{dst}.ff.up.weight", up, (ff, d)))
            table.append(_one(f"{dst}.ff.down.weight", f"{dense}.wo.weight", d, ff))
            table.append(_one(f"{dst}.ff_norm.weight", f"{ff_src}.layer_norm.weight", d))
        relative = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        table.append(
            _one(f"{stack}.relative_bias.bias.weight", relative, config.relative_buckets, config.n_heads)
        )
        table.append(_one(f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight", d))
    return table


def _check_t5_shape(config: BackboneConfig) -> None:
    if config.position != "relative" or config.norm != "pre" or config.bias:
        raise UserError(
            "T5 conversion needs a config from backbone_config_from_t5 (pre-norm, relative, no bias)"
        )
    if not (config.encoder_layers and config.decoder_layers):
        raise UserError("T5 conversion needs an encoder-decoder backbone; the config lacks a stack")


def t5_to_polyhead(
    hf_state_dict: Mapping[str, Tensor], config: BackboneConfig
) -> tuple[StateDict, Tensor | None]:
    """`T5ForConditionalGeneration` or `T5Model` state dict -> (Backbone state dict, lm_head weight or
    None), by `t5_keys`.

    `{encoder,decoder}.embed_tokens.weight` are optional and must equal `shared.weight` (one table
    here). The LM head: with `config.tie_embeddings` the logits are `(h * D**-0.5) @ shared.T` (when
    `scale_tied_output`), `lm_head.weight` may be absent and, if present, must equal `shared.weight`;
    None is returned. Untied, the logits are `h @ lm_head.T` and `lm_head.weight` (V, D) is
    returned; None then means the checkpoint has no LM head at all (`T5Model`).

    Consumed and discarded: `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`,
    which some original checkpoints carry although cross-attention never uses a position bias.
    """
    _check_t5_shape(config)
    v, d = config.vocab_size, config.d_model
    ledger = _KeyLedger(hf_state_dict, "T5")
    out = _import(ledger, t5_keys(config))
    shared = out.get("embeddings.tokens.weight")
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        _require_same(ledger, key, ledger.take_optional(key, (v, d)), shared, "T5 shares one embedding table")
    ledger.take_optional("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
    lm_head = ledger.take_optional("lm_head.weight", (v, d))
    if config.tie_embeddings:
        _require_same(ledger, "lm_head.weight", lm_head, shared, "tie_embeddings is set")
        lm_head = None
    ledger.close()
    return out, lm_head


def polyhead_to_t5(
    backbone: Mapping[str, Tensor], lm_head: Tensor | None, config: BackboneConfig
) -> StateDict:
    """(Backbone state dict, lm_head weight (V, D) when untied) -> `T5ForConditionalGeneration` state
    dict, by `t5_keys`. The embed_tokens copies are left to HF's tying, as its own `save_pretrained`
    leaves them out. An unscaled output always gets its `lm_head.weight` (the token embeddings when
    tied): `t5_config_to_hf` writes tie_word_embeddings=False for it, which transformers 4 reads as
    "an LM head of its own"."""
    _check_t5_shape(config)
    if config.tie_embeddings != (lm_head is None):
        raise UserError(
            "an untied T5 needs its LM head (the head of a Seq2Seq task without copy)"
            if lm_head is None
            else "a tied T5 has no LM head of its own"
        )
    out = _export(ledger := _KeyLedger(backbone, "polyhead backbone"), t5_keys(config))
    ledger.close()
    if not config.scale_tied_output:
        out["lm_head.weight"] = (out["shared.weight"] if lm_head is None else lm_head).contiguous().clone()
    return out
