"""HuggingFace T5 <-> polyhead: `T5ForConditionalGeneration` / `T5Model` configs and state dicts to
a pre-RMSNorm encoder-decoder `Backbone` with relative position bias (and T5's LM head where it has
one of its own), and back, by one key table (`t5_keys`; the shared machinery is in
modules/convert.py).
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
    one_to_one,
    refuse_differences,
    require_same,
)
from modules.errors import UserError

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
    return len(parts) == 2, hf_activation(parts[-1], "T5 feed_forward_proj")


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
        ff_dropout=hf_config.dropout_rate,
        pooler=False,
        tie_embeddings=tied,
        scale_tied_output=scaled,
        init="t5",
    )


def t5_config_to_hf(config: BackboneConfig, pad_id: int, eos_id: int, start_id: int) -> dict:
    """`BackboneConfig` -> the config.json of `T5ForConditionalGeneration`.

    HF T5 has one dropout_rate, which gets `dropout` (attention_dropout and ff_dropout are not
    written); `max_len`, the initialisation and dropout do not change what the trained model computes. A backbone T5 cannot compute is
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
    unused = {"init", "init_std", "max_len", "attention_dropout", "ff_dropout"}  # see the docstring
    refuse_differences(config, expressed, "T5", unused)
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
    table = [one_to_one("embeddings.tokens.weight", "shared.weight", config.vocab_size, d)]
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        decoder = stack == "decoder"
        for i in range(n_layers):
            src, dst = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            attn = f"{src}.0.SelfAttention"
            table.append(
                fused(f"{dst}.self_attn.qkv.weight", tuple(f"{attn}.{n}.weight" for n in "qkv"), inner, d)
            )
            table.append(one_to_one(f"{dst}.self_attn.out.weight", f"{attn}.o.weight", d, inner))
            table.append(one_to_one(f"{dst}.self_attn_norm.weight", f"{src}.0.layer_norm.weight", d))
            if decoder:
                cross = f"{src}.1.EncDecAttention"
                table.append(one_to_one(f"{dst}.cross_attn.q.weight", f"{cross}.q.weight", inner, d))
                table.append(
                    fused(f"{dst}.cross_attn.kv.weight", (f"{cross}.k.weight", f"{cross}.v.weight"), inner, d)
                )
                table.append(one_to_one(f"{dst}.cross_attn.out.weight", f"{cross}.o.weight", d, inner))
                table.append(one_to_one(f"{dst}.cross_attn_norm.weight", f"{src}.1.layer_norm.weight", d))
            ff_src = f"{src}.{2 if decoder else 1}"
            dense = f"{ff_src}.DenseReluDense"
            up = (
                (f"{dense}.wi_0.weight", f"{dense}.wi_1.weight")
                if config.gated_ff
                else (f"{dense}.wi.weight",)
            )
            table.append(fused(f"{dst}.ff.up.weight", up, ff, d))
            table.append(one_to_one(f"{dst}.ff.down.weight", f"{dense}.wo.weight", d, ff))
            table.append(one_to_one(f"{dst}.ff_norm.weight", f"{ff_src}.layer_norm.weight", d))
        relative = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        table.append(
            one_to_one(
                f"{stack}.relative_bias.bias.weight", relative, config.relative_buckets, config.n_heads
            )
        )
        table.append(one_to_one(f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight", d))
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
    ledger = KeyLedger(hf_state_dict, "T5")
    out = import_tensors(ledger, t5_keys(config))
    shared = out.get("embeddings.tokens.weight")
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        require_same(ledger, key, ledger.take_optional(key, (v, d)), shared, "T5 shares one embedding table")
    ledger.take_optional("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
    lm_head = ledger.take_optional("lm_head.weight", (v, d))
    if config.tie_embeddings:
        require_same(ledger, "lm_head.weight", lm_head, shared, "tie_embeddings is set")
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
    out = export_tensors(ledger := KeyLedger(backbone, "polyhead backbone"), t5_keys(config))
    ledger.close()
    if not config.scale_tied_output:
        out["lm_head.weight"] = (out["shared.weight"] if lm_head is None else lm_head).contiguous().clone()
    return out
