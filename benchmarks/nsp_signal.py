"""How much next-sentence signal is there, and how much of it has a checkpoint learned?

NSP pairs whose B comes from another document differ from true continuations mostly in topic.
This script builds the NSP pairs of the MLM + NSP config exactly as training does (WikiText-2 by
default, split by article, every 10th article held out) and reports validation accuracy of:

- a TF-IDF cosine between segment A and segment B with one threshold fitted on training pairs:
  how separable the pairs are from word overlap alone (no learning of representations);
- with `--checkpoint`: logistic-regression probes on that model's features of the unmasked pair,
  fitted on training pairs: the pooled [CLS] (what the NSP head reads), the first token of A, and
  the comparison features [a * b, |a - b|] of the mean of segment A's and segment B's states, from
  the embedding layer and from the last layer. A probe far below the TF-IDF figure says the representations do
  not yet carry the topic identity NSP needs;
- with `--checkpoint`: the spread of the pooled [CLS] and of a text token across inputs. A [CLS]
  that hardly changes from one input to the next leaves the NSP head nothing to read.

    python benchmarks/nsp_signal.py
    python benchmarks/nsp_signal.py --checkpoint runs/pretrain/last.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.datamodule import MultiTaskDataModule
from datamodules.sources import DataSource
from datamodules.tokenizer import TokenizerConfig
from modules.model import MultiTaskModel
from tasks.mlm_nsp import IGNORE, IS_NEXT, MaskedLMNextSentence

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
HEADING = r"^ = (?!1 (rad|henry) )[^=].* = $"  # as benchmarks/peer_mlm_nsp.py


def nsp_pairs(path: Path, checkpoint: Path | None) -> tuple[MultiTaskDataModule, MaskedLMNextSentence]:
    """The data module with training and validation NSP pairs built as `polyhead fit` builds them."""
    source = DataSource(
        path=str(path), documents="heading", skip_lines="^ = = ", holdout_every=10, heading_pattern=HEADING
    )
    data = MultiTaskDataModule(
        {"mlm_nsp": source},
        tokenizer=TokenizerConfig(vocab_size=8000, lowercase=True),
        tokenizer_checkpoint=str(checkpoint) if checkpoint else None,
    )
    task = MaskedLMNextSentence()
    data.tasks = {"mlm_nsp": task}
    data.setup("fit")
    return data, task


def tfidf_cosines(examples, vocab_size: int, idf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (cosine of the TF-IDF vectors of A and B (N,), is-next (N,)) per pair."""
    cosines, labels = [], []
    for a, b, label in (examples[i] for i in range(len(examples))):
        va, vb = np.bincount(a, minlength=vocab_size) * idf, np.bincount(b, minlength=vocab_size) * idf
        cosines.append(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))
        labels.append(label == IS_NEXT)
    return np.array(cosines), np.array(labels)


def tfidf_accuracy(data: MultiTaskDataModule) -> float:
    train, validation = data.examples["train"]["mlm_nsp"], data.examples["validation"]["mlm_nsp"]
    vocab = data.tokenizer.vocab_size
    document_frequency = np.zeros(vocab)
    for a, b, _ in (train[i] for i in range(len(train))):
        document_frequency[np.unique(np.concatenate([a, b]))] += 1
    idf = np.log(len(train) / (1.0 + document_frequency))
    cos_train, y_train = tfidf_cosines(train, vocab, idf)
    cos_val, y_val = tfidf_cosines(validation, vocab, idf)
    thresholds = np.quantile(cos_train, np.linspace(0, 1, 201))
    best = max(thresholds, key=lambda t: ((cos_train > t) == y_train).mean())
    return float(((cos_val > best) == y_val).mean())


