"""Text-to-text tasks: teacher forcing and the summary-only loss checked against independent
computations, prompts from templates, bad input, and small batches overfitted until generation
reproduces the targets."""

from __future__ import annotations

from functools import partial

import datasets
import pytest
import torch
import torch.nn.functional as F

from datamodules.sources import DataSource, load_split
from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.generation import GenerationConfig
from modules.heads import PointerGeneratorHead
from modules.model import MultiTaskModel
from modules.optim import OptimizerConfig
from tasks.base import at_positions, batch_tokens
from tasks.generative import IGNORE
from tasks.metrics import RougeScore
from tasks.prefix_lm import PrefixLM
from tasks.seq2seq import Seq2Seq

TINY = dict(d_model=64, n_heads=4, d_ff=128, max_len=96, dropout=0.0, attention_dropout=0.0, pooler=False)


@pytest.fixture(scope="module")
def tokenizer(documents) -> Tokenizer:
    lines = [line for doc in documents for line in doc["text"].splitlines()] + [d["title"] for d in documents]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=1000), "seed corpus")


def examples_of(task, columns: dict, tokenizer: Tokenizer, split: str = "train") -> list[dict]:
    tokenized = datasets.Dataset.from_dict(columns).map(lambda b: task.tokenize(b, tokenizer), batched=True)
    return task.build_examples(tokenized, tokenizer, split, seed=0)


def model_for(task, tokenizer: Tokenizer, **backbone) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(
        {"t": task}, BackboneConfig(**(TINY | backbone)), OptimizerConfig(lr=3e-3, warmup=0.0), tokenizer
    )


def title_pairs(documents, n: int) -> dict[str, list]:
    """Document opening -> title: short, distinct texts a tiny model can memorise."""
    return {
        "source": [" ".join(d["text"].split()[:12]) for d in documents[:n]],
        "target": [d["title"] for d in documents[:n]],
    }


def test_seq2seq_decoder_input_is_the_target_shifted_right_behind_the_start_token(documents, tokenizer):
    task = Seq2Seq(max_source_length=32, max_target_length=8)
    examples = examples_of(task, title_pairs(documents, 4), tokenizer)
    batch = task.collate(examples, [0] * 4, tokenizer)
    labels, decoder_in = batch["labels"], batch["decoder_input_ids"]
    assert (decoder_in[:, 0] == tokenizer.start_id).all()
    real = labels != IGNORE
    assert torch.equal(decoder_in[:, 1:][real[:, 1:]], labels[:, :-1][real[:, 1:]])
    assert ((labels == tokenizer.eos_id).sum(dim=1) == 1).all()  # every target ends in exactly one </s>
    assert torch.equal(batch["decoder_attention_mask"].bool(), real)
    assert (batch["input_ids"][batch["attention_mask"].bool()] != 0).all()
    assert batch["prompt"][0].startswith("summarize: ")


