"""HuggingFace LLaMA (and Mistral without a sliding window) <-> polyhead: `LlamaForCausalLM` /
`LlamaModel` configs and state dicts to a pre-RMSNorm decoder-only `Backbone` with rotary
positions, grouped-query attention and a SwiGLU feed-forward, and back, by one key table
(`llama_keys`; the shared machinery is in modules/convert.py).

LLaMA's relatives differ from it in a few projections and config keys; each is a `RotaryDecoder`
(`LLAMA` here, Qwen2 and Qwen3 in modules/convert_qwen.py), and the key table and config mapping
follow the backbone options they set (q/k/v biases, query/key norms).

Only the default rotary schedule maps: scaled variants (LLaMA 3.1's "llama3", "linear", "dynamic",
"yarn", ...) and LLaMA's biased projections are refused, naming the config key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from modules.config import BackboneConfig
from modules.convert import (
    OUR_ACTIVATIONS_IN_HF,
    KeyMap,
    StateDict,
    causal_lm_to_polyhead,
    fused,
    hf_activation,
    one_to_one,
    polyhead_to_causal_lm,
    refuse_differences,
)
from modules.errors import UserError

LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rope_parameters": None,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "sliding_window": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}
"""transformers.LlamaConfig's defaults, for config.json files that leave a key out."""
HF_PREFIX = "model."  # LlamaForCausalLM's body; LlamaModel has none
LEGACY_BUFFERS = (".rotary_emb.inv_freq",)  # the rotary frequencies older transformers saved per layer


@dataclass(frozen=True)
class RotaryDecoder:
    """A family of LLaMA's layout: its names, config.json's defaults, the config keys it sets that
    polyhead cannot compute (`refuse` raises a UserError naming one), the backbone options its
    projections need, and the config.json keys of its own that export writes."""

    name: str  # in messages: "LLaMA", "Qwen2", ...
    model_type: str
    architecture: str
    defaults: dict
    refuse: Callable[[Any], None]
    qkv_bias: bool = False  # q, k and v projections biased, the output projection and MLP not
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys
    written: dict = field(default_factory=dict)

    def backbone_config(self, hf_config: Any) -> BackboneConfig:
        """The HF config (or any object with its attributes) -> `BackboneConfig` (decoder-only,
        pre-RMSNorm, rotary, grouped-query, SwiGLU, no biases but the family's q/k/v ones)."""
        self.refuse(hf_config)
        heads = hf_config.num_attention_heads
        kv_heads = hf_config.num_key_value_heads
        return BackboneConfig(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.hidden_size,
            n_heads=heads,
            n_kv_heads=None if kv_heads in (None, heads) else kv_heads,
            head_dim=getattr(hf_config, "head_dim", None) or None,
            d_ff=hf_config.intermediate_size,
            encoder_layers=0,
            decoder_layers=hf_config.num_hidden_layers,
            max_len=hf_config.max_position_embeddings,
            position="rotary",
            rotary_base=_rotary_base(hf_config, self.name),
            type_vocab_size=0,
            norm="pre",
            norm_type="rmsnorm",
            norm_eps=hf_config.rms_norm_eps,
            embedding_norm=False,
            activation=hf_activation(hf_config.hidden_act, f"{self.name} hidden_act"),  # type: ignore[arg-type]
            gated_ff=True,
            bias=False,
            qkv_bias=True if self.qkv_bias else None,
            qk_norm=self.qk_norm,
            scale_attention=True,
            dropout=0.0,
            attention_dropout=hf_config.attention_dropout,
            ff_dropout=0.0,
            pooler=False,
            tie_embeddings=bool(hf_config.tie_word_embeddings),
            scale_tied_output=False,
            init="normal",
            init_std=hf_config.initializer_range,
        )

    def config_to_hf(
        self, config: BackboneConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None
    ) -> dict:
        """`BackboneConfig` -> the family's config.json (the rotary base as `rope_theta`, which
        transformers 4 and 5 both read). A backbone the family cannot compute is refused with the
        config keys that differ; the initialisation, dropout (these families have none but on
        attention), the segment embeddings and the pooler are not written (see `from_polyhead`)."""
        hf = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.d_model,
            "intermediate_size": config.d_ff,
            "num_hidden_layers": config.decoder_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads,
            "head_dim": config.attention_head_dim,
            "hidden_act": OUR_ACTIVATIONS_IN_HF[config.activation],
            "max_position_embeddings": config.max_len,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rotary_base,
            "attention_dropout": config.attention_dropout,
            "initializer_range": config.init_std,
            "tie_word_embeddings": config.tie_embeddings,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        } | self.written
        expressed = self.backbone_config(SimpleNamespace(**(self.defaults | hf)))
        unused = {"init", "init_std", "dropout", "ff_dropout", "type_vocab_size", "pooler"}
        unused |= {"relative_buckets", "relative_max_distance"}
        refuse_differences(config, expressed, self.name, unused)
        return hf

    def to_polyhead(
        self, hf_state_dict: Mapping[str, Tensor], config: BackboneConfig
    ) -> tuple[StateDict, Tensor | None]:
        """`...ForCausalLM` or headless state dict -> (Backbone state dict, lm_head weight or None),
        by `llama_keys` (`causal_lm_to_polyhead`).

        Consumed and discarded: the per-layer `rotary_emb.inv_freq` buffers older transformers saved;
        the frequencies follow from the config.
        """
        self._check_shape(config)
        return causal_lm_to_polyhead(
            hf_state_dict, config, llama_keys(config), self.name, HF_PREFIX, LEGACY_BUFFERS
        )

    def from_polyhead(
        self, backbone: Mapping[str, Tensor], lm_head: Tensor | None, config: BackboneConfig
    ) -> StateDict:
        """(Backbone state dict, lm_head weight (V, D) when untied) -> `...ForCausalLM` state dict, by
        `llama_keys` (`polyhead_to_causal_lm`). A decoder-only backbone adds segment row 0 to every
        token embedding (it passes no segment ids) and these families have no position table to fold
        it into, so a backbone with segment embeddings is refused unless that row is zero."""
        self._check_shape(config)
        state = dict(backbone)
        segments = state.pop("embeddings.segments.weight", None)
        if segments is not None and segments[0].any():
            raise UserError(
                f"this backbone adds a segment embedding to every token, which {self.name} cannot: "
                f"train decoder-only models for {self.name} export with model.backbone.type_vocab_size: 0"
            )
        return polyhead_to_causal_lm(state, lm_head, config, llama_keys(config), self.name, HF_PREFIX)

    def _check_shape(self, config: BackboneConfig) -> None:
        if config.architecture != "decoder" or config.position != "rotary" or config.norm_type != "rmsnorm":
            raise UserError(
                f"{self.name} conversion needs a decoder-only backbone with rotary positions and RMSNorm "
                f"(a config from {self.name}'s backbone_config)"
            )


