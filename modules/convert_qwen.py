"""HuggingFace Qwen2 (Qwen2.5) and Qwen3 <-> polyhead: LLaMA's layout (modules/convert_llama.py,
whose key table and config mapping they share as `RotaryDecoder`s), with

- Qwen2 (`Qwen2ForCausalLM` / `Qwen2Model`): biases on the q, k and v projections, none on the
  output projection or the MLP (`qkv_bias: true`, `bias: false`);
- Qwen3 (`Qwen3ForCausalLM` / `Qwen3Model`): no biases, an RMSNorm over each head's queries and keys
  before the rotary turn (`qk_norm: true`), and a head width of its own (config.json's `head_dim`).

Refused, naming the config key: sliding-window attention (`use_sliding_window: true`, or
`layer_types` with a layer that is not "full_attention"), scaled rotary schedules (`rope_type`),
and Qwen3's `attention_bias: true` (it biases the output projection too, which polyhead cannot
alone). Without `use_sliding_window`, `sliding_window` and `max_window_layers` change nothing in HF
either (hub Qwen2.5 configs carry both), and are ignored.
"""

from __future__ import annotations

from typing import Any

from modules.convert_llama import LLAMA_DEFAULTS, RotaryDecoder
from modules.errors import UserError

QWEN2_DEFAULTS = LLAMA_DEFAULTS | {
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
"""transformers.Qwen2Config's defaults, for config.json files that leave a key out."""
QWEN3_DEFAULTS = QWEN2_DEFAULTS | {"head_dim": 128}
"""transformers.Qwen3Config's defaults (with `attention_bias: false`, as LLaMA's)."""


def _refuse_sliding_window(hf_config: Any, family: str) -> None:
    """Qwen's sliding window, on (use_sliding_window) or laid out per layer (layer_types)."""
    if getattr(hf_config, "use_sliding_window", False):
        raise UserError(
            f"{family} use_sliding_window=true: sliding-window attention has no polyhead equivalent"
        )
    kinds = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise UserError(
            f"{family} layer_types={sorted(kinds)}: only 'full_attention' layers have a polyhead equivalent"
        )


def _refuse_qwen2_options(hf_config: Any) -> None:
    _refuse_sliding_window(hf_config, "Qwen2")


def _refuse_qwen3_options(hf_config: Any) -> None:
    _refuse_sliding_window(hf_config, "Qwen3")
    if getattr(hf_config, "attention_bias", False):
        raise UserError(
            "Qwen3 attention_bias=true has no polyhead equivalent (it biases the output projection as "
            "well as q, k and v, but not the MLP)"
        )


QWEN2 = RotaryDecoder(
    "Qwen2",
    "qwen2",
    "Qwen2ForCausalLM",
    QWEN2_DEFAULTS,
    _refuse_qwen2_options,
    qkv_bias=True,
    written={"use_sliding_window": False},
)
QWEN3 = RotaryDecoder(
    "Qwen3",
    "qwen3",
    "Qwen3ForCausalLM",
    QWEN3_DEFAULTS,
    _refuse_qwen3_options,
    qk_norm=True,
    written={"use_sliding_window": False, "attention_bias": False},
)
