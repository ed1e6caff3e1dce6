"""HuggingFace checkpoints <-> polyhead's `Backbone`: what the per-family conversions share
(modules/convert_bert.py, modules/convert_t5.py, modules/convert_gpt2.py), so that each family is
only its config mapping and its key table.

A key table (a list of `KeyMap`) names every tensor of ours with the HF tensors it is made of.
Import reads the table one way, export the other, so the two directions cannot drift apart.

Every source key must be used: keys left over (an unsupported variant, a layer count that does not
match) and keys not found both end the conversion with a UserError that lists them (`KeyLedger`),
so nothing is dropped silently. The few keys that are accepted and deliberately discarded on import
are named in each family's conversion docstrings.

Where HF keeps separate projections that we fuse, the weights are concatenated on the output
dimension (nn.Linear weights are (out_features, in_features)), in the order our modules split them:
self-attention q|k|v (`MultiHeadAttention.qkv`), cross-attention k|v (`MultiHeadAttention.kv`),
gated feed-forward gate|up (`FeedForward.up`, T5's wi_0|wi_1). GPT-2's `Conv1D` stores its weight
as (in_features, out_features); its table entries are marked `transposed`.

Shapes in the key tables' docstrings: D = d_model, H = n_heads, Dh = head_dim, I = H * Dh,
F = d_ff, V = vocab, L = max_len, S = type_vocab_size, R = relative_buckets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

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


def hf_activation(name: str, source: str) -> str:
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


class KeyLedger:
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


def require_same(
    ledger: KeyLedger, key: str, tensor: Tensor | None, reference: Tensor | None, why: str
) -> None:
    """A tied duplicate must equal the tensor it duplicates: we hold only one copy."""
    if tensor is not None and reference is not None and not torch.equal(tensor, reference):
        ledger.conflicts.append(f"{key}: differs from its tied counterpart ({why})")


# ------------------------------------------------------------------------------------ the key tables


@dataclass(frozen=True)
class KeyMap:
    """Our tensor `ours` is HF's tensors `theirs`, of shapes `shapes` (one each), concatenated on dim
    0 (each transposed first when `transposed`: HF keeps them (in, out), we keep (out, in))."""

    ours: str
    theirs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    transposed: bool = False

    @property
    def our_parts(self) -> list[tuple[int, ...]]:
        """Each HF tensor's shape as it sits in ours."""
        return [shape[::-1] if self.transposed else shape for shape in self.shapes]

    @property
    def our_shape(self) -> tuple[int, ...]:
        parts = self.our_parts
        return (sum(part[0] for part in parts), *parts[0][1:])


def one_to_one(ours: str, theirs: str, *shape: int) -> KeyMap:
    return KeyMap(ours, (theirs,), (shape,))


def fused(ours: str, theirs: tuple[str, ...], *shape: int) -> KeyMap:
    """Our tensor is HF's equally shaped tensors `theirs`, stacked (q|k|v, k|v, gate|up)."""
    return KeyMap(ours, theirs, (shape,) * len(theirs))


def linear_maps(ours: str, theirs: str, out_f: int, in_f: int, bias: bool = True) -> list[KeyMap]:
    weight = [one_to_one(f"{ours}.weight", f"{theirs}.weight", out_f, in_f)]
    return weight + ([one_to_one(f"{ours}.bias", f"{theirs}.bias", out_f)] if bias else [])


def layernorm_maps(ours: str, theirs: str, d: int) -> list[KeyMap]:
    return [
        one_to_one(f"{ours}.weight", f"{theirs}.weight", d),
        one_to_one(f"{ours}.bias", f"{theirs}.bias", d),
    ]


def import_tensors(ledger: KeyLedger, table: list[KeyMap]) -> StateDict:
    """HF tensors -> ours along the table; missing and misshapen ones are left to the ledger's report."""
    out: StateDict = {}
    for entry in table:
        parts = [ledger.take(key, shape) for key, shape in zip(entry.theirs, entry.shapes, strict=True)]
        if all(part is not None for part in parts):
            ordered = [part.t() if entry.transposed else part for part in parts]  # type: ignore[union-attr]
            out[entry.ours] = torch.cat(ordered, dim=0)
    return out


