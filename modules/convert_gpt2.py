"""HuggingFace GPT-2 <-> polyhead: `GPT2LMHeadModel` / `GPT2Model` configs and state dicts to a
pre-LayerNorm decoder-only `Backbone` with learned positions, and back, by one key table
(`gpt2_keys`; the shared machinery is in modules/convert.py).

GPT-2 is the layout polyhead's decoder-only tasks (PrefixLM) already run: one fused q|k|v
projection, biases everywhere, LayerNorm before each sub-layer and after the stack, the tanh GELU,
the output tied to the token embeddings. What differs is only how HF stores it: `Conv1D` weights
are (in, out), so every matrix is transposed on the way.

Dropout is placed as GPT-2 places it except after the final LayerNorm, where polyhead's pre-norm
stack (T5's layout) drops too; GPT-2's embedding dropout (`embd_pdrop`) is polyhead's `dropout`,
which is GPT-2's `resid_pdrop` too (every released GPT-2 sets both to 0.1). Neither changes what a
model computes in evaluation, which the conversion tests check to 1e-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from modules.config import BackboneConfig
from modules.convert import (
    OUR_ACTIVATIONS_IN_HF,
    KeyMap,
    StateDict,
    causal_lm_to_polyhead,
    hf_activation,
    layernorm_maps,
    one_to_one,
    polyhead_to_causal_lm,
    refuse_differences,
)
from modules.errors import UserError

GPT2_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": None,
}
"""transformers.GPT2Config's defaults, for config.json files that leave a key out."""
HF_PREFIX = "transformer."  # GPT2LMHeadModel's body; GPT2Model and the original hub files have none
LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask older transformers saved


def backbone_config_from_gpt2(hf_config: Any) -> BackboneConfig:
    """`transformers.GPT2Config` (or any object with its attributes) -> `BackboneConfig` (decoder-only,
    pre-LayerNorm, learned positions, biases, tied output). Variants polyhead cannot compute
    (attention scaled by layer index, cross-attention) are refused, naming the key."""
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if getattr(hf_config, key, False):
            raise UserError(f"GPT-2 {key}=true has no polyhead equivalent")
    return BackboneConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.n_embd,
        n_heads=hf_config.n_head,
        d_ff=hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.n_embd,
        encoder_layers=0,
        decoder_layers=hf_config.n_layer,
        max_len=hf_config.n_positions,
        position="learned",
        type_vocab_size=0,
        norm="pre",
        norm_type="layernorm",
        norm_eps=hf_config.layer_norm_epsilon,
        embedding_norm=False,
        activation=hf_activation(hf_config.activation_function, "GPT-2 activation_function"),  # type: ignore[arg-type]
        gated_ff=False,
        bias=True,
        scale_attention=bool(hf_config.scale_attn_weights),
        dropout=hf_config.resid_pdrop,
        attention_dropout=hf_config.attn_pdrop,
        ff_dropout=0.0,  # GPT-2 drops after the feed-forward's output, not between its projections
        pooler=False,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        scale_tied_output=False,
        init="normal",
        init_std=hf_config.initializer_range,
    )


def gpt2_config_to_hf(config: BackboneConfig, eos_id: int | None, pad_id: int | None) -> dict:
    """`BackboneConfig` -> the config.json of `GPT2LMHeadModel`. A backbone GPT-2 cannot compute is
    refused with the config keys that differ. Not written, because they do not change what a trained
    model computes: the initialisation, `ff_dropout`, and the segment embeddings and pooler, which a
    decoder-only backbone never reads apart from segment row 0 (folded into the positions by
    `polyhead_to_gpt2`)."""
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_len,
        "n_embd": config.d_model,
        "n_layer": config.decoder_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": OUR_ACTIVATIONS_IN_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": config.scale_attention,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    expressed = backbone_config_from_gpt2(SimpleNamespace(**(GPT2_DEFAULTS | hf)))
    unused = {
        "init",
        "init_std",
        "ff_dropout",
        "type_vocab_size",
        "pooler",
        "relative_buckets",
        "relative_max_distance",
    }
    refuse_differences(config, expressed, "GPT-2", unused)
    return hf