def test_seq2seq_loss_is_cross_entropy_over_real_target_tokens(documents, tokenizer):
    task = Seq2Seq(max_source_length=32, max_target_length=8, label_smoothing=0.1)
    model = model_for(task, tokenizer, encoder_layers=1, decoder_layers=1).train()
    batch = task.collate(examples_of(task, title_pairs(documents, 6), tokenizer), [0] * 6, tokenizer)
    torch.manual_seed(1)
    ours = task.loss(model(batch | {"task": "t"}), batch)["loss"]
    # independently: full logits at every decoder position, padding left out by ignore_index
    torch.manual_seed(1)
    memory = model.backbone.encode(batch["input_ids"], batch["attention_mask"])
    hidden = model.backbone.decode(
        batch["decoder_input_ids"], batch["decoder_attention_mask"], memory, batch["attention_mask"]
    )
    logits = hidden @ model.backbone.token_embedding.T  # (B, T, V), tied and unscaled
    expected = F.cross_entropy(
        logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, label_smoothing=0.1
    )
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_prefix_lm_loss_counts_the_summary_only(documents, tokenizer):
    task = PrefixLM(max_source_length=24, max_target_length=8)
    model = model_for(task, tokenizer, encoder_layers=0, decoder_layers=2).eval()
    pairs = title_pairs(documents, 5)
    batch = task.collate(examples_of(task, pairs, tokenizer), [0] * 5, tokenizer)
    ours = task.loss(model(batch | {"task": "t"}), batch)["loss"]
    # independently: rebuild ARTICLE </s> SUMMARY </s> per row and average the cross-entropy of
    # predicting each summary token (and the final </s>) from everything before it
    total, count = 0.0, 0
    for source, title in zip(pairs["source"], pairs["target"], strict=True):
        prompt = tokenizer.encode([f"summarize: {source}"])[0][:23] + [tokenizer.eos_id]
        summary = tokenizer.encode([title])[0][:7] + [tokenizer.eos_id]
        sequence = torch.tensor([prompt + summary])
        hidden = model.backbone.decode(sequence)
        log_probs = (hidden @ model.backbone.token_embedding.T).log_softmax(-1)[0]  # (L, V)
        for position in range(len(prompt), len(prompt) + len(summary)):
            total -= log_probs[position - 1, sequence[0, position]].item()
            count += 1
    assert ours.item() == pytest.approx(total / count, rel=1e-5)
    everything = PrefixLM(max_source_length=24, max_target_length=8, loss_on="all")
    full = everything.collate(examples_of(everything, pairs, tokenizer), [0] * 5, tokenizer)
    assert (full["labels"] != IGNORE).sum() > (batch["labels"] != IGNORE).sum()


