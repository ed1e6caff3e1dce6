"""Every experiment config runs (one fast step of training and validation), on local data."""

from __future__ import annotations

import json

import pytest

from experiments.cli import main

from .conftest import ROOT, SHARED_DATA

CONFIGS = ROOT / "experiments" / "configs"
WIKITEXT = SHARED_DATA / "wikitext2" / "wiki.test.raw"
STSB = SHARED_DATA / "stsb"
SCITLDR = SHARED_DATA / "scitldr"
SCITLDR_LOCAL = [
    "--config", str(CONFIGS / "local" / "scitldr.yaml"),
    "--data.sources.summarize.path", str(SCITLDR / "train.jsonl"),
    "--data.sources.summarize.validation_path", str(SCITLDR / "dev.jsonl"),
    "--data.sources.summarize.max_examples", "300",
    "--data.tokenizer.vocab_size", "4000",
]  # fmt: skip
MULTI30K, SQUAD = SHARED_DATA / "multi30k", SHARED_DATA / "squad" / "dev-v1.1.json"
SST2, TREC = SHARED_DATA / "sst2", SHARED_DATA / "trec"


def aligned(split: str) -> str:
    return json.dumps({lang: str(MULTI30K / f"{split}.{lang}.gz") for lang in ("en", "de")})


LOCAL_DATA = {
    "quickstart.yaml": [],
    "pretrain_mlm_nsp.yaml": ["--data.sources.mlm_nsp.path", str(WIKITEXT)],
    "siamese_stsb.yaml": [
        "--config", str(CONFIGS / "local" / "stsb.yaml"),
        "--data.sources.triplet.path", str(STSB / "sts-train.csv"),
        "--data.sources.triplet.validation_path", str(STSB / "sts-dev.csv"),
    ],
    "classify_sst2.yaml": [
        "--config", str(CONFIGS / "local" / "sst2.yaml"),
        "--data.sources.sst2.path", str(SST2 / "stsa.binary.train"),
        "--data.sources.sst2.validation_path", str(SST2 / "stsa.binary.dev"),
        "--data.sources.sst2.max_examples", "300",
        "--data.tokenizer.vocab_size", "1000",
    ],
    "classify_trec.yaml": [
        "--config", str(CONFIGS / "local" / "trec.yaml"),
        "--data.sources.trec.path", str(TREC / "TREC.train"),
        "--data.sources.trec.max_examples", "300",
        "--data.tokenizer.vocab_size", "1000",
    ],
    "summarize_seq2seq.yaml": SCITLDR_LOCAL,
    "summarize_prefix_lm.yaml": SCITLDR_LOCAL,
    "t5_multitask.yaml": [
        "--config", str(CONFIGS / "local" / "t5_multitask.yaml"),
        "--data.sources.summarize.path", str(SCITLDR / "train.jsonl"),
        "--data.sources.summarize.validation_path", str(SCITLDR / "dev.jsonl"),
        "--data.sources.translate.path", aligned("train"),
        "--data.sources.translate.validation_path", aligned("val"),
        "--data.sources.question.path", str(SQUAD),
        "--data.sources.summarize.max_examples", "300",
        "--data.sources.translate.max_examples", "300",
        "--data.sources.question.max_examples", "3000",  # whole articles: enough for a held-out one
        "--data.tokenizer.vocab_size", "4000",
    ],
    "long_mlm.yaml": [
        "--data.sources.mlm.path", str(WIKITEXT),
        # windows of 512 tokens: one step on 8192 takes minutes on a CPU; tests/test_mlm.py checks the
        # 8192-token windows of every article
        "--model.tasks.mlm.init_args.max_length", "512",
        "--data.tokenizer.vocab_size", "2000",
    ],
    "span_qa_squad.yaml": [
        "--config", str(CONFIGS / "local" / "squad.yaml"),
        "--data.sources.qa.path", str(SQUAD),
        "--data.sources.qa.max_examples", "3000",  # whole articles: enough for a held-out one
        "--data.tokenizer.vocab_size", "4000",
    ],
}  # fmt: skip
NEEDS = {
    "span_qa_squad.yaml": SQUAD,
    "pretrain_mlm_nsp.yaml": WIKITEXT,
    "long_mlm.yaml": WIKITEXT,
    "siamese_stsb.yaml": STSB,
    "classify_sst2.yaml": SST2,
    "classify_trec.yaml": TREC,
    "summarize_seq2seq.yaml": SCITLDR,
    "summarize_prefix_lm.yaml": SCITLDR,
    "t5_multitask.yaml": SHARED_DATA,
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(LOCAL_DATA)


@pytest.mark.parametrize("name", sorted(LOCAL_DATA))
def test_config_runs_a_fast_dev_run(name, tmp_path):
    if name in NEEDS and not NEEDS[name].exists():
        pytest.skip(f"needs {NEEDS[name]} (real data)")
    main(
        ["fit", "--config", str(CONFIGS / name), *LOCAL_DATA[name], "--trainer.fast_dev_run", "true",
         "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    )  # fmt: skip


def test_hub_source_offline_is_one_clear_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "pretrain_mlm_nsp.yaml"), "--trainer.fast_dev_run", "true"])
    message = str(exit_info.value.code)
    assert message.startswith("polyhead: error: data.sources.mlm_nsp.hub: could not load 'wikitext'")
    assert "set data.sources.mlm_nsp.path to a local file" in message