def gpt2_keys(config: BackboneConfig) -> list[KeyMap]:
    """The backbone table of `GPT2Model` (i = layer; `GPT2LMHeadModel` prefixes each key with
    "transformer."). Conv1D weights are (in, out) and transposed:

        wte.weight (V, D)                  -> embeddings.tokens.weight
        wpe.weight (L, D)                  -> embeddings.positions.weight
        h.i.ln_1.{weight,bias} (D,)        -> decoder.layers.i.self_attn_norm
        h.i.attn.c_attn.{weight (D, 3D), bias (3D,)} -> decoder.layers.i.self_attn.qkv (q|k|v, as ours)
        h.i.attn.c_proj.{weight (D, D), bias}        -> decoder.layers.i.self_attn.out
        h.i.ln_2.{weight,bias}             -> decoder.layers.i.ff_norm
        h.i.mlp.c_fc.{weight (D, F), bias (F,)}      -> decoder.layers.i.ff.up
        h.i.mlp.c_proj.{weight (F, D), bias (D,)}    -> decoder.layers.i.ff.down
        ln_f.{weight,bias}                 -> decoder.final_norm
    """
    d, ff = config.d_model, config.d_ff

    def conv1d(ours: str, theirs: str, in_f: int, out_f: int) -> list[KeyMap]:
        return [
            KeyMap(f"{ours}.weight", (f"{theirs}.weight",), ((in_f, out_f),), transposed=True),
            one_to_one(f"{ours}.bias", f"{theirs}.bias", out_f),
        ]

    table = [
        one_to_one("embeddings.tokens.weight", "wte.weight", config.vocab_size, d),
        one_to_one("embeddings.positions.weight", "wpe.weight", config.max_len, d),
    ]
    for i in range(config.decoder_layers):
        src, dst = f"h.{i}", f"decoder.layers.{i}"
        table += layernorm_maps(f"{dst}.self_attn_norm", f"{src}.ln_1", d)
        table += conv1d(f"{dst}.self_attn.qkv", f"{src}.attn.c_attn", d, 3 * d)
        table += conv1d(f"{dst}.self_attn.out", f"{src}.attn.c_proj", d, d)
        table += layernorm_maps(f"{dst}.ff_norm", f"{src}.ln_2", d)
        table += conv1d(f"{dst}.ff.up", f"{src}.mlp.c_fc", d, ff)
        table += conv1d(f"{dst}.ff.down", f"{src}.mlp.c_proj", ff, d)
    return table + layernorm_maps("decoder.final_norm", "ln_f", d)


def _check_gpt2_shape(config: BackboneConfig) -> None:
    if config.architecture != "decoder" or config.position != "learned" or config.norm != "pre":
        raise UserError(
            "GPT-2 conversion needs a decoder-only backbone with learned positions and pre-norm "
            "(a config from backbone_config_from_gpt2)"
        )


def gpt2_to_polyhead(
    hf_state_dict: Mapping[str, Tensor], config: BackboneConfig
) -> tuple[StateDict, Tensor | None]:
    """`GPT2LMHeadModel` or `GPT2Model` state dict -> (Backbone state dict, lm_head weight or None), by
    `gpt2_keys` (`causal_lm_to_polyhead`). Keys may carry GPT2LMHeadModel's "transformer." prefix or
    not (GPT2Model, the original hub files).

    Consumed and discarded: the `h.i.attn.bias` / `h.i.attn.masked_bias` causal-mask buffers that
    older transformers saved; the mask is computed, never stored, here.
    """
    _check_gpt2_shape(config)
    return causal_lm_to_polyhead(hf_state_dict, config, gpt2_keys(config), "GPT-2", HF_PREFIX, LEGACY_BUFFERS)


def polyhead_to_gpt2(
    backbone: Mapping[str, Tensor], lm_head: Tensor | None, config: BackboneConfig
) -> StateDict:
    """(Backbone state dict, lm_head weight (V, D) when untied) -> `GPT2LMHeadModel` state dict, by
    `gpt2_keys` (`polyhead_to_causal_lm`). A decoder-only backbone adds segment row 0 to every
    position (it passes no segment ids), so that row is folded into wpe; the other rows are never
    read and are left out."""
    _check_gpt2_shape(config)
    state = dict(backbone)
    segments = state.pop("embeddings.segments.weight", None)
    if segments is not None and "embeddings.positions.weight" in state:
        state["embeddings.positions.weight"] = state["embeddings.positions.weight"] + segments[0]
    return polyhead_to_causal_lm(state, lm_head, config, gpt2_keys(config), "GPT-2", HF_PREFIX)
