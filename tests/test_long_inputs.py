"""Long inputs: LSH attention, reversible layers and chunked feed-forward (modules/lsh_attention.py,
modules/reversible.py), each checked against a plain computation of the same thing."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules import lsh_attention
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.lsh_attention import EVAL_ROTATION_SEED, LSHSelfAttention, bucket_factors, hash_buckets
from modules.reversible import run_layers, run_reversible
from modules.sharding import shard_blocks
from tasks.mlm_nsp import MaskedLMNextSentence


def lsh_layer(causal: bool = False, n_hashes: int = 1, bucket_size: int = 64) -> LSHSelfAttention:
    torch.manual_seed(0)
    layer = LSHSelfAttention(
        16,
        2,
        8,
        bias=True,
        dropout=0.0,
        scale=True,
        causal=causal,
        n_hashes=n_hashes,
        bucket_size=bucket_size,
    )
    return layer.double().eval()


def shared_qk_reference(layer: LSHSelfAttention, x, key_mask=None, causal=False):
    """Full shared-QK attention written out: every query scores every unit-normalised key; itself
    only when nothing else is open; padding and (causal) the future closed. (B, T, D) -> (B, T, D)"""
    b, t, _ = x.shape
    qk, v = layer.qkv(x).chunk(2, dim=-1)
    qk, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in (qk, v))  # (B, H, T, Dh)
    scores = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) / 8**0.5  # (B, H, T, T)
    open_ = torch.ones(b, 1, t, t, dtype=torch.bool)
    if key_mask is not None:
        open_ &= key_mask.bool()[:, None, None, :]
    if causal:
        open_ &= torch.ones(t, t, dtype=torch.bool).tril()
    itself = torch.eye(t, dtype=torch.bool)
    others = open_ & ~itself
    alone = ~others.any(-1, keepdim=True)
    weights = torch.where(others | (itself & alone), scores, float("-inf")).softmax(-1)
    return layer.out((weights @ v).transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_with_one_hash_and_one_bucket_equals_full_shared_qk_attention(causal):
    layer = lsh_layer(causal=causal, n_hashes=1, bucket_size=64)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, 29:] = False
    with torch.no_grad():
        got = layer(x, key_mask=key_mask)
        want = shared_qk_reference(layer, x, key_mask, causal)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1, :29], want[1, :29], rtol=1e-10, atol=1e-10)


def brute_force_lsh(layer: LSHSelfAttention, x, causal: bool):
    """LSH attention by loops: for each round and query, the keys of its bucket that sit in its own
    chunk or the one before of that round's (bucket, position) order; rounds combined by their
    log-sum-exp, where a round that found no other key counts only if no round did. (1, T, D) -> (1, T, D)"""
    _, t, _ = x.shape
    c, rounds = layer.bucket_size, layer.n_hashes
    qk, v = layer.qkv(x).chunk(2, dim=-1)
    qk, v = (z.view(1, t, 2, 8).transpose(1, 2)[0] for z in (qk, v))  # (H, T, Dh)
    generator = torch.Generator().manual_seed(EVAL_ROTATION_SEED)
    buckets = hash_buckets(qk[None], bucket_factors(t // c), rounds, generator)[0]  # (H, rounds, T)
    out = torch.zeros(2, t, 8, dtype=x.dtype)
    for h in range(2):
        round_outputs, round_lse = [], []
        for r in range(rounds):
            order = sorted(range(t), key=lambda i: (int(buckets[h, r, i]), i))
            rank = {p: k for k, p in enumerate(order)}
            outputs, lses = torch.zeros(t, 8, dtype=x.dtype), torch.zeros(t, dtype=x.dtype)
            for i in range(t):
                chunk = rank[i] // c
                window = set(order[chunk * c : (chunk + 1) * c]) | set(
                    order[((chunk - 1) % (t // c)) * c : ((chunk - 1) % (t // c) + 1) * c]
                )
                keys = [j for j in window if buckets[h, r, j] == buckets[h, r, i] and not (causal and j > i)]
                others = [j for j in keys if j != i]
                if not others:  # alone: itself, in a round that counts only if every round is alone
                    lses[i], outputs[i] = torch.finfo(x.dtype).min / 2, v[h, i]
                    continue
                scores = torch.stack([qk[h, i] @ F.normalize(qk[h, j], dim=0) / 8**0.5 for j in others])
                lses[i] = scores.logsumexp(0)
                outputs[i] = (scores - lses[i]).exp() @ v[h, others]
            round_outputs.append(outputs)
            round_lse.append(lses)
        share = torch.stack(round_lse).softmax(0)[..., None]  # (rounds, T, 1)
        out[h] = (torch.stack(round_outputs) * share).sum(0)
    return layer.out(out.transpose(0, 1).reshape(1, t, 16))


@pytest.mark.parametrize("factorised", [False, True], ids=["one-hash", "two-factor-hash"])
@pytest.mark.parametrize("causal", [False, True])
def test_lsh_attends_within_buckets_as_a_brute_force_loop_does(causal, factorised, monkeypatch):
    if factorised:  # 6 chunks: 6 buckets hashed as 4 x 2
        monkeypatch.setattr(lsh_attention, "FACTORISE_ABOVE", 4)
        assert bucket_factors(6) == (4, 2)
    layer = lsh_layer(causal=causal, n_hashes=2, bucket_size=4)
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), brute_force_lsh(layer, x, causal), rtol=1e-9, atol=1e-9)


def test_lsh_gives_the_same_answer_every_time_in_evaluation_and_new_buckets_in_training():
    layer = lsh_layer(n_hashes=2, bucket_size=4)
    x = torch.randn(1, 32, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
        layer.train()
        assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_attending_a_slice_of_chunks_at_a_time_gives_the_same_outputs_and_gradients(causal, monkeypatch):
    """Long inputs are attended slice by slice, each recomputed in the backward pass. In float64 with
    padding and packed documents: without dropout the outputs and every gradient equal one whole
    pass; with dropout (drawn slice by slice) the recomputation replays the masks, so the gradients
    equal those of keeping every slice's scores."""
    layer = lsh_layer(causal=causal, n_hashes=3, bucket_size=4).train()
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[1, 23:] = False
    documents = (torch.arange(30) >= 11).long().repeat(2, 1)  # (B, T) two documents per row

    def run() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(5)  # the same rotations (and dropout masks) in every run
        out = layer(x, key_mask=key_mask, documents=documents)
        out.pow(2).sum().backward()
        grads = (x.grad.clone(), *(p.grad.clone() for p in layer.parameters()))
        layer.zero_grad()
        x.grad = None
        return out.detach(), *grads

    def assert_same(got: tuple, want: tuple) -> None:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    whole = run()
    chunks = 3 * 8  # rounds x chunks of 4 over 30 positions padded to 32
    monkeypatch.setattr(lsh_attention, "SLICE_SCORES", 2 * 2 * 4 * 8 * 5)  # 5 chunks a slice
    assert chunks > 5 and chunks % 5  # several slices, the last one short
    assert_same(run(), whole)

    layer.dropout = 0.2
    recomputed = run()
    monkeypatch.setattr(lsh_attention, "checkpoint", lambda f, *args, **_: f(*args))  # keep every slice
    assert_same(recomputed, run())
    assert not torch.equal(recomputed[0], whole[0])  # dropout did drop


