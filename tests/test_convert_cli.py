"""`polyhead convert` end to end: tiny HF BertForPreTraining and T5ForConditionalGeneration (random,
perturbed weights, saved with a tokenizer built in the test) become polyhead checkpoints whose
outputs equal HF's on real token ids from the converted tokenizer; they export back to directories
transformers loads with no missing or unexpected keys and identical tensors; an imported BERT
fine-tunes on classification with --model.init_from alone; bad inputs end in one line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from datamodules.tokenizer import HFTokenizer, SentencePieceTokenizer
from experiments.cli import main, run
from modules.checkpoint import read_checkpoint
from modules.config import BackboneConfig
from modules.model import MultiTaskModel
from tasks.generative import IGNORE
from tasks.mlm_nsp import MaskedLMNextSentence

from .conftest import ROOT, offline_env
from .hf_tokenizers import SENTENCES, bert_wordpiece, t5_sentencepiece

transformers = pytest.importorskip("transformers", reason="transformers (a dev extra) is the reference")

ATOL = RTOL = 1e-5
T5_EXTRA_IDS = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: more intra-op threads only add contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.1) -> None:
    """Noise on every parameter, so zero biases and unit norms become distinct (a swap shows)."""
    torch.manual_seed(1)
    for param in model.parameters():
        param.add_(scale * torch.randn_like(param))


def polyhead(*args: str) -> None:
    """`polyhead ARGS` in this process; a user mistake raises SystemExit with its one-line message."""
    main(list(args))


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        polyhead(*args)
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None)
    assert message.startswith("polyhead: error:") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


# ------------------------------------------------------------------------------- HF models on disk


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BertForPreTraining directory as save_pretrained writes it, with its tokenizer.json."""
    directory = tmp_path_factory.mktemp("hf-bert")
    trained = bert_wordpiece(SENTENCES * 4)
    hf_tokenizer = transformers.BertTokenizerFast(tokenizer_object=trained)
    config = transformers.BertConfig(
        vocab_size=trained.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=trained.token_to_id("[PAD]"),
    )
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(config).eval()
    perturb(model)
    model.save_pretrained(directory)
    hf_tokenizer.save_pretrained(directory)
    return directory


def t5_directory(root, feed_forward_proj: str, tie: bool, own_lm_head: bool):
    """A T5ForConditionalGeneration directory with T5's spiece.model (and the tokenizer.json that
    transformers 5 writes beside it, as hub T5s have both). transformers 5 ties even an unscaled LM
    head to `shared` unless it is given weights of its own (`own_lm_head`, as flan-t5 has)."""
    proto = t5_sentencepiece(SENTENCES * 5)
    (root / "spiece.model").write_bytes(proto)
    (root / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": T5_EXTRA_IDS})
    )
    hf_tokenizer = transformers.T5Tokenizer.from_pretrained(root)
    config = transformers.T5Config(
        vocab_size=len(hf_tokenizer),
        d_model=32,
        d_kv=16,  # n_heads * d_kv = 64 != d_model
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie,
        decoder_start_token_id=0,  # as hub T5 configs say; transformers 5 leaves it out
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if own_lm_head:
        model.lm_head.weight = nn.Parameter(
            torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5
        )
    perturb(model)
    model.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    (root / "spiece.model").write_bytes(proto)  # save_pretrained of transformers 5 leaves it out
    return root


T5_VARIANTS = {
    "v1.0-relu-tied": ("relu", True, False),
    "v1.1-gated-gelu-tied-unscaled": ("gated-gelu", False, False),
    "v1.1-gated-gelu-own-lm-head": ("gated-gelu", False, True),
}


@pytest.fixture(scope="module", params=list(T5_VARIANTS))
def t5_dir(request, tmp_path_factory):
    return t5_directory(tmp_path_factory.mktemp(f"hf-t5-{request.param}"), *T5_VARIANTS[request.param])


# ---------------------------------------------------------------------------------------- import


def bert_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    """[CLS] A [SEP] B [SEP] rows of real token ids, right-padded, with segments, every real position
    a masked-LM target (so the task's forward returns logits at all of them)."""
    rows = []
    for a, b in pairs:
        ids_a, ids_b = tokenizer.encode([a, b])
        rows.append(([tokenizer.cls_id, *ids_a, tokenizer.sep_id], [*ids_b, tokenizer.sep_id]))
    length = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for i, (a, b) in enumerate(rows):
        input_ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        token_type_ids[i, len(a) : len(a) + len(b)] = 1
        attention_mask[i, : len(a) + len(b)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "mlm_labels": labels,
        "nsp_labels": torch.zeros(len(rows), dtype=torch.long),
        "task": "mlm_nsp",
    }


def test_bert_converts_with_its_tokenizer_and_computes_what_hf_computes(bert_dir, tmp_path, capsys):
    out = tmp_path / "bert.ckpt"
    polyhead("convert", str(bert_dir), str(out))
    report = capsys.readouterr().out
    assert "bert (BertForPreTraining)" in report and "tokenizers (WordPiece, tokenizer.json)" in report
    assert "mlm_nsp (MaskedLMNextSentence)" in report and str(out) in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, HFTokenizer) and isinstance(model.tasks["mlm_nsp"], MaskedLMNextSentence)
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    for text in [*SENTENCES, "An UNSEEN sentence, with Çafé accents."]:
        ids = tokenizer.encode([text])[0]
        assert ids == theirs_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_id not in tokenizer.encode([SENTENCES[0]])[0]

    hf = transformers.BertForPreTraining.from_pretrained(bert_dir).eval()
    batch = bert_batch(tokenizer, [(SENTENCES[0], SENTENCES[1]), (SENTENCES[2], "Short.")])
    with torch.no_grad():
        ours = model(batch)
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours["mlm_logits"], theirs.prediction_logits[real], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours["nsp_logits"], theirs.seq_relationship_logits, atol=ATOL, rtol=RTOL)


