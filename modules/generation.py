"""Text generation on the backbone's decoder with a KV cache: greedy search, beam search, sampling.

One entry, `generate`, serves both shapes of model:

- encoder-decoder (T5-style seq2seq): right-padded source ids + mask are encoded once, every decoder
  row starts from `start_id`, and each layer projects the encoder memory to keys/values once.
- decoder-only (a prefix LM, or the decoder stack of an encoder-decoder backbone): LEFT-padded
  prompt ids + mask, so every prompt ends in the last column and new tokens append after it. Each
  row's positions count from its first real token, so a padded row decodes as it would alone.

Tasks own their LM heads, so the caller passes the output projection as a callable
`project(hidden (N, D)) -> logits (N, V)`. Everything is batched over rows (beam search over
B * num_beams rows); the only Python loop is over decoding steps. Put the backbone and head in eval
mode first: `generate` does not change modes.

    head = LanguageModelHead(config)
    project = lambda hidden: head(hidden, backbone.token_embedding)
    settings = GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=64, eos_id=eos, pad_id=pad)
    out = generate(backbone, project, source_ids, source_mask, settings, start_id=pad)  # seq2seq
    out = generate(backbone, project, prompt_ids, prompt_mask, settings)  # decoder-only
    out.tokens  # (B * num_return_sequences, <= max_new_tokens): new tokens, pad_id after each eos
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from modules.backbone import Backbone
from modules.cached_decoder import CachedDecoder, Project

STRATEGY_SETTINGS = {
    "greedy": (),
    "beam": ("num_beams", "length_penalty", "num_return_sequences"),
    "sample": ("num_return_sequences", "temperature", "top_k", "top_p", "seed"),
}
"""The settings each strategy reads; a setting no chosen strategy reads must keep its default."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Settings of another strategy must stay at their defaults, so none is silently ignored."""

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    """greedy: the most likely token each step; beam: beam search; sample: draw from the filtered distribution."""
    max_new_tokens: int = 32
    """Most tokens generated per row, its eos included."""
    eos_id: int | None = None
    """A row stops once it produces this token; None: every row runs for max_new_tokens."""
    pad_id: int = 0
    """Fills a row's columns after its eos."""
    no_repeat_ngram_size: int = 0
    """Forbid any token that would make an n-gram of this size occur twice among a row's new tokens, the
    usual cure for a small model that loops ("we propose a method for the method for the ..."); 0 allows all."""
    num_beams: int = 4
    """beam: hypotheses kept per row."""
    length_penalty: float = 1.0
    """beam: hypotheses rank by log-prob sum / length ** length_penalty (GNMT's alpha; the length counts the
    eos; 0 ranks by the raw sum). Above 0 favours longer outputs."""
    num_return_sequences: int = 1
    """beam: the n best hypotheses per row (n <= num_beams); sample: n independent samples per row."""
    temperature: float = 1.0
    """sample: logits are divided by it; below 1 sharpens the distribution, above 1 flattens it."""
    top_k: int = 0
    """sample: draw only among the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """sample: draw only from the nucleus, the fewest most likely tokens whose probability reaches top_p."""
    seed: int | None = None
    """sample: seeds a generator of its own, so a seed repeats its samples; None uses torch's global RNG."""
    cuda_graph: bool = False
    """On a GPU, record the decoding step once as a CUDA graph and replay it (modules/decode_graph.py): a
    step of a small model is hundreds of kernel launches, which the host then no longer makes one by one.
    On the CPU the step runs with the graph's fixed shapes, unrecorded: the same tokens, a little slower."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_SETTINGS:
            raise ValueError(
                f"GenerationConfig.strategy must be one of {sorted(STRATEGY_SETTINGS)}, got {self.strategy!r}"
            )
        rules = (
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("eos_id", self.eos_id is None or self.eos_id >= 0, "must be None or >= 0"),
            ("pad_id", self.pad_id >= 0, "must be >= 0"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "must be >= 0 (0 allows repeats)"),
            ("num_beams", self.num_beams >= 1, "must be >= 1"),
            ("length_penalty", math.isfinite(self.length_penalty), "must be finite"),
            ("num_return_sequences", self.num_return_sequences >= 1, "must be >= 1"),
            ("temperature", 0 < self.temperature < math.inf, "must be > 0 (use strategy 'greedy' for 0)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 keeps every token)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
        )
        for name, valid, rule in rules:
            if not valid:
                raise ValueError(f"GenerationConfig.{name} {rule}, got {getattr(self, name)!r}")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"GenerationConfig.num_return_sequences ({self.num_return_sequences}) must be <= "
                f"num_beams ({self.num_beams}): beam search keeps only num_beams hypotheses"
            )
        self._refuse_unread_settings()

    def _refuse_unread_settings(self) -> None:
        read = STRATEGY_SETTINGS[self.strategy]
        for field in fields(self):
            readers = [s for s, names in STRATEGY_SETTINGS.items() if field.name in names]
            if readers and field.name not in read and getattr(self, field.name) != field.default:
                raise ValueError(
                    f"GenerationConfig.{field.name} applies to strategy {' or '.join(map(repr, readers))}, "
                    f"not {self.strategy!r}; leave it at its default ({field.default!r})"
                )


@dataclass
class Generation:
    """What `generate` returns; row b's sequences are rows b * n .. b * n + n - 1 (n per source row)."""

    tokens: Tensor
    """(B * n, L) the new tokens only, L <= max_new_tokens; pad_id after a row's eos (the eos is kept)."""
    scores: Tensor | None
    """beam: (B * n,) length-normalised log-prob of each hypothesis, best first within a row; else None."""