@pytest.mark.parametrize(
    ("task_class", "stacks"),
    [
        (Seq2Seq, {"encoder_layers": 2, "decoder_layers": 2}),
        (partial(Seq2Seq, copy=True), {"encoder_layers": 2, "decoder_layers": 2}),
        (PrefixLM, {"encoder_layers": 0, "decoder_layers": 2}),
        (
            PrefixLM,
            {
                "encoder_layers": 0,
                "decoder_layers": 2,
                "norm": "pre",
                "attention": "lsh",
                "reversible": True,
                "ff_chunks": 2,
            },
        ),  # fmt: skip
    ],
    ids=["seq2seq", "seq2seq-copy", "prefix_lm", "prefix_lm-lsh-reversible"],
)
def test_overfit_a_small_batch_and_generate_the_targets(documents, tokenizer, task_class, stacks):
    task = task_class(
        max_source_length=24, max_target_length=24, generation=GenerationConfig(max_new_tokens=24)
    )
    model = model_for(task, tokenizer, **stacks)
    pairs = title_pairs(documents, 8)
    batch = task.collate(examples_of(task, pairs, tokenizer, "validation"), [0] * 8, tokenizer) | {
        "task": "t"
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        task.loss(model(batch), batch)["loss"].backward()
        optimizer.step()
    model.eval()
    generated = task.decode_rows(model(batch)["generated"], tokenizer)
    rouge = RougeScore()
    rouge.update(generated, [[t] for t in pairs["target"]])
    assert float(rouge.compute()["rougeL"]) >= 0.95, list(zip(generated, pairs["target"], strict=True))
    # several rows per source (beams, samples) must each read their own source: two top-1 samples
    # per input are its greedy output twice
    task.decoding = GenerationConfig(
        strategy="sample", top_k=1, num_return_sequences=2, max_new_tokens=24, eos_id=tokenizer.eos_id
    )
    twice = task.decode_rows(model(batch)["generated"], tokenizer)
    assert twice == [text for text in generated for _ in range(2)]


@torch.no_grad()
def test_pointer_generator_mixes_vocabulary_and_copy_distributions_as_written():
    """The head's probabilities against the formula computed token by token, with repeated source ids
    (their attention adds up) and padding (never copied)."""
    torch.manual_seed(0)
    config = BackboneConfig(vocab_size=11, d_model=8, n_heads=2, d_ff=16)
    head = PointerGeneratorHead(config)
    with torch.no_grad():
        head.switch.bias.fill_(0.3)
    embedding = torch.randn(11, 8)
    hidden, memory = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    source = torch.tensor([[5, 7, 5, 3], [2, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    probs = head(hidden, embedding, memory, mask, source).exp()  # (2, 3, 11)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3), atol=1e-5)
    for b in range(2):
        for t in range(3):
            h = hidden[b, t]
            scores = [
                float(head.query(h) @ head.key(memory[b, i])) / 8**0.5 if mask[b, i] else -float("inf")
                for i in range(4)
            ]
            attention = torch.tensor(scores).softmax(0)
            context = sum(attention[i] * memory[b, i] for i in range(4))
            p_gen = torch.sigmoid(head.switch(torch.cat([h, context])))[0]
            vocab = F.softmax(embedding @ h, dim=0)
            for w in range(11):
                copied = sum(attention[i] for i in range(4) if source[b, i] == w and mask[b, i])
                expected = p_gen * vocab[w] + (1 - p_gen) * copied
                assert probs[b, t, w].item() == pytest.approx(float(expected), abs=1e-6)


def test_templates_fill_fields_join_lists_and_take_lead_1(tokenizer):
    task = Seq2Seq(prefix="question with context")
    assert task.fields == ("question", "context", "target")
    out = task.tokenize(
        {
            "question": ["Where is it?"],
            "context": [["It is here. Really.", "Second part."]],
            "target": [["here", "right here"]],
        },
        tokenizer,
    )
    assert out["prompt"] == ["question: Where is it? context: It is here. Really. Second part."]
    assert out["lead"] == ["It is here."]
    assert out["references"] == [["here", "right here"]]
    assert len(out["target_ids"][0]) == 2
    assert Seq2Seq(template="headline: {body}").fields == ("body", "target")
    assert Seq2Seq(prefix="translate English to German").predict_fields == ("source",)


def test_every_reference_trains_and_evaluation_keeps_them_all(tokenizer):
    task = Seq2Seq(max_source_length=16, max_target_length=8)
    columns = {"source": ["One text here."], "target": [["first answer", "second answer"]]}
    assert len(examples_of(task, columns, tokenizer, "train")) == 2
    (evaluated,) = examples_of(task, columns, tokenizer, "validation")
    assert evaluated["references"] == ["first answer", "second answer"]


def test_long_inputs_are_cut_counted_and_never_crash(tokenizer, caplog):
    task = Seq2Seq(prefix="none", max_source_length=8, max_target_length=4)
    columns = {"source": ["word " * 50, "short"], "target": ["a long target of many words", "ok"]}
    with caplog.at_level("INFO"):
        examples = examples_of(task, columns, tokenizer)
    assert max(len(e["prompt_ids"]) for e in examples) == 8 and max(len(e["target"]) for e in examples) == 4
    assert all(
        e["prompt_ids"][-1] == tokenizer.eos_id and e["target"][-1] == tokenizer.eos_id for e in examples
    )
    assert "cut 1 of 2 inputs to max_source_length=8 and 1 targets to max_target_length=4" in caplog.text


def test_bad_settings_and_data_get_clear_messages(tmp_path):
    with pytest.raises(UserError, match="unknown task prefix 'sumarize'; known prefixes: 'summarize'"):
        Seq2Seq(prefix="sumarize")
    with pytest.raises(UserError, match="uses {target}"):
        Seq2Seq(template="copy {target}")
    with pytest.raises(UserError, match="loss_on must be 'target' or 'all'"):
        PrefixLM(loss_on="summary")
    with pytest.raises(UserError, match="come from the tokenizer"):
        Seq2Seq(generation=GenerationConfig(eos_id=1))
    with pytest.raises(UserError, match="exceeds model.backbone.max_len=64"):
        PrefixLM(max_source_length=60, max_target_length=10).build_head(
            BackboneConfig(vocab_size=50, max_len=64)
        )
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        '{"source": "a text", "target": ["fine"]}\n{"source": "another", "target": []}\n', encoding="utf-8"
    )
    with pytest.raises(UserError, match=r"pairs.jsonl, line 2: field 'target' is empty"):
        load_split(
            DataSource(path=str(data)),
            ("source", "target"),
            "train",
            "data.sources.t",
            list_fields=("target",),
        )
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"source": 5, "target": "five"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="field 'source' must hold text or a list of texts, found Value"):
        load_split(
            DataSource(path=str(numbers)),
            ("source", "target"),
            "train",
            "data.sources.t",
            list_fields=("source", "target"),
        )


def test_questions_answered_as_text_are_scored_like_squad():
    """metrics: [squad] scores generated answers with SQuAD's EM/F1 (normalised, best gold), the
    lead-1 baseline likewise, and makes F1 the task's monitor."""
    task = Seq2Seq(prefix="question with context", metrics=["squad"])
    assert task.monitor == ("f1", "max")
    metrics = task.metrics(vocab_size=100)
    batch = {
        "references": [["Eiffel Tower", "the tower"], ["1889"]],
        "lead": ["The Eiffel Tower is in Paris.", "It opened in 1889."],
        "prompt": ["question: what? context: ...", "question: when? context: ..."],
    }
    task.score_outputs(metrics, ["the eiffel tower!", "in 1890"], batch)
    scores = {k: float(v) for k, v in metrics.compute().items() if k != "loss"}
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["baseline_exact_match"] == 0.0
    assert 0 < scores["baseline_f1"] < 1


@pytest.mark.parametrize("task_class", [Seq2Seq, PrefixLM])
def test_predict_batches_count_their_tokens(documents, tokenizer, task_class):
    """Throughput logging counts every attention mask's real tokens; a predict batch (prompts only)
    must expose its prompt mask as one, or `polyhead predict` stops on an empty length."""
    task = task_class(max_source_length=24, max_target_length=8)
    prompts = {"source": title_pairs(documents, 4)["source"]}
    examples = examples_of(task, prompts, tokenizer, "predict")
    batch = task.collate(examples, [0] * 4, tokenizer)
    assert batch_tokens(batch) == sum(len(e["prompt_ids"]) for e in examples)


def test_packed_prefix_lm_rows_give_the_unpacked_loss_and_logits(documents, tokenizer):
    """ARTICLE </s> SUMMARY </s> sequences sharing a row, each causal within itself and counting
    positions from 0, predict every token as they do one per row."""
    alone = PrefixLM(max_source_length=24, max_target_length=72)
    packing = PrefixLM(max_source_length=24, max_target_length=72, pack=True)  # rows of 96
    model = model_for(alone, tokenizer, encoder_layers=0, decoder_layers=2).eval()
    examples = examples_of(alone, title_pairs(documents, 8), tokenizer)
    unpacked, packed = (
        alone.collate(examples, [0] * 8, tokenizer),
        packing.collate(examples, [0] * 8, tokenizer),
    )
    assert len(packed["input_ids"]) < len(unpacked["input_ids"]), "some sequences must share a row"

    def target_logits(batch: dict) -> torch.Tensor:
        """(N, V) the logits at the batch's target positions."""
        hidden = model.backbone.decode(
            batch["input_ids"], batch["attention_mask"], document_ids=batch.get("document_ids")
        )  # (R, T, D)
        return model.heads["t"](
            at_positions(hidden, batch["label_positions"]), model.backbone.token_embedding
        )

    with torch.no_grad():
        expected, got = model(unpacked | {"task": "t"}), model(packed | {"task": "t"})
        torch.testing.assert_close(target_logits(packed), target_logits(unpacked), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packing.loss(got, packed)["loss"], alone.loss(expected, unpacked)["loss"])