@torch.no_grad()
def features(
    model: MultiTaskModel, task: MaskedLMNextSentence, data: MultiTaskDataModule, split: str, limit: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Probe features of the first `limit` pairs of a split, inputs unmasked."""
    examples = data.examples[split]["mlm_nsp"]
    out: dict[str, list[torch.Tensor]] = {
        "pooled [CLS]": [], "first token of A, last layer": [], "embedding layer": [], "last layer": []
    }  # fmt: skip
    labels = []
    for begin in range(0, min(limit, len(examples)), 64):
        chunk = [examples[i] for i in range(begin, min(begin + 64, limit, len(examples)))]
        batch = task.collate(chunk, list(range(len(chunk))), data.tokenizer)
        ids = torch.where(batch["mlm_labels"] != IGNORE, batch["mlm_labels"], batch["input_ids"])  # (B, T)
        real, segment_b = batch["attention_mask"].bool(), batch["token_type_ids"].bool()  # (B, T)
        hidden = model.backbone.encode(ids, batch["attention_mask"], batch["token_type_ids"])  # (B, T, D)
        embedded = model.backbone.embeddings(ids, batch["token_type_ids"])  # (B, T, D)
        out["pooled [CLS]"].append(model.backbone.pool(hidden))
        out["first token of A, last layer"].append(hidden[:, 1])
        for name, states in (("embedding layer", embedded), ("last layer", hidden)):
            in_a, in_b = (real & ~segment_b)[..., None], (real & segment_b)[..., None]  # (B, T, 1)
            mean_a = (states * in_a).sum(1) / in_a.sum(1)  # (B, D)
            mean_b = (states * in_b).sum(1) / in_b.sum(1)
            out[name].append(torch.cat([mean_a * mean_b, (mean_a - mean_b).abs()], dim=-1))  # (B, 2D)
        labels.append(batch["nsp_labels"] == IS_NEXT)
    return {name: torch.cat(parts) for name, parts in out.items()}, torch.cat(labels).float()


def spread(vectors: torch.Tensor) -> float:
    """(N, D) -> how much the vectors differ between inputs: the mean over dimensions of the std
    across inputs, over the vectors' root mean square (0: every input gets the same vector)."""
    return float(vectors.std(0).mean() / vectors.square().mean().sqrt())


def probe_accuracy(
    train: torch.Tensor, y_train: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor
) -> float:
    """L2-regularised logistic regression on standardised features (L-BFGS) -> validation accuracy."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mean) / std, (val - mean) / std
    weight = torch.zeros(train.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            F.binary_cross_entropy_with_logits(train @ weight + bias, y_train) + 1e-3 * weight.square().sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    return float((((val @ weight + bias) > 0).float() == y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=WIKITEXT, help="the MLM + NSP corpus (WikiText-2 raw)")
    parser.add_argument("--checkpoint", type=Path, help="an MLM + NSP checkpoint to probe")
    parser.add_argument(
        "--probe-pairs", type=int, default=6000, help="training pairs the probes are fitted on"
    )
    args = parser.parse_args()
    data, task = nsp_pairs(args.data, args.checkpoint)
    validation = data.examples["validation"]["mlm_nsp"]
    majority = np.mean([validation[i][2] == IS_NEXT for i in range(len(validation))])
    print(f"validation pairs: {len(validation)}, majority label: {max(majority, 1 - majority):.3f}")
    print(f"TF-IDF cosine of A and B, one threshold: {tfidf_accuracy(data):.3f}")
    if args.checkpoint:
        model = MultiTaskModel.from_checkpoint(args.checkpoint)
        train_features, y_train = features(model, task, data, "train", args.probe_pairs)
        val_features, y_val = features(model, task, data, "validation", len(validation))
        for name in train_features:
            accuracy = probe_accuracy(train_features[name], y_train, val_features[name], y_val)
            print(f"linear probe on {name}: {accuracy:.3f}")
        for name in ("pooled [CLS]", "first token of A, last layer"):
            print(f"spread of the {name} across validation inputs: {spread(val_features[name]):.3f}")


if __name__ == "__main__":
    main()