def export_tensors(ledger: KeyLedger, table: list[KeyMap]) -> StateDict:
    """Our tensors -> HF's along the table, each a tensor of its own (safetensors refuses shared storage)."""
    out: StateDict = {}
    for entry in table:
        tensor = ledger.take(entry.ours, entry.our_shape)
        if tensor is not None:
            rows = [part[0] for part in entry.our_parts]
            for key, part in zip(entry.theirs, tensor.split(rows), strict=True):
                out[key] = (part.t() if entry.transposed else part).contiguous().clone()
    return out


def refuse_differences(
    config: BackboneConfig, expressed: BackboneConfig, family: str, ignored: set[str]
) -> None:
    """Export writes a HF config; reading it back must give this very backbone, or HF would compute
    something else. Every field that differs is named, with the value HF would have."""
    differ = [
        f"model.backbone.{field.name}={getattr(config, field.name)!r} ({family} has {getattr(expressed, field.name)!r})"
        for field in dataclasses.fields(BackboneConfig)
        if field.name not in {*ignored, "head_dim", "n_kv_heads", "qkv_bias"}
        and getattr(config, field.name) != getattr(expressed, field.name)
    ]
    follows_bias = config.qkv_bias is None and config.bias != expressed.bias  # said by `bias` already
    if config.attention_qkv_bias != expressed.attention_qkv_bias and not follows_bias:  # None: as `bias`
        differ.append(
            f"model.backbone.qkv_bias={config.qkv_bias!r} ({family} has {expressed.attention_qkv_bias})"
        )
    if config.attention_head_dim != expressed.attention_head_dim:
        differ.append(
            f"model.backbone.head_dim={config.head_dim!r} ({family} has {expressed.attention_head_dim})"
        )
    if config.kv_heads != expressed.kv_heads:  # None and n_heads mean the same
        differ.append(f"model.backbone.n_kv_heads={config.n_kv_heads!r} ({family} has {expressed.kv_heads})")
    if differ:
        raise UserError(f"this backbone cannot be written as HF {family}: " + "; ".join(differ))


# ------------------------------------------------------------------------ decoder-only language models


def causal_lm_to_polyhead(
    hf_state_dict: Mapping[str, Tensor],
    config: BackboneConfig,
    table: list[KeyMap],
    family: str,
    prefix: str,
    discarded: tuple[str, ...],
) -> tuple[StateDict, Tensor | None]:
    """A decoder-only LM's state dict (`...ForCausalLM` keys carry `prefix`, the headless model's do
    not) -> (Backbone state dict by `table`, lm_head weight or None). Keys ending in `discarded`
    (buffers older transformers saved) are consumed and dropped. Tied, `lm_head.weight` may be absent
    and, if present, must equal the token embeddings; untied, it is returned (None then means the
    checkpoint has no LM head)."""
    state = {key.removeprefix(prefix): tensor for key, tensor in hf_state_dict.items()}
    ledger = KeyLedger(state, family)
    for key in [k for k in state if k.endswith(discarded)]:
        ledger.take_optional(key)
    out = import_tensors(ledger, table)
    lm_head = ledger.take_optional("lm_head.weight", (config.vocab_size, config.d_model))
    if config.tie_embeddings:
        tokens = out.get("embeddings.tokens.weight")
        require_same(ledger, "lm_head.weight", lm_head, tokens, f"{family} ties it to the token embeddings")
        lm_head = None
    ledger.close()
    return out, lm_head


def polyhead_to_causal_lm(
    backbone: Mapping[str, Tensor],
    lm_head: Tensor | None,
    config: BackboneConfig,
    table: list[KeyMap],
    family: str,
    prefix: str,
) -> StateDict:
    """(Backbone state dict, lm_head weight (V, D) when untied) -> a `...ForCausalLM` state dict by
    `table`, each key under `prefix`. A pooler, which a decoder never reads, is left out, and so is
    a tied lm_head: HF ties it, as its own `save_pretrained` leaves it out. The caller has dealt with
    the segment embeddings, which have no place in either family."""
    if config.tie_embeddings != (lm_head is None):
        raise UserError(
            f"an untied {family} needs its LM head"
            if lm_head is None
            else f"a tied {family} has no LM head of its own"
        )
    state = {key: tensor for key, tensor in backbone.items() if not key.startswith("pooler.")}
    ledger = KeyLedger(state, "polyhead backbone")
    out = {prefix + key: tensor for key, tensor in export_tensors(ledger, table).items()}
    ledger.close()
    if lm_head is not None:
        out["lm_head.weight"] = lm_head.contiguous().clone()
    return out