def test_t5_converts_with_its_sentencepiece_model_and_computes_what_hf_computes(t5_dir, tmp_path, capsys):
    out = tmp_path / "t5.ckpt"
    polyhead(
        "convert", str(t5_dir), str(out), "--task", "summarize"
    )  # named as a fine-tuning config names it
    report = capsys.readouterr().out
    assert "t5 (T5ForConditionalGeneration)" in report and "sentencepiece" in report
    assert "summarize (Seq2Seq)" in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer, task = model.tokenizer, model.tasks["summarize"]
    own_lm_head = "lm_head.weight" in load_file(t5_dir / "model.safetensors")
    assert (
        ("heads.summarize.decoder.weight" in model.state_dict())
        == own_lm_head
        != model.backbone_config.tie_embeddings
    )
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.start_id, tokenizer.cls_id) == (0, 1, 0, None)
    theirs_tokenizer = transformers.T5Tokenizer.from_pretrained(t5_dir)
    for text in SENTENCES:
        assert [*tokenizer.encode([text])[0], tokenizer.eos_id] == theirs_tokenizer(text)["input_ids"]

    hf = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    examples = [
        {"prompt_ids": [*tokenizer.encode([f"summarize: {s}"])[0], tokenizer.eos_id], "target": t}
        for s, t in [(SENTENCES[4], SENTENCES[0]), (SENTENCES[3], "Pieces.")]
    ]
    for example in examples:
        example |= {
            "target": [*tokenizer.encode([example["target"]])[0], tokenizer.eos_id],
            "prompt": "",
            "lead": "",
        }
    batch = task.collate(examples, [0, 0], tokenizer) | {"task": "summarize"}
    labels = batch["labels"]
    assert torch.equal(
        hf._shift_right(labels)[labels != IGNORE], batch["decoder_input_ids"][labels != IGNORE]
    )
    with torch.no_grad():
        ours = model(batch)["logits"]  # (N, V) at the target positions
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            use_cache=False,
        ).logits
    # unscaled T5 logits reach ~20 here, where float32 roundoff alone is ~1e-5: ATOL of the largest one
    scale = max(1.0, theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs[labels != IGNORE], atol=ATOL * scale, rtol=RTOL)


# ---------------------------------------------------------------------------------------- export


def assert_same_tensors(original_dir, exported_dir, allowed_extra: set[str]) -> None:
    """Every tensor of the original file comes back bit for bit; extra keys only where named."""
    original, exported = (
        load_file(original_dir / "model.safetensors"),
        load_file(exported_dir / "model.safetensors"),
    )
    assert original.keys() <= exported.keys() and exported.keys() - original.keys() <= allowed_extra
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key


