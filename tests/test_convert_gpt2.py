"""HF GPT-2 <-> polyhead (modules/convert_gpt2.py, and `polyhead convert` both ways): a converted
GPT-2 computes HF's logits over padded batches and generates HF's tokens; export gives HF back the
same tensors, and a decoder-only backbone polyhead trained (segment embeddings, its own vocabulary)
exports to a GPT-2 that computes what polyhead computes; an imported GPT-2 fine-tunes as the
decoder-only summarizer and exports back; what GPT-2 cannot compute is refused by key.

Small randomly initialised HF models (no downloads), every parameter perturbed (tests/hf_models.py);
eval mode, fp32, outputs agree to ATOL = RTOL = 1e-5.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import HFTokenizer
from modules.backbone import Backbone
from modules.checkpoint import read_checkpoint
from modules.config import BackboneConfig
from modules.convert_gpt2 import (
    backbone_config_from_gpt2,
    gpt2_config_to_hf,
    gpt2_to_polyhead,
    polyhead_to_gpt2,
)
from modules.errors import UserError
from modules.heads import LanguageModelHead
from modules.model import MultiTaskModel
from tasks.prefix_lm import PrefixLM

from .convert_cli import decoder_logits, fails, fine_tune_summarizer, polyhead
from .hf_models import (
    ATOL,
    RTOL,
    assert_export_computes_the_fine_tuned_logits,
    assert_generation_matches_hf,
    assert_logits_match_over_right_padding,
    assert_same_tensors,
    loaded_cleanly,
    perturb,
    polyhead_pair,
    tiny_gpt2_config,
    transformers,
)
from .hf_tokenizers import GPT2_EOS, SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, EOS = 90, 7


def gpt2_pair(tie: bool) -> tuple:
    """(HF GPT2LMHeadModel, its polyhead Backbone, the polyhead LM head) holding the same weights."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(VOCAB, EOS, tie)).eval()
    perturb(hf)
    return polyhead_pair(hf, backbone_config_from_gpt2, gpt2_to_polyhead)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_logits_match_hf_over_a_right_padded_batch(tie: bool) -> None:
    hf, backbone, head = gpt2_pair(tie)
    assert backbone.config.tie_embeddings == tie and (head.decoder is None) == tie
    assert_logits_match_over_right_padding(hf, backbone, head, VOCAB)


def test_gpt2_greedy_generation_from_left_padded_prompts_gives_hfs_tokens() -> None:
    assert_generation_matches_hf(*gpt2_pair(tie=True), VOCAB, EOS, steps=12)


def test_gpt2_export_inverts_import_tensor_for_tensor() -> None:
    hf, backbone, head = gpt2_pair(tie=False)
    assert_same_tensors(
        polyhead_to_gpt2(backbone.state_dict(), head.decoder.weight, backbone.config), hf.state_dict()
    )
    hf_config = gpt2_config_to_hf(backbone.config, EOS, None)
    assert backbone_config_from_gpt2(SimpleNamespace(**hf_config)) == backbone.config


def test_original_hub_key_names_and_legacy_mask_buffers_convert() -> None:
    """gpt2 on the hub is saved without the "transformer." prefix, with causal-mask buffers."""
    hf, backbone, _ = gpt2_pair(tie=True)
    original = {
        k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"
    }
    for i in range(hf.config.n_layer):
        original[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        original[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state, lm_head = gpt2_to_polyhead(original, backbone.config)
    assert lm_head is None
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(state[key], tensor), key
    with pytest.raises(
        UserError, match=r"missing keys: \['h.1.mlp.c_fc.bias'\].*not consumed: \['h.1.mlp.fc.bias'\]"
    ):
        original["h.1.mlp.fc.bias"] = original.pop("h.1.mlp.c_fc.bias")
        gpt2_to_polyhead(original, backbone.config)


def test_a_decoder_polyhead_trained_exports_to_a_gpt2_computing_the_same() -> None:
    """polyhead's default decoder-only backbone has segment embeddings; it adds row 0 everywhere,
    which export folds into the positions."""
    config = BackboneConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_heads=4,
        d_ff=64,
        encoder_layers=0,
        decoder_layers=2,
        max_len=40,
        norm="pre",
        embedding_norm=False,
        pooler=False,
        activation="gelu",
    )
    assert config.type_vocab_size == 2
    torch.manual_seed(1)
    backbone, head = Backbone(config).eval(), LanguageModelHead(config).eval()
    perturb(backbone)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config_to_hf(config, EOS, EOS))).eval()
    missing, unexpected = hf.load_state_dict(
        polyhead_to_gpt2(backbone.state_dict(), None, config), strict=False
    )
    assert not unexpected and set(missing) == {"lm_head.weight"}  # tied to wte
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(
            decoder_logits(backbone, head, ids, torch.ones_like(ids)),
            hf(input_ids=ids).logits,
            atol=ATOL,
            rtol=RTOL,
        )