@torch.no_grad()
def generate(
    backbone: Backbone,
    project: Project,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    config: GenerationConfig = GenerationConfig(),
    start_id: int | None = None,
    memory: Tensor | None = None,
) -> Generation:
    """Continue each row of input_ids (B, T) by up to config.max_new_tokens tokens.

    With start_id, input_ids is the (right-padded) source of an encoder-decoder: it is encoded once and
    the decoder starts from start_id. Without it, input_ids is a LEFT-padded decoder prompt (mask 0 on
    the left). attention_mask: (B, T), 1 at real tokens; None when nothing is padded. memory: the
    encoder output (B, T, D) of input_ids when the caller already has it (seq2seq validation has
    just computed it for the loss), so the source is not encoded twice.
    """
    copies = config.num_beams if config.strategy == "beam" else config.num_return_sequences
    if start_id is None:
        decoder, logits = _start_from_prompt(backbone, project, input_ids, attention_mask, copies, config)
    else:
        decoder, logits = _start_from_source(
            backbone, project, input_ids, _hiding(attention_mask), copies, config, start_id, memory
        )
    if config.strategy == "beam":
        return _beam_search(decoder, logits, config, batch_size=input_ids.size(0))
    return Generation(_greedy_or_sample(decoder, logits, config), scores=None)


def _start_from_source(
    backbone: Backbone,
    project: Project,
    source: Tensor,
    source_mask: Tensor | None,
    copies: int,
    config: GenerationConfig,
    start_id: int,
    memory: Tensor | None = None,
) -> tuple[CachedDecoder, Tensor]:
    """Encode each source once, feed start_id to each of its `copies` rows -> (decoder, first logits (N, V)).

    The memory stays one row per source: cross-attention serves a source's consecutive copies (beams or
    samples) from that row, projecting its keys/values once (see `_fold_copies` in modules/attention.py).
    """
    _check_positions_fit(backbone, config.max_new_tokens - 1, config)
    memory = backbone.encode(source, source_mask) if memory is None else memory  # (B, S, D)
    cache = backbone.decoder_cache(config.max_new_tokens)  # start token + all but the last new token
    decoder = CachedDecoder(backbone, project, cache, memory, source_mask, config.cuda_graph)
    start = torch.full((source.size(0) * copies, 1), start_id, dtype=torch.long, device=source.device)
    return decoder, decoder.feed(start, None, torch.zeros_like(start))


def _start_from_prompt(
    backbone: Backbone,
    project: Project,
    prompt: Tensor,
    prompt_mask: Tensor | None,
    copies: int,
    config: GenerationConfig,
) -> tuple[CachedDecoder, Tensor]:
    """Run each left-padded prompt through the decoder once, then give each of its `copies` rows (beams or
    samples) a copy of its cache -> (decoder, first logits (N, V)). The prompt, often far longer than
    what is generated (an article before its summary), is thus computed once, not once per copy."""
    mask = _left_padded(prompt, prompt_mask)  # (B, T) bool
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T): real tokens count from 0, as unpadded
    _check_positions_fit(backbone, int(positions[:, -1].max()) + config.max_new_tokens - 1, config)
    cache = backbone.decoder_cache(prompt.size(1) + config.max_new_tokens - 1)
    decoder = CachedDecoder(backbone, project, cache, cuda_graph=config.cuda_graph)
    logits = decoder.feed(prompt, _hiding(mask), positions)  # (B, V)
    if copies == 1:
        return decoder, logits
    rows = torch.arange(prompt.size(0), device=prompt.device).repeat_interleave(copies)  # (N,)
    decoder.reorder(rows)
    return decoder, logits[rows]