def loaded_cleanly(model_class, directory):
    model, info = model_class.from_pretrained(directory, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def test_bert_round_trip_hf_polyhead_hf_is_exact(bert_dir, tmp_path, capsys):
    polyhead("convert", str(bert_dir), str(tmp_path / "bert.ckpt"))
    polyhead("convert", "--to-hf", str(tmp_path / "bert.ckpt"), str(tmp_path / "hf"))
    assert "written" in capsys.readouterr().out
    assert_same_tensors(bert_dir, tmp_path / "hf", set())
    again = loaded_cleanly(transformers.BertForPreTraining, tmp_path / "hf")
    original = transformers.BertForPreTraining.from_pretrained(bert_dir).eval()
    for key, tensor in original.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = transformers.AutoTokenizer.from_pretrained(bert_dir)
    assert [tokenizer(s)["input_ids"] for s in SENTENCES] == [reference(s)["input_ids"] for s in SENTENCES]


def test_t5_round_trip_hf_polyhead_hf_is_exact(t5_dir, tmp_path):
    polyhead("convert", str(t5_dir), str(tmp_path / "t5.ckpt"))
    polyhead("convert", "--to-hf", str(tmp_path / "t5.ckpt"), str(tmp_path / "hf"))
    # an unscaled output is written with its own lm_head (what transformers 4 reads as untied)
    assert_same_tensors(t5_dir, tmp_path / "hf", {"lm_head.weight"})
    again = loaded_cleanly(transformers.T5ForConditionalGeneration, tmp_path / "hf")
    original = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    assert original.config.scale_decoder_outputs == again.config.scale_decoder_outputs
    for key, tensor in original.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [tokenizer(s)["input_ids"] for s in SENTENCES] == [
        transformers.T5Tokenizer.from_pretrained(t5_dir)(s)["input_ids"] for s in SENTENCES
    ]


def test_a_backbone_hf_cannot_compute_is_refused_naming_the_key(bert_dir, tmp_path, capsys):
    tokenizer = HFTokenizer(
        (bert_dir / "tokenizer.json").read_text(),
        {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    )
    relative = BackboneConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=1, position="relative")
    model = MultiTaskModel({"mlm_nsp": MaskedLMNextSentence()}, relative, tokenizer=tokenizer)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "relative.ckpt")
    message = fails(capsys, "convert", "--to-hf", str(tmp_path / "relative.ckpt"), str(tmp_path / "hf"))
    assert "cannot be written as HF BERT" in message and "model.backbone.position='relative'" in message
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------- fine-tune


def test_imported_bert_fine_tunes_on_classification_with_its_architecture_and_tokenizer(
    bert_dir, tmp_path, caplog, capsys
):
    """--model.init_from alone: no backbone typed out; a dropout override still applies; the run's
    checkpoint exports as a BertModel whose outputs are polyhead's."""
    polyhead("convert", str(bert_dir), str(tmp_path / "bert.ckpt"))
    rows = [{"text": s, "label": "long" if len(s) > 50 else "short"} for s in SENTENCES]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"tasks": {"sst2": {"class_path": "Classify", "init_args": {"max_length": 32}}}},
        "data": {
            "sources": {
                "sst2": {
                    "path": str(tmp_path / "train.jsonl"),
                    "validation_path": str(tmp_path / "val.jsonl"),
                }
            },
            "batch_size": 3,
        },
        "trainer": {"max_steps": 2, "logger": False, "limit_val_batches": 1, "enable_progress_bar": False},
        "checkpoint": {"dirpath": str(tmp_path / "run"), "monitor": None},
    }
    (tmp_path / "fit.yaml").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO):
        polyhead(
            "fit", "--config", str(tmp_path / "fit.yaml"), "--model.init_from", str(tmp_path / "bert.ckpt"),
            "--model.backbone.dropout", "0.0",
        )  # fmt: skip
    converted_checkpoint = read_checkpoint(tmp_path / "bert.ckpt")
    backbone_tensors = sum(k.startswith("backbone.") for k in converted_checkpoint["state_dict"])
    assert f"{backbone_tensors} loaded" in caplog.text and "0 mismatched" in caplog.text  # the whole backbone
    assert "unexpected heads.mlm_nsp.nsp.classifier.weight" in caplog.text  # the table names the rest
    converted = converted_checkpoint["polyhead"]
    trained = read_checkpoint(tmp_path / "run" / "last.ckpt")
    expected = converted["backbone"] | {"dropout": 0.0}
    assert trained["polyhead"]["backbone"] == expected
    assert trained["polyhead"]["tokenizer"] == converted["tokenizer"]

    polyhead("convert", "--to-hf", str(tmp_path / "run" / "last.ckpt"), str(tmp_path / "hf"))
    assert "bert (BertModel)" in capsys.readouterr().out
    hf = loaded_cleanly(transformers.BertModel, tmp_path / "hf")
    ours = MultiTaskModel.from_checkpoint(tmp_path / "run" / "last.ckpt")
    batch = bert_batch(ours.tokenizer, [(SENTENCES[5], SENTENCES[2])])
    with torch.no_grad():
        hidden = ours.backbone.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
    torch.testing.assert_close(hidden, theirs.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.backbone.pool(hidden), theirs.pooler_output, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_sources_end_in_one_line_naming_the_file_and_write_nothing(bert_dir, tmp_path, capsys):
    out = tmp_path / "out.ckpt"
    assert "no such directory" in fails(
        capsys, "convert", str(tmp_path / "nope" / "deeper" / "dir"), str(out)
    )
    (tmp_path / "empty").mkdir()
    message = fails(capsys, "convert", str(tmp_path / "empty"), str(out))
    assert "no config.json" in message and "save_pretrained" in message

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    message = fails(capsys, "convert", str(gpt), str(out))
    assert "config.json: model_type 'gpt2' is not supported" in message and "'bert'" in message

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for path in bert_dir.iterdir():
        (truncated / path.name).write_bytes(path.read_bytes())
    weights = (bert_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    message = fails(capsys, "convert", str(truncated), str(out))
    assert "model.safetensors: not a readable weights file" in message and "truncated" in message

    message = fails(capsys, "convert", "someone/some-bert", str(out))  # conftest sets HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in message and "local model directory" in message
    assert "required: out" in fails(capsys, "convert", str(bert_dir))
    assert "a task name is letters" in fails(capsys, "convert", str(bert_dir), str(out), "--task", "my task")
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))

    polyhead("convert", str(bert_dir), str(out))
    assert "already exists" in fails(capsys, "convert", str(bert_dir), str(out))


