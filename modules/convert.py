"""Import HuggingFace BERT and T5 checkpoints into polyhead's `Backbone` (and BERT's MLM/NSP heads).

Two steps per model family: a `BackboneConfig` from the HF config object, then a renaming of the HF
state dict into ours. Renaming is by explicit key patterns, one layer at a time, and every source
key must be used: keys left over (an unsupported variant, a layer count that does not match) and
keys not found both end the conversion with a ValueError that lists them, so nothing is dropped
silently. The few keys that are accepted and deliberately discarded are named in each function's
docstring.

Where HF keeps separate projections that we fuse, the weights are concatenated on the output
dimension (nn.Linear weights are (out_features, in_features)), in the order our modules split them:
self-attention q|k|v (`MultiHeadAttention.qkv`), cross-attention k|v (`MultiHeadAttention.kv`),
gated feed-forward gate|up (`FeedForward.up`, T5's wi_0|wi_1).

Shapes below: D = d_model, H = n_heads, Dh = head_dim, I = H * Dh, F = d_ff, V = vocab, L = max_len,
S = type_vocab_size, R = relative_buckets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from modules.config import BackboneConfig

StateDict = dict[str, Tensor]

HF_ACTIVATIONS = {
    "gelu": "gelu",  # HF's "gelu" is the exact erf form
    "gelu_new": "gelu_tanh",  # the tanh approximation, written out by hand in HF
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _activation(name: str, source: str) -> str:
    """HF activation name -> ours; anything we cannot compute identically is refused."""
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise ValueError(
            f"{source}: activation {name!r} has no polyhead equivalent; supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


class _KeyLedger:
    """Hands out the tensors of a source state dict by exact key and keeps the books: which keys were
    never asked for, which were asked for and absent, which had the wrong shape, which tied duplicates
    disagree. `close()` raises one ValueError listing them all, so a conversion reports every problem
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
            problems.append(f"missing keys: {self.missing}")
        if self.bad_shapes:
            problems.append(
                f"keys with unexpected shapes (does the config match the weights?): {self.bad_shapes}"
            )
        if self.conflicts:
            problems.append(f"tied duplicates that differ: {self.conflicts}")
        if self.remaining:
            problems.append(f"keys not consumed: {sorted(self.remaining)}")
        if problems:
            raise ValueError(f"cannot convert {self.source} state dict; " + "; ".join(problems))


def _cat(*tensors: Tensor | None) -> Tensor | None:
    """Concatenate on the output dimension (dim 0); None if any part was missing (already reported)."""
    if any(t is None for t in tensors):
        return None
    return torch.cat(tensors, dim=0)  # type: ignore[arg-type]


def _put(out: StateDict, key: str, tensor: Tensor | None) -> None:
    """Store a converted tensor; missing ones are skipped here because the ledger already reports them."""
    if tensor is not None:
        out[key] = tensor


def _require_same(
    ledger: _KeyLedger, key: str, tensor: Tensor | None, reference: Tensor | None, why: str
) -> None:
    """A tied duplicate must equal the tensor it duplicates: we hold only one copy."""
    if tensor is not None and reference is not None and not torch.equal(tensor, reference):
        ledger.conflicts.append(f"{key}: differs from its tied counterpart ({why})")


# ---------------------------------------------------------------------------------------------- BERT


def backbone_config_from_bert(hf_config: Any) -> BackboneConfig:
    """`transformers.BertConfig` -> `BackboneConfig` (post-LN encoder, learned positions, segments, pooler).

    Only the absolute-position encoder is expressible; BERT used as a decoder or with relative
    position embeddings raises.
    """
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"BERT position_embedding_type={position_type!r} is not supported (only 'absolute')")
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ValueError("BERT configured as a decoder (is_decoder / add_cross_attention) is not supported")
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