def test_backbones_gpt2_cannot_compute_are_refused_naming_the_key() -> None:
    config = gpt2_pair(tie=True)[1].config
    for change, key in [
        ({"bias": False}, "model.backbone.bias=False"),
        ({"norm_type": "rmsnorm"}, "model.backbone.norm_type='rmsnorm'"),
        ({"head_dim": 4}, "model.backbone.head_dim=4"),
        ({"gated_ff": True}, "model.backbone.gated_ff=True"),
        ({"embedding_norm": True}, "model.backbone.embedding_norm=True"),
    ]:
        with pytest.raises(UserError, match=re.escape(key)):
            gpt2_config_to_hf(dataclasses.replace(config, **change), EOS, None)
    with pytest.raises(UserError, match=re.escape("model.backbone.position='sinusoidal'")):
        gpt2_config_to_hf(dataclasses.replace(config, position="sinusoidal"), EOS, None)
    with pytest.raises(UserError, match="needs a decoder-only backbone"):
        polyhead_to_gpt2({}, None, dataclasses.replace(config, encoder_layers=2))
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        with pytest.raises(UserError, match=f"GPT-2 {key}=true"):
            backbone_config_from_gpt2(tiny_gpt2_config(VOCAB, EOS).__class__(**{key: True}))


# ------------------------------------------------------------------------------ `polyhead convert`


def test_gpt2_converts_with_its_tokenizer_and_round_trips_exactly(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "gpt2.ckpt"
    polyhead("convert", str(gpt2_dir), str(out))
    report = capsys.readouterr().out
    assert "gpt2 (GPT2LMHeadModel)" in report and "prefix_lm (PrefixLM)" in report
    assert "tokenizers (BPE, tokenizer.json)" in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer, task = model.tokenizer, model.tasks["prefix_lm"]
    assert isinstance(tokenizer, HFTokenizer) and isinstance(task, PrefixLM)
    eos = tokenizer.piece_id(GPT2_EOS, "eos")
    assert tokenizer.eos_id == tokenizer.pad_id == eos  # GPT-2 has no pad: its eos pads
    assert tokenizer.bos_id is None  # its tokenizer_config names a bos_token, but nothing puts it first
    assert task.max_source_length + task.max_target_length <= model.backbone_config.max_len
    reference = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    texts = [*SENTENCES, "An unseen sentence, with Çafé accents."]
    assert tokenizer.encode(texts) == [reference(t)["input_ids"] for t in texts]
    assert [tokenizer.decode(ids) for ids in tokenizer.encode(texts)] == texts

    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ids = torch.tensor([tokenizer.encode([SENTENCES[4]])[0][:20]])
    with torch.no_grad():
        ours = model.heads["prefix_lm"](model.backbone.decode(ids), model.backbone.token_embedding)
        torch.testing.assert_close(ours, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)

    polyhead("convert", "--to-hf", str(out), str(tmp_path / "hf"))
    assert "tokenizer.json" in capsys.readouterr().out
    assert_same_tensors(
        load_file(tmp_path / "hf" / "model.safetensors"), load_file(gpt2_dir / "model.safetensors")
    )
    again = loaded_cleanly(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert again.config.eos_token_id == eos
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [exported_tokenizer(t)["input_ids"] for t in texts] == [reference(t)["input_ids"] for t in texts]


def test_a_gpt2_directory_without_tokenizer_json_is_refused_in_one_line(gpt2_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial / name).write_bytes((gpt2_dir / name).read_bytes())
    message = fails(capsys, "convert", str(partial), str(tmp_path / "out.ckpt"))
    assert "no tokenizer.json" in message and str(partial) in message
    assert not (tmp_path / "out.ckpt").exists()


def test_imported_gpt2_fine_tunes_as_a_summarizer_and_exports_what_it_computes(
    gpt2_dir, tmp_path, caplog, capsys
):
    """--model.init_from alone: the whole backbone loads, a few PrefixLM steps change it, and the
    run's checkpoint exports as a GPT2LMHeadModel whose logits are polyhead's."""
    polyhead("convert", str(gpt2_dir), str(tmp_path / "gpt2.ckpt"))
    rows = [{"source": s, "target": s.split()[0]} for s in SENTENCES]
    with caplog.at_level(logging.INFO):
        last = fine_tune_summarizer(tmp_path / "gpt2.ckpt", rows, tmp_path)
    imported = read_checkpoint(tmp_path / "gpt2.ckpt")["state_dict"]
    backbone_tensors = sum(k.startswith("backbone.") for k in imported)
    assert f"{backbone_tensors} loaded" in caplog.text and "0 mismatched" in caplog.text
    ours = MultiTaskModel.from_checkpoint(last).eval()
    assert ours.tokenizer.state_dict() == read_checkpoint(tmp_path / "gpt2.ckpt")["polyhead"]["tokenizer"]
    trained = ours.state_dict()["backbone.embeddings.tokens.weight"]
    assert not torch.equal(trained, imported["backbone.embeddings.tokens.weight"])

    assert_export_computes_the_fine_tuned_logits(last, transformers.GPT2LMHeadModel, tmp_path, capsys)