def test_t5_saved_without_spiece_model_converts_with_its_tokenizer_json(t5_dir, tmp_path):
    """transformers 5 writes T5's tokenizer as tokenizer.json only; the same ids come from it."""
    bare = tmp_path / "t5-json-only"
    bare.mkdir()
    for path in t5_dir.iterdir():
        if path.name != "spiece.model":
            (bare / path.name).write_bytes(path.read_bytes())
    polyhead("convert", str(bare), str(tmp_path / "t5.ckpt"))
    tokenizer = MultiTaskModel.from_checkpoint(tmp_path / "t5.ckpt").tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.start_id, tokenizer.unk_id) == (0, 1, 0, 2)
    theirs = transformers.AutoTokenizer.from_pretrained(bare)
    for text in SENTENCES:
        assert [*tokenizer.encode([text])[0], tokenizer.eos_id] == theirs(text)["input_ids"]
    sentinel = theirs.convert_tokens_to_ids("<extra_id_0>")
    assert tokenizer.is_special(torch.tensor([sentinel])).item() and tokenizer.decode([sentinel]) == ""


def test_validate_runs_a_converted_bert_where_the_config_names_another_backbone(bert_dir, tmp_path):
    """--ckpt_path with `--model.backbone null` over a config that names an architecture: the
    checkpoint's architecture, its MLM/NSP heads loaded strictly by Lightning, its tokenizer."""
    polyhead("convert", str(bert_dir), str(tmp_path / "bert.ckpt"))
    documents = [{"text": " ".join(SENTENCES[i : i + 3])} for i in range(4)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    config = {
        "model": {
            "tasks": {"mlm_nsp": {"class_path": "MaskedLMNextSentence", "init_args": {"max_length": 32}}},
            "backbone": {"d_model": 256, "n_heads": 4},  # a from-scratch config's architecture
        },
        "data": {
            "sources": {
                "mlm_nsp": {
                    "path": str(tmp_path / "docs.jsonl"),
                    "validation_path": str(tmp_path / "docs.jsonl"),
                }
            },
            "batch_size": 4,
        },
        "trainer": {"logger": False, "enable_progress_bar": False},
    }
    (tmp_path / "validate.yaml").write_text(json.dumps(config))
    cli = run(
        [
            "validate",
            "--config",
            str(tmp_path / "validate.yaml"),
            "--ckpt_path",
            str(tmp_path / "bert.ckpt"),
            "--model.backbone",
            "null",
        ]
    )
    assert cli.model.backbone_config.d_model == 32 and isinstance(cli.model.tokenizer, HFTokenizer)
    assert 0 < cli.trainer.callback_metrics["val/mlm_nsp/mlm_loss"] < 20


def test_a_hub_name_converts_from_the_hf_cache_offline(bert_dir, tmp_path):
    """A hub name goes through huggingface_hub: here from its cache (HF_HUB_OFFLINE=1), laid out as a
    download leaves it, in a fresh process (the hub library reads HF_HUB_CACHE when imported)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for path in bert_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "convert", "someone/tiny-bert", str(tmp_path / "hub.ckpt")],
        cwd=ROOT,
        env=offline_env(tmp_path) | {"HF_HUB_CACHE": str(tmp_path / "hub")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from {snapshot}" in done.stdout
    assert (
        read_checkpoint(tmp_path / "hub.ckpt")["polyhead"]["tasks"]["mlm_nsp"]["class"]
        == "MaskedLMNextSentence"
    )