def test_bucket_counts_are_even_and_split_in_two_near_their_square_root_when_many():
    for n_chunks in range(1, 5000):
        factors = bucket_factors(n_chunks)
        wanted = 1 if n_chunks == 1 else n_chunks + n_chunks % 2
        if wanted <= lsh_attention.FACTORISE_ABOVE:
            assert factors == (wanted,)
            continue
        first, second = factors
        assert first % 2 == 0 and second % 2 == 0
        assert wanted <= first * second < wanted + 2 * first + 4  # covers it, with little to spare
        assert max(factors) <= 2 * math.sqrt(wanted) + 2  # each near the square root


def test_hashing_a_slice_at_a_time_gives_argmax_over_every_direction_and_its_opposite(monkeypatch):
    """Against the definition: the same rotations, argmax([xR, -xR]) over all positions at once,
    the factors' buckets combined as digits (first factor most significant)."""
    vectors = torch.randn(2, 3, 50, 8, dtype=torch.float64)
    factors = (6, 4)
    generator = torch.Generator().manual_seed(3)
    rotations = [torch.randn(8, 2, f // 2, dtype=torch.float64, generator=generator) for f in factors]
    want = torch.zeros(2, 3, 2, 50, dtype=torch.long)
    for factor, rotation in zip(factors, rotations, strict=True):
        rotated = torch.einsum("bhtd,dnr->bhntr", vectors, rotation)
        want = want * factor + torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    monkeypatch.setattr(lsh_attention, "HASH_SLICE", 2 * 3 * 2 * 3 * 7)  # 7 positions a slice
    got = hash_buckets(vectors, factors, 2, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert set(got.unique().tolist()) <= set(range(24)) and len(got.unique()) > 6


def long_config(**changes) -> BackboneConfig:
    values = dict(
        vocab_size=50, d_model=16, n_heads=2, d_ff=32, max_len=64, norm="pre", embedding_norm=False,
        attention="lsh", lsh_n_hashes=2, lsh_bucket_size=4, dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip
    return BackboneConfig(**(values | changes))


def parameter_grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "attention, layout",
    [
        ("lsh", {}),
        ("full", {}),
        ("full", {"position": "rotary", "n_kv_heads": 1}),
        ("full", {"position": "rotary", "bias": False, "qkv_bias": True, "qk_norm": True}),
    ],
    ids=["lsh", "full", "full-rotary-grouped", "full-rotary-qk-norm"],
)
def test_reversible_layers_give_the_outputs_and_gradients_of_storing_every_activation(attention, layout):
    """The reversible backward (rebuild inputs, recompute, replay dropout and hashing) against plain
    autograd through the same reversible updates, in float64 with dropout on."""
    torch.manual_seed(0)
    config = long_config(attention=attention, reversible=True, ff_chunks=3, **layout)
    backbone = Backbone(config).double().train()
    layers = backbone.encoder.layers
    x = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, 15:] = False
    args = (None, False, key_mask, None, None)
    if attention == "full":
        bias = backbone.encoder._self_attention_bias(20, 20, key_mask, x, None)[0]
        rotation = backbone.encoder.rotary(torch.arange(20)) if backbone.encoder.rotary is not None else None
        args = (bias, False, key_mask, None, rotation)

    torch.manual_seed(1)
    stored = sum(run_layers(layers, x, args)) / 2
    stored.pow(2).sum().backward()
    want_x, want = x.grad.clone(), parameter_grads(layers)
    backbone.zero_grad()
    x.grad = None

    torch.manual_seed(1)
    recomputed = run_reversible(layers, x, args)
    recomputed.pow(2).sum().backward()
    torch.testing.assert_close(recomputed, stored, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-9, atol=1e-10)
    got = parameter_grads(layers)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=name)


def test_lsh_layers_bias_queries_keys_and_values_as_qkv_bias_says():
    """qkv_bias (Qwen2's q/k/v biases without others) holds for LSH's shared query-key projection too."""
    attention = Backbone(long_config(bias=False, qkv_bias=True)).encoder.layers[0].self_attn
    assert attention.qkv.bias is not None and attention.out.bias is None


def test_reversible_layers_train_a_backbone_whose_embeddings_are_frozen():
    """Autograd calls a node's backward only when an input needs a gradient; the layers must still
    get theirs when the embeddings below them are frozen."""
    backbone = Backbone(long_config(reversible=True))
    backbone.embeddings.requires_grad_(False)
    backbone.encode(torch.randint(5, 50, (2, 12))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.encoder.parameters())


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_chunked_feed_forward_equals_unchunked(norm):
    torch.manual_seed(0)
    plain = Backbone(long_config(attention="full", norm=norm, ff_chunks=1)).double().eval()
    chunked = Backbone(long_config(attention="full", norm=norm, ff_chunks=4)).double().eval()
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(5, 50, (2, 19))
    outputs = [model.encode(ids) for model in (plain, chunked)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    for out in outputs:
        out.pow(2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)


def activation_bytes(backbone: Backbone, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps from the forward pass for the backward pass, parameters
    not counted (they are memory with or without activations)."""
    parameters = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = backbone.encode(ids)
    out.sum().backward()
    return sum(kept.values())


def test_reversible_activation_memory_grows_less_with_depth_than_a_plain_stack():
    ids = torch.randint(5, 50, (2, 64))
    growth = {}
    for reversible in (False, True):
        shallow, deep = (
            activation_bytes(Backbone(long_config(encoder_layers=n, reversible=reversible, max_len=64)), ids)
            for n in (2, 8)
        )
        growth[reversible] = deep - shallow
    assert growth[False] > 0
    assert growth[True] < 0.05 * growth[False], growth


def test_lsh_decoder_decodes_with_a_cache_as_it_runs_whole_sequences_when_one_bucket_holds_them():
    """Cached decoding scores every cached key; a sequence within one bucket gets the same in training."""
    config = long_config(encoder_layers=0, decoder_layers=2, reversible=True, lsh_bucket_size=32, dropout=0.0)
    backbone = Backbone(config).eval()
    ids = torch.randint(5, 50, (2, 20))
    with torch.no_grad():
        whole = backbone.decode(ids)
        cache = backbone.decoder_cache(20)
        steps = [backbone.decode(ids[:, :8], cache=cache)]
        steps += [backbone.decode(ids[:, i : i + 1], cache=cache) for i in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(position="relative"), "position"),
        (dict(attention=["lsh", "full", "full"]), "attention"),
        (dict(attention="full", reversible=True, norm="post"), "reversible"),
        (dict(lsh_bucket_size=0), "lsh_bucket_size"),
        (dict(ff_chunks=0), "ff_chunks"),
    ],
)
def test_long_input_options_that_cannot_work_are_refused_with_the_key_named(changes, named):
    with pytest.raises(UserError, match=named):
        long_config(encoder_layers=2, **changes)


def test_mlm_and_nsp_learn_a_batch_on_reversible_lsh_layers(documents):
    """BERT pre-training on LSH attention (several buckets per input) with reversible layers and a
    chunked feed-forward: the summed loss of one batch falls as on the plain backbone."""
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    tokenizer = Tokenizer.train(lines, TokenizerConfig(vocab_size=800), "seed corpus")
    task = MaskedLMNextSentence(max_length=64, dupe_factor=1)
    tokenized = datasets.Dataset.from_dict({"text": [d["text"] for d in documents]}).map(
        lambda b: task.tokenize(b, tokenizer), batched=True
    )
    pairs = task.build_examples(tokenized, tokenizer, "train", seed=0)
    torch.manual_seed(0)
    config = long_config(
        vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, d_ff=128, encoder_layers=2, max_len=64,
        lsh_bucket_size=8, reversible=True, ff_chunks=2, dropout=0.0, attention_dropout=0.0, embedding_norm=True,
    )  # fmt: skip
    backbone, head = Backbone(config), task.build_head(config)
    batch = task.collate([pairs[i] for i in range(8)], list(range(8)), tokenizer)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3)
    losses = []
    for _ in range(120):
        loss = task.loss(task.forward(backbone, head, batch), batch)["loss"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] > 5.0
    assert min(losses[-5:]) < 0.3, f"MLM+NSP loss only fell from {losses[0]:.2f} to {losses[-1]:.3f}"


def test_fully_sharded_training_refuses_reversible_layers_with_a_message():
    model = torch.nn.Module()
    model.backbone = Backbone(long_config(reversible=True))
    with pytest.raises(UserError, match="strategy ddp"):
        shard_blocks(model, mesh=None)
