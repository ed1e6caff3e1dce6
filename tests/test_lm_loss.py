"""linear_cross_entropy computes what F.cross_entropy(F.linear(...)) computes, loss and gradients,
a chunk of rows at a time, without the (N, V) logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modules import lm_loss
from modules.lm_loss import linear_cross_entropy


def inputs(dtype=torch.float64, rows=37, width=16, vocab=50):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=generator, dtype=dtype).requires_grad_()  # (N, D)
    weight = torch.randn(vocab, width, generator=generator, dtype=dtype).requires_grad_()  # (V, D)
    targets = torch.randint(vocab, (rows,), generator=generator)  # (N,)
    return hidden, weight, targets


def plain(hidden, weight, targets, scale, smoothing):
    logits = F.linear(hidden * scale, weight)  # (N, V)
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, label_smoothing=smoothing
    )


def loss_and_grads(loss_fn, hidden, weight, targets, scale, smoothing):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets, scale, smoothing)
    (3.0 * loss).backward()  # an incoming gradient other than 1
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("scale, smoothing", [(1.0, 0.0), (0.25, 0.1)])
def test_loss_and_gradients_equal_the_plain_computation_over_several_chunks(monkeypatch, scale, smoothing):
    monkeypatch.setattr(lm_loss, "CHUNK_ROWS", 8)  # 37 rows: four full chunks and a partial one
    hidden, weight, targets = inputs()
    expected = loss_and_grads(plain, hidden, weight, targets, scale, smoothing)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, scale, smoothing)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-10, atol=1e-12)


def test_a_frozen_projection_gets_no_gradient_and_evaluation_computes_the_loss_only(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ROWS", 8)
    hidden, weight, targets = inputs()
    weight.requires_grad_(False)  # a frozen LM head, as under LoRA
    _, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets, 1.0, 0.0)
    assert grad_weight is None
    torch.testing.assert_close(grad_hidden, loss_and_grads(plain, hidden, weight, targets, 1.0, 0.0)[1])
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain(hidden, weight, targets, 1.0, 0.0).detach())


def test_under_autocast_the_products_take_its_dtype_as_the_plain_computation_does():
    hidden, weight, targets = inputs(torch.float32, rows=64, width=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(plain, hidden, weight, targets, 1.0, 0.0)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, 1.0, 0.0)
    exact = loss_and_grads(plain, hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(), targets, 1.0, 0.0)  # fmt: skip
    for ours, theirs, truth in zip(got, expected, exact, strict=True):
        assert ours.dtype == theirs.dtype == torch.float32
        # both carry bf16 rounding, to the same order, and neither is the float64 value exactly
        ours_error = (ours.double() - truth).norm() / truth.norm()
        theirs_error = (theirs.double() - truth).norm() / truth.norm()
        assert 0 < ours_error < 3 * theirs_error + 1e-6 and ours_error < 0.02


def test_under_float16_the_plain_computation_runs_where_the_loss_scale_protects_its_gradients():
    hidden, weight, targets = inputs(torch.float32, rows=64, width=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.float16):
        expected = loss_and_grads(plain, hidden, weight, targets, 0.5, 0.1)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, 0.5, 0.1)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
