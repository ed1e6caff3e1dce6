"""The CPU dropout of modules/dropout.py: the rate, the scale, independence, gradients, and that the
attention that uses it in training is still unbiased attention."""

import math

import pytest
import torch

from modules.attention import MultiHeadAttention
from modules.dropout import HALF_WORDS, Dropout, dropout, relu_dropout


@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
def test_drop_rate_and_scale(p):
    """Over 2^22 elements the dropped share is p within 5 standard errors; kept elements carry
    1 / (1 - p), so the mean of the output is the input's."""
    torch.manual_seed(0)
    n = 1 << 22
    y = dropout(torch.ones(n), p, training=True)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / HALF_WORDS
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4)
    assert abs(y.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)


def test_neighbours_are_independent():
    """Four elements share one 64-bit draw: whether element i is kept says nothing about i + 1..3."""
    torch.manual_seed(1)
    p, n = 0.3, 1 << 22
    kept = (dropout(torch.ones(n), p, training=True) != 0).double()
    for lag in (1, 2, 3, 4):
        both = (kept[:-lag] * kept[lag:]).mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    kept = (y != 0).float()
    assert torch.allclose(x.grad, upstream * kept / 0.75)
    assert torch.allclose(y, x.detach() * kept / 0.75)


def test_same_seed_same_mask_and_eval_is_identity():
    x = torch.randn(8, 50)
    torch.manual_seed(3)
    first = dropout(x, 0.5, training=True)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.5, training=True))
    assert not torch.equal(first, dropout(x, 0.5, training=True))  # the generator moved on
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert dropout(x, 0.0, training=True) is x


def test_training_attention_with_dropout_is_unbiased():
    """On the CPU, attention in training with dropout is written out with this dropout: averaged over
    many draws it is the attention of eval mode (dropout keeps each weight's expectation)."""
    torch.manual_seed(4)
    attention = MultiHeadAttention(d_model=8, n_heads=2, head_dim=4, bias=True, dropout=0.5, scale=True)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = attention.eval()(x)
        attention.train()
        draws = torch.stack([attention(x) for _ in range(4000)])
    assert not torch.allclose(draws[0], expected, atol=1e-3)
    assert torch.allclose(draws.mean(0), expected, atol=0.03)


def test_relu_dropout_is_dropout_of_relu():
    """The fused ReLU + dropout of T5's feed-forward block: the same values and gradients as
    dropout(relu(x)) drawn from the same seed."""
    x = torch.randn(16, 7, 40, requires_grad=True)
    upstream = torch.randn_like(x)
    torch.manual_seed(5)
    fused = relu_dropout(x, 0.2, training=True)
    (fused_grad,) = torch.autograd.grad(fused, x, upstream)
    torch.manual_seed(5)
    plain = dropout(torch.relu(x), 0.2, training=True)
    (plain_grad,) = torch.autograd.grad(plain, x, upstream)
    assert torch.equal(fused, plain) and torch.equal(fused_grad, plain_grad)
    assert (plain == 0).float().mean() > 0.55  # both masks at work: about 1 - 0.5 * 0.8
    assert torch.equal(relu_dropout(x, 0.2, training=False), torch.relu(x))
