"""`BackboneConfig`: every architectural choice of the shared backbone, in one dataclass.

The defaults describe a small BERT-style encoder. The same fields express BERT exactly
(post-LN, learned positions, segments, GELU, biases, tanh pooler), T5 exactly (pre-RMSNorm,
bucketed relative position bias, no biases, unscaled attention, ReLU or gated-GELU), GPT-2 (a
pre-LN decoder) and LLaMA-style decoders (rotary positions, grouped-query attention, SwiGLU; Qwen2's
biased q/k/v projections, Qwen3's per-head query/key norms), so checkpoints of each can be imported
without a second model class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from modules.errors import UserError


@dataclass
class BackboneConfig:
    vocab_size: int | None = None
    """Token vocabulary. None: taken from the run's tokenizer (the usual case)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads per layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention: each serves n_heads / n_kv_heads query heads, and
    the decoding cache shrinks by that factor); None means n_heads. Must divide n_heads."""
    head_dim: int | None = None
    """Width of one head; None means d_model // n_heads (T5 may set it independently)."""
    d_ff: int = 1024
    """Hidden width of the feed-forward block."""
    encoder_layers: int = 4
    """Bidirectional layers; 0 for a decoder-only model."""
    decoder_layers: int = 0
    """Causal layers; with encoder layers they also cross-attend to the encoder output."""
    max_len: int = 512
    """Longest sequence the learned/sinusoidal position table covers."""
    position: Literal["learned", "sinusoidal", "relative", "rotary"] = "learned"
    """Absolute positions added to the embeddings (learned, sinusoidal), T5's bucketed relative bias
    on attention logits, or rotary (RoPE, as LLaMA): queries and keys of self-attention rotated by
    their position, so their dot product depends on the offset alone."""
    rotary_base: float = 10000.0
    """Rotary: pair i of a head's dimensions turns at rotary_base ** (-2i / head_dim) radians per position."""
    relative_buckets: int = 32
    """Relative bias: number of distance buckets (half per direction when bidirectional)."""
    relative_max_distance: int = 128
    """Relative bias: distances beyond this share the last bucket."""
    type_vocab_size: int = 2
    """Segment (token type) embeddings, as BERT's sentence A/B; 0 disables them."""
    norm: Literal["pre", "post"] = "post"
    """LayerNorm after each residual add (BERT) or before each sub-layer (T5, GPT-2)."""
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    """RMSNorm is T5's scale-only norm."""
    norm_eps: float = 1e-12
    """BERT uses 1e-12, T5 1e-6."""
    embedding_norm: bool = True
    """A norm on the summed embeddings (BERT); pre-norm models usually skip it."""
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    """Feed-forward non-linearity."""
    gated_ff: bool = False
    """Gated feed-forward (T5 v1.1's gated-GELU, SwiGLU with silu)."""
    bias: bool = True
    """Biases in linear layers and norms; T5 has none."""
    qkv_bias: bool | None = None
    """Biases in attention's query, key and value projections alone (Qwen2 has them there and
    nowhere else); None means as `bias`."""
    qk_norm: bool = False
    """Normalise each head's queries and keys (a `norm_type` norm over head_dim, with its own
    weights for queries and for keys) after their projection and before the rotary turn, as Qwen3
    does: attention logits stay bounded however large the projections grow."""
    scale_attention: bool = True
    """Divide attention logits by sqrt(head_dim); T5 folds the scale into its initialisation instead."""
    dropout: float = 0.1
    """Dropout on embeddings and sub-layer outputs."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    ff_dropout: float | None = None
    """Dropout on the feed-forward hidden units (between its two projections): T5 has it, BERT
    does not (0.0). None: the same as `dropout`."""
    pooler: bool = True
    """BERT's pooler: tanh(W h_[CLS] + b), used by sentence-level heads such as NSP."""
    tie_embeddings: bool = True
    """Output projections reuse the token embedding matrix."""
    scale_tied_output: bool = False
    """T5 multiplies the decoder output by d_model**-0.5 before the tied projection."""
    init: Literal["normal", "t5"] = "normal"
    """Weight initialisation. "normal" (BERT, GPT-2): every weight N(0, init_std). "t5": T5's
    per-matrix scheme, which an unscaled attention and a scaled tied output need to train from
    scratch: token embeddings N(0, 1), each linear N(0, fan_in ** -0.5), queries a further
    head_dim ** -0.5 when attention logits are not scaled, the relative bias N(0, d_model ** -0.5)."""
    init_std: float = 0.02
    """Standard deviation of the "normal" initialisation."""
    attention: Literal["full", "lsh"] | list[Literal["full", "lsh"]] = "full"
    """Self-attention of every layer, or a list with one entry per layer of each stack (e.g. full
    in the first layers, lsh above). "full": every query scores every key. "lsh": Reformer's
    shared-QK attention within locality-sensitive hash buckets, for long inputs
    (modules/lsh_attention.py). Cross-attention is always full."""
    lsh_n_hashes: int = 4
    """LSH: hash rounds; more rounds miss fewer near keys and cost proportionally more."""
    lsh_bucket_size: int = 64
    """LSH: positions per chunk of the bucket-sorted sequence; each attends to its chunk and the one
    before, so a query scores at most 2 x bucket_size keys per round."""
    reversible: bool = False
    """Reversible residual layers (RevNet, as in the Reformer): the backward pass recomputes each
    layer's input from its output instead of storing activations, so memory no longer grows with
    depth. Needs pre-norm and an encoder-only or decoder-only backbone."""
    ff_chunks: int = 1
    """Run the feed-forward sub-layer over this many slices of the sequence, one at a time: with
    reversible layers, only one slice's hidden units (d_ff wide) are in memory at once."""

    def __post_init__(self) -> None:
        if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads:
            raise UserError(
                f"model.backbone.d_model ({self.d_model}) must be divisible by "
                f"model.backbone.n_heads ({self.n_heads}), or set model.backbone.head_dim"
            )
        if (
            self.encoder_layers < 0
            or self.decoder_layers < 0
            or self.encoder_layers + self.decoder_layers == 0
        ):
            raise UserError(
                "model.backbone needs encoder_layers > 0 or decoder_layers > 0 (neither may be negative)"
            )
        for name in ("d_model", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.backbone.{name} must be positive, got {getattr(self, name)}")
        self._check_heads()
        self._check_long_input_options()
        for name in ("dropout", "attention_dropout", "ff_dropout"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.backbone.{name} must be in [0, 1), got {getattr(self, name)}")

    def _check_heads(self) -> None:
        """Grouped-query attention's kv heads, and rotary's even head width."""
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise UserError(
                f"model.backbone.n_kv_heads ({self.n_kv_heads}) must be positive and divide "
                f"model.backbone.n_heads ({self.n_heads})"
            )
        if self.position == "rotary" and self.attention_head_dim % 2:
            raise UserError(
                f"model.backbone.position 'rotary' turns pairs of dimensions: the head width "
                f"({self.attention_head_dim}) must be even"
            )

    def _check_long_input_options(self) -> None:
        """LSH attention, reversible layers and chunked feed-forward: values and what they need."""
        for name in ("lsh_n_hashes", "lsh_bucket_size", "ff_chunks"):
            if getattr(self, name) < 1:
                raise UserError(f"model.backbone.{name} must be at least 1, got {getattr(self, name)}")
        if isinstance(self.attention, list):
            for stack, n_layers in (("encoder", self.encoder_layers), ("decoder", self.decoder_layers)):
                if n_layers and len(self.attention) != n_layers:
                    raise UserError(
                        f"model.backbone.attention lists {len(self.attention)} layers but the {stack} has "
                        f"{n_layers}; give one entry per layer, or a single 'full' or 'lsh' for all"
                    )
        uses_lsh = "lsh" in self.layer_attention(max(self.encoder_layers, self.decoder_layers))
        if uses_lsh and not self.absolute_positions:
            raise UserError(
                "model.backbone.attention 'lsh' needs absolute positions (position: learned or sinusoidal): "
                "a relative bias is a full T x T matrix, which LSH attention exists to avoid, and its "
                "shared query-key vectors cannot be rotated apart"
            )
        if uses_lsh and self.qk_norm:
            raise UserError(
                "model.backbone.attention 'lsh' shares one projection between queries and keys: "
                "model.backbone.qk_norm must be false"
            )
        if uses_lsh and self.n_kv_heads not in (None, self.n_heads):
            raise UserError(
                "model.backbone.attention 'lsh' shares one projection between queries and keys: "
                "n_kv_heads must be left unset"
            )
        if self.reversible:
            if self.norm != "pre" or self.position == "relative" or self.architecture == "encoder-decoder":
                raise UserError(
                    "model.backbone.reversible needs norm: pre, position: learned, sinusoidal or rotary, and an "
                    f"encoder-only or decoder-only backbone (got norm: {self.norm}, position: {self.position}, "
                    f"{self.architecture})"
                )

    def layer_attention(self, n_layers: int) -> list[str]:
        """The self-attention kind of each of a stack's `n_layers` layers."""
        return list(self.attention) if isinstance(self.attention, list) else [self.attention] * n_layers

    @property
    def absolute_positions(self) -> bool:
        """Positions come from a table of max_len rows (learned or sinusoidal), which bounds the input
        length; relative and rotary positions have no such limit."""
        return self.position in ("learned", "sinusoidal")

    @property
    def kv_heads(self) -> int:
        """n_kv_heads, or n_heads when it is not set."""
        return self.n_kv_heads or self.n_heads

    @property
    def attention_qkv_bias(self) -> bool:
        """qkv_bias, or bias when it is not set."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def attention_head_dim(self) -> int:
        """head_dim, or d_model // n_heads when it is not set."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def architecture(self) -> Literal["encoder", "decoder", "encoder-decoder"]:
        if self.encoder_layers and self.decoder_layers:
            return "encoder-decoder"
        return "encoder" if self.encoder_layers else "decoder"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BackboneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown backbone config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)