def _rename_tf_layernorm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Older BERT checkpoints (ported from TensorFlow) name LayerNorm parameters gamma/beta."""
    renamed: StateDict = {}
    for key, tensor in state_dict.items():
        new = key
        if key.endswith("LayerNorm.gamma"):
            new = key[: -len("gamma")] + "weight"
        elif key.endswith("LayerNorm.beta"):
            new = key[: -len("beta")] + "bias"
        if new in renamed:
            raise ValueError(f"BERT state dict has both {key!r} and its modern name {new!r}")
        renamed[new] = tensor
    return renamed


def bert_to_polyhead(
    hf_state_dict: Mapping[str, Tensor], config: BackboneConfig
) -> tuple[StateDict, StateDict]:
    """`BertForPreTraining` state dict -> (Backbone state dict, MLM/NSP head state dict).

    The head dict is keyed as the `nn.ModuleDict({"mlm": MaskedLMHead, "nsp": PooledClassifierHead})`
    built by tasks/mlm_nsp.py. Key patterns (i = layer):

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
        cls.predictions.decoder.bias (V,) or, when absent, cls.predictions.bias (V,) -> mlm.bias
        cls.predictions.decoder.weight (V, D)  -> mlm.decoder.weight when untied; when tied it may be
                                                  absent, and if present must equal the word embeddings
        cls.seq_relationship.*                              -> nsp.classifier.*  (2, D)

    HF's forward adds `cls.predictions.decoder.bias`; older versions alias it to `cls.predictions.bias`,
    newer ones keep both when untied, so the decoder's bias wins and `cls.predictions.bias` is consumed
    and discarded when both exist. Also consumed and discarded: the non-learned buffers
    `bert.embeddings.position_ids` / `bert.embeddings.token_type_ids` that some checkpoints carry.
    TF-style `LayerNorm.gamma`/`beta` names are accepted.
    """
    if config.norm != "post" or config.position != "learned" or not config.pooler or config.decoder_layers:
        raise ValueError(
            "bert_to_polyhead needs a config from backbone_config_from_bert (post-norm encoder with pooler)"
        )
    d, inner, ff, v = (
        config.d_model,
        config.n_heads * config.attention_head_dim,
        config.d_ff,
        config.vocab_size,
    )
    ledger = _KeyLedger(_rename_tf_layernorm(hf_state_dict), "BertForPreTraining")
    backbone: StateDict = {}
    head: StateDict = {}

    def linear(src: str, dst_dict: StateDict, dst: str, out_f: int, in_f: int) -> None:
        _put(dst_dict, f"{dst}.weight", ledger.take(f"{src}.weight", (out_f, in_f)))
        _put(dst_dict, f"{dst}.bias", ledger.take(f"{src}.bias", (out_f,)))

    def layernorm(src: str, dst_dict: StateDict, dst: str) -> None:
        _put(dst_dict, f"{dst}.weight", ledger.take(f"{src}.weight", (d,)))
        _put(dst_dict, f"{dst}.bias", ledger.take(f"{src}.bias", (d,)))

    emb = "bert.embeddings"
    tokens = ledger.take(f"{emb}.word_embeddings.weight", (v, d))
    _put(backbone, "embeddings.tokens.weight", tokens)
    _put(
        backbone,
        "embeddings.positions.weight",
        ledger.take(f"{emb}.position_embeddings.weight", (config.max_len, d)),
    )
    if config.type_vocab_size:
        _put(
            backbone,
            "embeddings.segments.weight",
            ledger.take(f"{emb}.token_type_embeddings.weight", (config.type_vocab_size, d)),
        )
    layernorm(f"{emb}.LayerNorm", backbone, "embeddings.norm")
    ledger.take_optional(f"{emb}.position_ids")  # buffers, not weights
    ledger.take_optional(f"{emb}.token_type_ids")

    for i in range(config.encoder_layers):
        src, dst = f"bert.encoder.layer.{i}", f"encoder.layers.{i}"
        attn = f"{src}.attention.self"
        for part in ("weight", "bias"):
            shape = (inner, d) if part == "weight" else (inner,)
            qkv = _cat(*(ledger.take(f"{attn}.{name}.{part}", shape) for name in ("query", "key", "value")))
            _put(backbone, f"{dst}.self_attn.qkv.{part}", qkv)
        linear(f"{src}.attention.output.dense", backbone, f"{dst}.self_attn.out", d, inner)
        layernorm(f"{src}.attention.output.LayerNorm", backbone, f"{dst}.self_attn_norm")
        linear(f"{src}.intermediate.dense", backbone, f"{dst}.ff.up", ff, d)
        linear(f"{src}.output.dense", backbone, f"{dst}.ff.down", d, ff)
        layernorm(f"{src}.output.LayerNorm", backbone, f"{dst}.ff_norm")
    linear("bert.pooler.dense", backbone, "pooler", d, d)

    linear("cls.predictions.transform.dense", head, "mlm.transform", d, d)
    layernorm("cls.predictions.transform.LayerNorm", head, "mlm.norm")
    shared_bias = ledger.take_optional("cls.predictions.bias", (v,))
    decoder_bias = ledger.take_optional("cls.predictions.decoder.bias", (v,))
    bias = decoder_bias if decoder_bias is not None else shared_bias
    if bias is None:
        ledger.missing.append("cls.predictions.bias (or cls.predictions.decoder.bias)")
    _put(head, "mlm.bias", bias)
    if config.tie_embeddings:
        decoder = ledger.take_optional("cls.predictions.decoder.weight", (v, d))
        _require_same(ledger, "cls.predictions.decoder.weight", decoder, tokens, "tie_embeddings is set")
    else:
        _put(head, "mlm.decoder.weight", ledger.take("cls.predictions.decoder.weight", (v, d)))
    linear("cls.seq_relationship", head, "nsp.classifier", 2, d)

    ledger.close()
    return backbone, head


# ------------------------------------------------------------------------------------------------ T5


def _t5_feed_forward(feed_forward_proj: str) -> tuple[bool, str]:
    """T5's feed_forward_proj ("relu", "gated-gelu", "gated-silu", ...) -> (gated, our activation).

    HF maps "gated-gelu" (T5 v1.1) to its tanh-approximated gelu_new, for backwards compatibility.
    """
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"T5 feed_forward_proj={feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
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


def backbone_config_from_t5(hf_config: Any) -> BackboneConfig:
    """`transformers.T5Config` -> `BackboneConfig` (pre-RMSNorm encoder-decoder, relative bias, no biases).

    v1.0 (feed_forward_proj "relu", tied, scaled output) and v1.1 ("gated-gelu", untied, unscaled)
    both map. Tied checkpoints get `tie_embeddings` and `scale_tied_output`; untied ones neither,
    and their lm_head comes back separately from `t5_to_polyhead`. `max_len` keeps its default:
    relative positions need no table. `init` is T5's per-matrix scheme, which new heads start from.
    """
    gated, activation = _t5_feed_forward(hf_config.feed_forward_proj)
    tied = _t5_scales_output(hf_config)
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
        scale_tied_output=tied,
        init="t5",
    )


def _t5_stack(ledger: _KeyLedger, out: StateDict, config: BackboneConfig, stack: str, n_layers: int) -> None:
    """One T5Stack ("encoder" or "decoder"; ours has the same name) -> our Stack.

    HF block i holds sub-layers in order: layer.0 self-attention, [layer.1 cross-attention,]
    then the feed-forward. Only block 0 owns the stack's relative bias (R, H); later blocks reuse it.
    """
    d, inner, ff = config.d_model, config.n_heads * config.attention_head_dim, config.d_ff
    decoder = stack == "decoder"
    for i in range(n_layers):
        src, dst = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
        attn = f"{src}.0.SelfAttention"
        qkv = _cat(*(ledger.take(f"{attn}.{name}.weight", (inner, d)) for name in ("q", "k", "v")))
        _put(out, f"{dst}.self_attn.qkv.weight", qkv)  # (3I, D)
        _put(out, f"{dst}.self_attn.out.weight", ledger.take(f"{attn}.o.weight", (d, inner)))
        _put(out, f"{dst}.self_attn_norm.weight", ledger.take(f"{src}.0.layer_norm.weight", (d,)))
        if decoder:
            cross = f"{src}.1.EncDecAttention"
            _put(out, f"{dst}.cross_attn.q.weight", ledger.take(f"{cross}.q.weight", (inner, d)))
            kv = _cat(
                ledger.take(f"{cross}.k.weight", (inner, d)), ledger.take(f"{cross}.v.weight", (inner, d))
            )
            _put(out, f"{dst}.cross_attn.kv.weight", kv)  # (2I, D)
            _put(out, f"{dst}.cross_attn.out.weight", ledger.take(f"{cross}.o.weight", (d, inner)))
            _put(out, f"{dst}.cross_attn_norm.weight", ledger.take(f"{src}.1.layer_norm.weight", (d,)))
        ff_src = f"{src}.{2 if decoder else 1}"
        dense = f"{ff_src}.DenseReluDense"
        if config.gated_ff:
            up = _cat(
                ledger.take(f"{dense}.wi_0.weight", (ff, d)), ledger.take(f"{dense}.wi_1.weight", (ff, d))
            )
        else:
            up = ledger.take(f"{dense}.wi.weight", (ff, d))
        _put(out, f"{dst}.ff.up.weight", up)  # (F, D) or (2F, D)
        _put(out, f"{dst}.ff.down.weight", ledger.take(f"{dense}.wo.weight", (d, ff)))
        _put(out, f"{dst}.ff_norm.weight", ledger.take(f"{ff_src}.layer_norm.weight", (d,)))
    relative = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    _put(
        out,
        f"{stack}.relative_bias.bias.weight",
        ledger.take(relative, (config.relative_buckets, config.n_heads)),
    )
    _put(out, f"{stack}.final_norm.weight", ledger.take(f"{stack}.final_layer_norm.weight", (d,)))


def t5_to_polyhead(
    hf_state_dict: Mapping[str, Tensor], config: BackboneConfig
) -> tuple[StateDict, Tensor | None]:
    """`T5ForConditionalGeneration` or `T5Model` state dict -> (Backbone state dict, lm_head weight or None).

    Key patterns (see `_t5_stack` for the blocks):

        shared.weight (V, D)                       -> embeddings.tokens.weight
        {encoder,decoder}.embed_tokens.weight      -> optional; must equal shared.weight (one table here)
        {stack}.block.i.layer.0.SelfAttention.{q,k,v}.weight (I, D) -> {stack}.layers.i.self_attn.qkv.weight
        decoder.block.i.layer.1.EncDecAttention.{k,v}.weight        -> decoder.layers.i.cross_attn.kv.weight
        {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight (R, H)
                                                   -> {stack}.relative_bias.bias.weight
        {stack}.final_layer_norm.weight (D,)       -> {stack}.final_norm.weight
        lm_head.weight (V, D)                      -> returned separately (see below)

    The LM head: with `config.tie_embeddings` the logits are `(h * D**-0.5) @ shared.T` (when
    `scale_tied_output`), `lm_head.weight` may be absent and, if present, must equal `shared.weight`;
    None is returned. Untied, the logits are `h @ lm_head.T` and `lm_head.weight` is returned; None
    then means the checkpoint has no LM head at all (`T5Model`).

    Consumed and discarded: `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`,
    which some original checkpoints carry although cross-attention never uses a position bias.
    """
    if config.position != "relative" or config.norm != "pre" or config.bias:
        raise ValueError(
            "t5_to_polyhead needs a config from backbone_config_from_t5 (pre-norm, relative, no bias)"
        )
    if not (config.encoder_layers and config.decoder_layers):
        raise ValueError("t5_to_polyhead converts encoder-decoder T5 models; the config lacks a stack")
    v, d = config.vocab_size, config.d_model
    ledger = _KeyLedger(hf_state_dict, "T5")
    out: StateDict = {}
    shared = ledger.take("shared.weight", (v, d))
    _put(out, "embeddings.tokens.weight", shared)
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        _require_same(ledger, key, ledger.take_optional(key, (v, d)), shared, "T5 shares one embedding table")
    _t5_stack(ledger, out, config, "encoder", config.encoder_layers)
    _t5_stack(ledger, out, config, "decoder", config.decoder_layers)
    ledger.take_optional("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

    lm_head = ledger.take_optional("lm_head.weight", (v, d))
    if config.tie_embeddings:
        _require_same(ledger, "lm_head.weight", lm_head, shared, "tie_embeddings is set")
        lm_head = None
    ledger.close()
    return out, lm_head
