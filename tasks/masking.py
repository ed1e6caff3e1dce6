"""BERT's masked-LM rule and what scores it, shared by every masked-LM task (mlm_nsp.py, mlm.py).

Of the non-special tokens a share (15%) is selected; of those 80% become [MASK], 10% a random text
token, 10% stay as they are, and the model predicts the original token at every selected position.
One copy of the rule, so the tasks mask alike and their losses can be compared.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from datamodules.tokenizer import Tokenizer
from modules.errors import UserError

IGNORE = -100
"""Label of a position the loss skips (cross-entropy's ignore_index)."""


def check_masking_rates(mlm_probability: float, mask_fraction: float, random_fraction: float) -> None:
    """Refuse rates that select nothing, everything, or more replacements than selected tokens."""
    if not 0 < mlm_probability < 1 or mask_fraction + random_fraction > 1:
        raise UserError("need 0 < mlm_probability < 1 and mask_fraction + random_fraction <= 1")


def mask_tokens(
    ids: Tensor,
    generator: torch.Generator,
    tokenizer: Tokenizer,
    mlm_probability: float,
    mask_fraction: float,
    random_fraction: float,
) -> tuple[Tensor, Tensor]:
    """(L,) ids -> (masked input (L,), labels (L,) with IGNORE at unselected positions). Special tokens
    are never selected; an input with a text token always gets at least one selected, so every input
    teaches something. Random replacements are drawn from the tokenizer's text pieces."""
    candidate = ~tokenizer.is_special(ids)
    selected = (torch.rand(ids.shape, generator=generator) < mlm_probability) & candidate
    if not selected.any() and candidate.any():
        options = candidate.nonzero().flatten()
        selected[options[torch.randint(len(options), (1,), generator=generator)]] = True
    action = torch.rand(ids.shape, generator=generator)
    choices = tokenizer.replacement_ids
    random_ids = choices[torch.randint(len(choices), ids.shape, generator=generator)]
    masked = ids.clone()
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    masked[to_mask] = tokenizer.mask_id
    masked[to_random] = random_ids[to_random]
    return masked, torch.where(selected, ids, IGNORE)


def unigram_log_probs(tokens: np.ndarray, vocab_size: int) -> Tensor:
    """(n,) training tokens -> (V,) add-one smoothed log frequencies: the trivial baseline a masked-LM
    must beat, guessing every masked token from how common it is, blind to its context."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def unigram_scores(log_probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(V,) unigram log frequencies, (N,) masked targets -> the baseline's (loss, accuracy): its
    cross-entropy, and how often the most frequent token is the answer."""
    log_probs = log_probs.to(targets.device)
    return -log_probs[targets].mean(), (targets == log_probs.argmax()).float().mean()


def masked_token_records(labels: Tensor, logits: Tensor, tokenizer: Tokenizer) -> list[list[dict]]:
    """labels (R, T) with IGNORE at unmasked positions, logits (N, V) of the masked positions row by
    row -> per row, the model's guess at each masked token (what `polyhead predict` shows)."""
    guesses = iter(logits.argmax(-1).tolist())
    records = []
    for row in labels:
        masked = []
        for position in (row != IGNORE).nonzero().flatten().tolist():
            target, guess = int(row[position]), next(guesses)
            masked.append(
                {
                    "position": position,
                    "target": tokenizer.id_to_piece([target])[0],
                    "predicted": tokenizer.id_to_piece([guess])[0],
                    "correct": target == guess,
                }
            )
        records.append(masked)
    return records