def _left_padded(prompt: Tensor, prompt_mask: Tensor | None) -> Tensor:
    """(B, T) bool mask of real prompt tokens; refuses right padding (new tokens would land after pads)."""
    if prompt_mask is None:
        return torch.ones_like(prompt, dtype=torch.bool)
    mask = prompt_mask.bool()
    if not bool(mask[:, -1].all()) or bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise ValueError(
            "decoder-only generation needs LEFT-padded prompts: padding first, every row ending in a real "
            "token (for an encoder-decoder source, pass start_id)"
        )
    return mask


def _hiding(mask: Tensor | None) -> Tensor | None:
    """A mask that hides nothing, dropped: attention then takes its unmasked kernel for the prompt or
    source and every decoding step. Read once a call (the backbone leaves a GPU mask unread)."""
    return None if mask is None or bool(mask.all()) else mask


def _check_positions_fit(backbone: Backbone, last_position: int, config: GenerationConfig) -> None:
    """Fail before decoding, not midway, when the absolute position table is too short."""
    max_len = backbone.config.max_len
    if backbone.config.absolute_positions and last_position >= max_len:
        raise ValueError(
            f"GenerationConfig.max_new_tokens={config.max_new_tokens} reaches position {last_position}, "
            f"beyond model.backbone.max_len={max_len}; generate fewer tokens or shorten the prompt"
        )


# ------------------------------------------------------------------------------------- greedy, sample


def _greedy_or_sample(decoder: CachedDecoder, logits: Tensor, config: GenerationConfig) -> Tensor:
    """One token per row per step until every row has produced eos or max_new_tokens -> (N, L)."""
    generator = _generator(config.seed, logits.device)
    finished = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)  # (N,)
    columns = []
    for step in range(config.max_new_tokens):
        if config.no_repeat_ngram_size and columns:
            logits = _ban_repeated_ngrams(logits, torch.stack(columns, dim=1), config.no_repeat_ngram_size)
        tokens = _next_tokens(logits, config, generator).masked_fill(finished, config.pad_id)  # (N,)
        columns.append(tokens)
        if config.eos_id is not None:
            finished |= tokens == config.eos_id
            if bool(finished.all()):
                break
        if step + 1 < config.max_new_tokens:
            logits = decoder.step(tokens)
    return torch.stack(columns, dim=1)


