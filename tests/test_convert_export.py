"""`polyhead convert --to-hf`: checkpoints imported from tiny HF BERT and T5 directories
(tests/hf_models.py) export back to directories transformers loads with no missing or unexpected
keys and identical tensors; a backbone HF cannot compute is refused naming the config key."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import HFTokenizer
from modules.config import BackboneConfig
from modules.model import MultiTaskModel
from tasks.mlm_nsp import MaskedLMNextSentence

from .convert_cli import fails, polyhead
from .hf_models import loaded_cleanly, transformers
from .hf_tokenizers import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_tensors(original_dir, exported_dir, allowed_extra: set[str]) -> None:
    """Every tensor of the original file comes back bit for bit; extra keys only where named."""
    original, exported = (
        load_file(original_dir / "model.safetensors"),
        load_file(exported_dir / "model.safetensors"),
    )
    assert original.keys() <= exported.keys() and exported.keys() - original.keys() <= allowed_extra
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key


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


def test_an_encoder_whose_nsp_head_is_not_berts_exports_as_bert_model(bert_dir, tmp_path, capsys):
    """BERT's NSP head is the pooled one: an MLM + NSP model with the segment-match head exports its
    encoder as `BertModel`, every backbone tensor as it was, rather than a wrong BertForPreTraining."""
    tokenizer = HFTokenizer(
        (bert_dir / "tokenizer.json").read_text(),
        {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    )
    config = BackboneConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, d_ff=64, encoder_layers=1, pooler=True
    )
    model = MultiTaskModel({"mlm_nsp": MaskedLMNextSentence(nsp_head="match")}, config, tokenizer=tokenizer)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "match.ckpt")
    polyhead("convert", "--to-hf", str(tmp_path / "match.ckpt"), str(tmp_path / "hf"))
    assert "bert (BertModel)" in capsys.readouterr().out
    exported = loaded_cleanly(transformers.BertModel, tmp_path / "hf")
    torch.testing.assert_close(
        exported.embeddings.word_embeddings.weight, model.backbone.embeddings.tokens.weight, rtol=0, atol=0
    )