def _rotary_base(hf_config: Any, family: str) -> float:
    """The rotary base θ, from transformers 5's `rope_parameters` or 4's `rope_theta` and
    `rope_scaling`; a scaled schedule is refused."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(
            f"{family} rope_type={kind!r} (a scaled rotary schedule) has no polyhead equivalent; only 'default' maps"
        )
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _refuse_llama_options(hf_config: Any) -> None:
    """LLaMA's biased projections and Mistral's sliding window."""
    for key in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, key, False):
            raise UserError(
                f"LLaMA {key}=true has no polyhead equivalent (polyhead biases q, k and v alone, or every "
                "projection and norm)"
            )
    if getattr(hf_config, "sliding_window", None) is not None:
        raise UserError(
            f"sliding_window={hf_config.sliding_window}: sliding-window attention has no polyhead equivalent"
        )


LLAMA = RotaryDecoder("LLaMA", "llama", "LlamaForCausalLM", LLAMA_DEFAULTS, _refuse_llama_options)


def llama_keys(config: BackboneConfig) -> list[KeyMap]:
    """The backbone table of `LlamaModel` (i = layer; `LlamaForCausalLM` prefixes each key with
    "model."):

        embed_tokens.weight (V, D)             -> embeddings.tokens.weight
        layers.i.input_layernorm.weight (D,)   -> decoder.layers.i.self_attn_norm.weight
        layers.i.self_attn.q_proj.weight (H*Dh, D), k_proj / v_proj (Hkv*Dh, D)
                                               -> decoder.layers.i.self_attn.qkv.weight (q|k|v)
        layers.i.self_attn.q_proj.bias (H*Dh,), k_proj / v_proj (Hkv*Dh,)
                                               -> decoder.layers.i.self_attn.qkv.bias (q|k|v; qkv_bias: Qwen2)
        layers.i.self_attn.q_norm / k_norm.weight (Dh,)
                                               -> decoder.layers.i.self_attn.q_norm / k_norm.weight (qk_norm: Qwen3)
        layers.i.self_attn.o_proj.weight (D, H*Dh) -> decoder.layers.i.self_attn.out.weight
        layers.i.post_attention_layernorm.weight   -> decoder.layers.i.ff_norm.weight
        layers.i.mlp.gate_proj / up_proj.weight (F, D) -> decoder.layers.i.ff.up.weight (gate|up)
        layers.i.mlp.down_proj.weight (D, F)   -> decoder.layers.i.ff.down.weight
        norm.weight (D,)                       -> decoder.final_norm.weight
    """
    d, ff, dh = config.d_model, config.d_ff, config.attention_head_dim
    inner, kv_inner = config.n_heads * dh, config.kv_heads * dh
    table = [one_to_one("embeddings.tokens.weight", "embed_tokens.weight", config.vocab_size, d)]
    for i in range(config.decoder_layers):
        src, dst = f"layers.{i}", f"decoder.layers.{i}"
        attn = f"{src}.self_attn"
        qkv = tuple(f"{attn}.{n}_proj.weight" for n in "qkv")
        table += [
            one_to_one(f"{dst}.self_attn_norm.weight", f"{src}.input_layernorm.weight", d),
            KeyMap(f"{dst}.self_attn.qkv.weight", qkv, ((inner, d), (kv_inner, d), (kv_inner, d))),
        ]
        if config.attention_qkv_bias:
            biases = tuple(f"{attn}.{n}_proj.bias" for n in "qkv")
            table.append(KeyMap(f"{dst}.self_attn.qkv.bias", biases, ((inner,), (kv_inner,), (kv_inner,))))
        if config.qk_norm:
            table += [
                one_to_one(f"{dst}.self_attn.{n}_norm.weight", f"{attn}.{n}_norm.weight", dh) for n in "qk"
            ]
        table += [
            one_to_one(f"{dst}.self_attn.out.weight", f"{attn}.o_proj.weight", d, inner),
            one_to_one(f"{dst}.ff_norm.weight", f"{src}.post_attention_layernorm.weight", d),
            fused(f"{dst}.ff.up.weight", (f"{src}.mlp.gate_proj.weight", f"{src}.mlp.up_proj.weight"), ff, d),
            one_to_one(f"{dst}.ff.down.weight", f"{src}.mlp.down_proj.weight", d, ff),
        ]
    return table + [one_to_one("decoder.final_norm.weight", "norm.weight", d)]