def _ban_repeated_ngrams(logits: Tensor, history: Tensor, n: int) -> Tensor:
    """-inf on every token that would repeat an n-gram of its row. logits: (N, V); history: (N, L) -> (N, V)

    The next token completes the n-gram (last n-1 tokens, token); it is banned wherever those n-1 tokens
    occurred before, for the token that followed them then. Batched: all windows of each row compared at
    once. Columns after a row's eos hold pad, and whatever a finished row is banned from is never used.
    """
    if history.size(1) < n:  # no complete n-gram yet
        return logits
    windows = history.unfold(1, n, 1)  # (N, L - n + 1, n): every n-gram so far
    tail = history[:, history.size(1) - n + 1 :]  # (N, n - 1) the n-gram the next token would complete
    seen = (windows[:, :, :-1] == tail[:, None, :]).all(dim=-1)  # (N, L - n + 1)
    hits = torch.zeros_like(logits).scatter_add_(1, windows[:, :, -1], seen.to(logits.dtype))  # (N, V)
    return logits.masked_fill(hits > 0, -math.inf)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _next_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """(N, V) logits -> (N,) tokens: the argmax, or a draw after temperature, top-k and top-p (in that order)."""
    if config.strategy == "greedy":
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k:
        logits = _keep_top_k(logits, config.top_k)
    if config.top_p < 1:
        logits = _keep_nucleus(logits, config.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits below each row's k-th largest become -inf. (N, V) -> (N, V)"""
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def _keep_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter (Holtzman et al., 2020): keep the most likely tokens until they hold top_p of the mass.

    A token stays when the tokens ranked above it hold less than top_p, so the top token always stays.
    (N, V) -> (N, V), the rest -inf.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop = torch.zeros_like(mass_above, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
    return logits.masked_fill(drop, -math.inf)


# ---------------------------------------------------------------------------------------- beam search


class _Hypotheses:
    """The best K finished hypotheses of each row, kept sorted best first.

    tokens (B, K, max_new_tokens) padded after the eos; scores (B, K) length-normalised, -inf in empty slots;
    lengths (B, K) tokens generated, eos included.
    """

    def __init__(
        self, batch: int, beams: int, max_new_tokens: int, pad_id: int, device: torch.device
    ) -> None:
        self.tokens = torch.full((batch, beams, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.scores = torch.full((batch, beams), -math.inf, device=device)
        self.lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)

    def add(self, candidates: Tensor, scores: Tensor, length: int) -> None:
        """candidates: (B, C, max_new_tokens) of `length` tokens; scores: (B, C), -inf for those not finishing."""
        beams = self.scores.size(1)
        merged = torch.cat([self.scores, scores], dim=1)  # (B, K + C)
        self.scores, best = merged.topk(beams, dim=1)  # (B, K)
        tokens = torch.cat([self.tokens, candidates], dim=1)
        self.tokens = tokens.gather(1, best[..., None].expand(-1, -1, tokens.size(-1)))
        lengths = torch.cat([self.lengths, torch.full_like(scores, length, dtype=torch.long)], dim=1)
        self.lengths = lengths.gather(1, best)

    def can_improve(self, best_possible: Tensor) -> Tensor:
        """best_possible: (B,) the highest score a running beam could still reach -> (B,) whether it beats
        the worst kept hypothesis (always, until K are kept)."""
        return best_possible > self.scores[:, -1]

    def best(self, n: int) -> Generation:
        """The n best of each row, cropped to the longest of them."""
        length = int(self.lengths[:, :n].max())
        tokens = self.tokens[:, :n, :length].reshape(-1, length)  # (B * n, L)
        return Generation(tokens, self.scores[:, :n].reshape(-1))


def _beam_search(
    decoder: CachedDecoder, logits: Tensor, config: GenerationConfig, batch_size: int
) -> Generation:
    """Beam search over B * K rows (K = num_beams): each step every beam proposes its continuations,
    the 2K best per row are ranked, those among the top K that end (eos, or the last step) become
    finished hypotheses, and the K best that did not end run on. A row stops taking hypotheses once
    it holds K and no running beam can beat the worst. Log-prob sums only fall as tokens are added,
    so a running beam's best possible score is its sum now, divided by length ** alpha at the most
    favourable length: max_new_tokens when alpha > 0, its current length otherwise. The bound is
    exact, so stopping never changes the result (HF's `early_stopping="never"`; for alpha <= 0 also
    HF's default). Rows that stop keep stepping with the batch until all stop, but take nothing more.
    """
    b, k, steps, alpha = batch_size, config.num_beams, config.max_new_tokens, config.length_penalty
    device = logits.device
    # the K copies of a row are identical at first: only beam 0 is live, or all K would pick the same token
    scores = torch.full((b, k), -math.inf, device=device)  # (B, K) log-prob sums of running beams
    scores[:, 0] = 0.0
    running = torch.full((b, k, steps), config.pad_id, dtype=torch.long, device=device)  # (B, K, steps)
    finished = _Hypotheses(b, k, steps, config.pad_id, device)
    open_rows = torch.ones(b, dtype=torch.bool, device=device)  # (B,) rows still taking hypotheses
    in_top_k = torch.arange(2 * k, device=device) < k  # (2K,)
    for step in range(steps):
        log_probs = logits.float().log_softmax(dim=-1)  # (B * K, V)
        if config.no_repeat_ngram_size and step:
            history = running[:, :, :step].reshape(b * k, step)
            log_probs = _ban_repeated_ngrams(log_probs, history, config.no_repeat_ngram_size)
        log_probs = log_probs.view(b, k, -1).add_(scores[..., None])  # (B, K, V), a fresh tensor
        vocab = log_probs.size(-1)
        # 2K candidates: even if the K best all end here, K unfinished ones are left to run on
        top_scores, flat = log_probs.view(b, -1).topk(2 * k, dim=1)  # (B, 2K)
        parent, token = flat // vocab, flat % vocab  # (B, 2K) beam index, token id
        candidates = running.gather(1, parent[..., None].expand(-1, -1, steps))  # (B, 2K, steps)
        candidates[:, :, step] = token
        ends = _ends(token, config.eos_id, last_step=step + 1 == steps)  # (B, 2K)
        finishing = ends & in_top_k & open_rows[:, None]
        finished.add(
            candidates, (top_scores / (step + 1) ** alpha).masked_fill(~finishing, -math.inf), step + 1
        )

        scores, keep = top_scores.masked_fill(ends, -math.inf).topk(k, dim=1)  # (B, K) best unfinished
        running = candidates.gather(1, keep[..., None].expand(-1, -1, steps))
        bound_length = steps if alpha > 0 else step + 1
        open_rows &= finished.can_improve(scores[:, 0] / bound_length**alpha)
        if step + 1 == steps or not bool(open_rows.any()):
            break
        offsets = torch.arange(b, device=device)[:, None] * k  # (B, 1) first flat row of each source row
        decoder.reorder((parent.gather(1, keep) + offsets).view(-1))
        logits = decoder.step(running[:, :, step].reshape(-1))
    return finished.best(config.num_return_sequences)


def _ends(token: Tensor, eos_id: int | None, last_step: bool) -> Tensor:
    """Which candidates end their hypothesis here: those producing eos, or all of them on the last step."""
    if last_step:
        return torch.ones_like(token, dtype=torch.bool)
    if eos_id is None:
        return torch.zeros_like(token, dtype=torch.bool)
    return token == eos_id
