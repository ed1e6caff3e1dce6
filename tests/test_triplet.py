"""Sentence embeddings: P x K batches, inputs and their errors, retrieval metrics against a brute-force
reference, offline mining, gradients reaching the backbone, and a short real STS-B run that learns."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.mixture import MixtureBatchSampler
from datamodules.sources import DataSource, load_split
from datamodules.tokenizer import Tokenizer, TokenizerConfig
from experiments.cli import run
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.losses import MINERS, triplet_margin_loss
from modules.model import MultiTaskModel
from tasks.metrics import EmbeddingRetrieval
from tasks.mining import mine_negatives
from tasks.sentences import split_sentences
from tasks.triplet import SentenceEmbedding, pair_rows

from .conftest import ROOT, SHARED_DATA

STSB = SHARED_DATA / "stsb"
CONFIGS = ROOT / "experiments" / "configs"


@pytest.fixture(scope="module")
def tokenizer(documents) -> Tokenizer:
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=1200), "seed corpus")


def build(task: SentenceEmbedding, columns: dict, tokenizer: Tokenizer, split: str = "train"):
    tokenized = datasets.Dataset.from_dict(columns).map(lambda b: task.tokenize(b, tokenizer), batched=True)
    return task.build_examples(tokenized, tokenizer, split, seed=0)


def labelled_sentences(documents, n_docs=12, per_doc=None):
    """Sentences labelled by their document: groups of different sizes."""
    texts, labels = [], []
    for d, doc in enumerate(documents[:n_docs]):
        sentences = split_sentences(doc["text"])[: per_doc or 2 + d % 4]
        texts += sentences
        labels += [doc["title"]] * len(sentences)
    return {"text": texts, "label": labels}


def test_pxk_batches_hold_p_groups_of_k_and_an_epoch_covers_every_text(documents, tokenizer):
    k, p = 3, 4
    task = SentenceEmbedding(input="labelled", samples_per_group=k)
    pool = build(task, labelled_sentences(documents), tokenizer)
    sampler = MixtureBatchSampler({"t": len(pool)}, {"t": 1.0}, batch_size=p, seed=1)
    seen = set()
    for batch in sampler:
        chunks = [pool[index] for _, index, _ in batch]
        collated = task.collate(chunks, [seed for _, _, seed in batch], tokenizer)
        labels = collated["labels"]
        assert len(labels) == p * k  # no hard negatives given: members only
        blocks = labels.view(p, k)
        assert (blocks == blocks[:, :1]).all(), "a chunk mixes groups"
        assert all((labels == label).sum() >= k for label in labels), "an anchor lacks K-1 positives"
        seen.update(int(t) for _, index, _ in batch for t in pool.chunks[index])
    grouped = set(np.flatnonzero(pool.group >= 0).tolist())
    # one pass over the chunks is an epoch; the sampler's epoch drops the last partial batch only
    missed = grouped - seen
    assert len(missed) <= k * (len(pool) % p), missed


def test_pairs_become_connected_groups_and_scores_gate_positives(tokenizer):
    task = SentenceEmbedding(input="pairs", threshold=4.0, score_range=(0.0, 5.0))
    columns = {
        "sentence1": ["a red kite flies", "the kite is red", "rain falls today", "a red kite flies"],
        "sentence2": ["the kite is red", "a kite that is red", "sun shines today", "bees make honey"],
        "score": [4.5, 4.0, 1.0, 3.9],
    }
    pool = build(task, columns, tokenizer)
    ids = {text: i for i, text in enumerate(columns["sentence1"] + columns["sentence2"])}
    group_of = {text: pool.group[pool.texts.add(tokenizer.encode([text])[0])] for text in ids}
    assert group_of["a red kite flies"] == group_of["the kite is red"] == group_of["a kite that is red"] >= 0
    assert group_of["rain falls today"] == group_of["sun shines today"] == group_of["bees make honey"] == -1
    assert pool.n_groups == 1


def test_triplets_input_brings_the_given_negative(tokenizer):
    task = SentenceEmbedding(input="triplets")
    columns = {
        "anchor": ["cats purr softly"],
        "positive": ["a cat purrs"],
        "negative": ["ships sail at dawn"],
    }
    pool = build(task, columns, tokenizer)
    batch = task.collate([pool[0]], [0], tokenizer)
    assert len(batch["labels"]) == 3 and batch["labels"][0] == batch["labels"][1] != batch["labels"][2]
    decoded = tokenizer.decode(batch["input_ids"][2][batch["attention_mask"][2].bool()][1:-1].tolist())
    assert decoded == "ships sail at dawn"


def test_bad_inputs_have_clear_messages(tokenizer, tmp_path):
    with pytest.raises(UserError, match="label 'lonely' has a single distinct text"):
        build(
            SentenceEmbedding(input="labelled"),
            {"text": ["a b", "a b", "c d", "e f"], "label": ["lonely", "lonely", "x", "x"]},
            tokenizer,
        )
    with pytest.raises(UserError, match=r"row 2: score 7.0 is outside score_range \[0.0, 5.0\]"):
        build(
            SentenceEmbedding(score_range=(0.0, 5.0)),
            {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [4.0, 7.0]},
            tokenizer,
        )
    with pytest.raises(UserError, match="threshold 6.0 lies outside score_range"):
        SentenceEmbedding(threshold=6.0, score_range=(0.0, 5.0))
    with pytest.raises(UserError, match="SentenceEmbedding.loss must be one of"):
        SentenceEmbedding(loss="hardest")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('4.0\tA "quoted" cat.\tA cat.\n3.0\t\tAn empty first text.\n')
    source = DataSource(
        path=str(tsv), holdout_every=2, quoting=False, column_names=["score", "sentence1", "sentence2"]
    )
    with pytest.raises(UserError, match=r"pairs.tsv, line 2: field 'sentence1' is empty"):
        load_split(source, ("sentence1", "sentence2"), "train", "data.sources.t", ("score",))


def test_headerless_unquoted_tsv_keeps_quotes_and_ignores_extra_fields(tmp_path):
    tsv = tmp_path / "sts.tsv"
    tsv.write_text('g\t4.0\tHe said "hi".\tHe greeted.\textra\tfields\ng\t1.0\tOne.\tTwo.\n' * 2)
    source = DataSource(
        path=str(tsv),
        validation_path=str(tsv),
        quoting=False,
        column_names=["genre", "score", "sentence1", "sentence2"],
    )
    rows = load_split(source, ("sentence1", "sentence2"), "train", "data.sources.t", ("score",))
    assert rows["sentence1"][0] == 'He said "hi".' and rows["score"] == [4.0, 1.0, 4.0, 1.0]


def peer_style_retrieval(queries, gold, corpus):
    """Brute force, one query at a time: rank = 1 + corpus items scoring strictly above the gold."""
    ranks = []
    for q, g in zip(queries, gold, strict=True):
        scores = [float(F.cosine_similarity(q, c, dim=0)) for c in corpus]
        ranks.append(1 + sum(s > scores[g] for s in scores))
    ranks = np.array(ranks)
    return {
        "recall@1": np.mean(ranks == 1),
        "recall@5": np.mean(ranks <= 5),
        "mrr@10": np.mean(np.where(ranks <= 10, 1 / ranks, 0)),
    }


def test_retrieval_matches_a_brute_force_reference():
    torch.manual_seed(0)
    corpus = torch.randn(40, 6)
    gold = torch.randint(0, 40, (25,))
    queries = corpus[gold] + 0.8 * torch.randn(25, 6)
    metric = EmbeddingRetrieval()
    # the corpus arrives in pieces and with duplicates (the same text in two pairs), as from batches
    metric.update(
        queries[:10], gold[:10], torch.full((10,), -1), corpus[:30], torch.arange(30), torch.arange(30)
    )
    metric.update(
        queries[10:],
        gold[10:],
        torch.full((15,), -1),
        corpus[20:],
        torch.arange(20, 40),
        torch.arange(20, 40),
    )
    scores = metric.compute()
    reference = peer_style_retrieval(queries, gold.tolist(), corpus)
    for name, value in reference.items():
        assert scores[name].item() == pytest.approx(value, abs=1e-6), name


def test_labelled_retrieval_excludes_the_query_itself():
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # text 4 looks like label 0 but is label 1
    ids = torch.arange(5)
    metric = EmbeddingRetrieval()
    metric.update(embeddings, labels, ids, embeddings, labels, ids)
    scores = metric.compute()
    # ranks by hand (angles 0, 6.3, 90, 83.7, 3 degrees): query 0 -> text 4 beats 1: rank 2; query 1 ->
    # 4 beats 0: rank 2; 2 -> 3 first: rank 1; 3 -> 2 first: rank 1; 4 -> 0 and 1 beat its best (3): rank 3
    assert scores["recall@1"].item() == pytest.approx(2 / 5)
    assert scores["mrr@10"].item() == pytest.approx((1 / 2 + 1 / 2 + 1 + 1 + 1 / 3) / 5)


def test_pair_rows_pairs_every_label_in_order():
    anchors, positives = pair_rows(torch.tensor([5, 3, 5, 3, 5, 9, 3, 3]))
    pairs = sorted(zip(anchors.tolist(), positives.tolist(), strict=True))
    assert pairs == [(0, 2), (1, 3), (6, 7)]  # row 4 (third 5) and row 5 (lone 9) stay negatives


@pytest.mark.parametrize("miner", sorted(MINERS))
def test_loss_is_zero_when_every_triplet_meets_the_margin(miner):
    labels = torch.arange(4).repeat_interleave(2)
    embeddings = torch.eye(4).repeat_interleave(2, dim=0)  # positives identical, negatives orthogonal
    loss, _ = triplet_margin_loss(embeddings, labels, miner, margin=0.5, metric="cosine")
    assert loss.item() == 0.0
    loss, _ = triplet_margin_loss(embeddings, labels, miner, margin=1.5, metric="cosine")
    assert loss.item() > 0, "the margin is larger than any gap here"


def tiny_model(task: SentenceEmbedding, tokenizer: Tokenizer) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = BackboneConfig(
        d_model=32, n_heads=2, d_ff=64, encoder_layers=1, max_len=64, dropout=0.0, attention_dropout=0.0
    )
    return MultiTaskModel({"t": task}, backbone, tokenizer=tokenizer)


@pytest.mark.parametrize("loss", ["batch_hard", "semi_hard", "batch_all", "random", "in_batch_negatives"])
def test_gradients_reach_the_backbone(documents, tokenizer, loss):
    task = SentenceEmbedding(input="labelled", loss=loss, margin=0.5, max_length=64)
    pool = build(task, labelled_sentences(documents), tokenizer)
    model = tiny_model(task, tokenizer)
    batch = task.collate([pool[i] for i in range(6)], list(range(6)), tokenizer) | {"task": "t"}
    out = task.loss(model(batch), batch)
    assert out["loss"] > 0
    out["loss"].backward()
    grads = [p.grad for p in model.backbone.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_offline_mining_attaches_the_nearest_non_positives(documents, tokenizer):
    task = SentenceEmbedding(input="labelled", mined_negatives=2, mining_skip=1, max_length=64)
    pool = build(task, labelled_sentences(documents, n_docs=6, per_doc=3), tokenizer)
    model = tiny_model(task, tokenizer).eval()
    mine_negatives(model, "t", pool, task._pad, task.mined_negatives, task.mining_skip)
    # reference: every text embedded alone (no padding), all similarities, ranks 2-3 of the non-positives
    with torch.no_grad():
        alone = []
        for text in pool.texts.texts:
            ids, mask = task._pad([text], tokenizer)
            alone.append(model.heads["t"](model.backbone.encode(ids, mask), mask)[0])
    embeddings = torch.stack(alone)
    for text in np.flatnonzero(pool.group >= 0):
        scores = embeddings[text] @ embeddings.T
        candidates = [j for j in range(len(scores)) if pool.group[j] != pool.group[text]]
        ranked = sorted(candidates, key=lambda j: -scores[j].item())
        assert pool.mined[text].tolist() == ranked[1:3]
        assert set(pool.negatives(int(text))) == set(ranked[1:3])
    batch = task.collate([pool[0]], [0], tokenizer)
    assert len(batch["labels"]) == task.samples_per_group + 1, "a chunk brings one mined negative"


def test_predict_records_hold_unit_embeddings(documents, tokenizer):
    task = SentenceEmbedding(input="pairs", max_length=64)
    rows = build(task, {"text": ["first text here", "second one"]}, tokenizer, split="predict")
    model = tiny_model(task, tokenizer).eval()
    batch = task.collate([rows[0], rows[1]], [0, 0], tokenizer) | {"task": "t"}
    records = task.predict(model(batch), batch, tokenizer)
    assert [r["text"] for r in records] == ["first text here", "second one"]
    assert all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4 and len(r["embedding"]) == 32 for r in records)


@pytest.mark.skipif(not STSB.exists(), reason="needs ../shared/data/stsb (real data)")
def test_short_stsb_run_beats_the_untrained_model(tmp_path):
    small = [
        "--config", str(CONFIGS / "siamese_stsb.yaml"),
        "--config", str(CONFIGS / "local" / "stsb.yaml"),
        "--data.sources.triplet.path", str(STSB / "sts-train.csv"),
        "--data.sources.triplet.validation_path", str(STSB / "sts-dev.csv"),
        "--model.backbone.encoder_layers", "2",
        "--model.backbone.d_model", "128",
        "--model.backbone.d_ff", "512",
        "--data.tokenizer.vocab_size", "4000",
        "--trainer.logger", "false",
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    untrained = run(["validate", *small]).trainer.callback_metrics["val/triplet/spearman"].item()
    trained = run(["fit", *small, "--trainer.max_steps", "60", "--trainer.val_check_interval", "60"])
    spearman = trained.trainer.callback_metrics["val/triplet/spearman"].item()
    assert spearman > untrained + 0.05, (untrained, spearman)
