"""HF LLaMA <-> polyhead (modules/convert_llama.py, and `polyhead convert` both ways): a converted
LLaMA (rotary positions, 2 key/value heads for 4 query heads, SwiGLU) computes HF's logits over
padded batches and generates HF's tokens; export gives HF back the same tensors; an imported LLaMA
fine-tunes and exports what it computes; what LLaMA cannot compute is refused by key.

Small randomly initialised HF models (no downloads), every parameter perturbed (tests/hf_models.py);
eval mode, fp32, outputs agree to ATOL = RTOL = 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import HFTokenizer
from modules.backbone import Backbone
from modules.convert_llama import LLAMA, LLAMA_DEFAULTS
from modules.errors import UserError
from modules.model import MultiTaskModel
from tasks.prefix_lm import PrefixLM

from .convert_cli import fails, fine_tune_summarizer, polyhead
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
    tiny_llama_config,
    transformers,
)
from .hf_tokenizers import LLAMA_BOS, LLAMA_EOS, SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, EOS = 90, 7


def llama_pair(tie: bool = False) -> tuple:
    """(HF LlamaForCausalLM, its polyhead Backbone, the polyhead LM head) holding the same weights."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(tiny_llama_config(VOCAB, EOS, tie)).eval()
    perturb(hf)
    return polyhead_pair(hf, LLAMA.backbone_config, LLAMA.to_polyhead)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_match_hf_over_a_right_padded_batch(tie: bool) -> None:
    hf, backbone, head = llama_pair(tie)
    config = backbone.config
    assert (config.position, config.kv_heads, config.attention_head_dim, config.rotary_base) == (
        "rotary",
        2,
        6,
        500.0,
    )
    assert_logits_match_over_right_padding(hf, backbone, head, VOCAB)


@pytest.mark.parametrize("beams", [1, 3])
def test_llama_generation_from_left_padded_prompts_gives_hfs_tokens(beams: int) -> None:
    assert_generation_matches_hf(*llama_pair(), VOCAB, EOS, beams)


def test_llama_export_inverts_import_tensor_for_tensor() -> None:
    hf, backbone, head = llama_pair()
    assert_same_tensors(
        LLAMA.from_polyhead(backbone.state_dict(), head.decoder.weight, backbone.config), hf.state_dict()
    )
    hf_config = LLAMA.config_to_hf(backbone.config, None, EOS, None)
    assert LLAMA.backbone_config(SimpleNamespace(**(LLAMA_DEFAULTS | hf_config))) == backbone.config
    assert transformers.LlamaConfig.from_dict(hf_config).rope_parameters["rope_theta"] == 500.0


def test_headless_key_names_and_legacy_rotary_buffers_convert() -> None:
    """LlamaModel's keys have no "model." prefix; older files carry per-layer inv_freq buffers."""
    hf, backbone, _ = llama_pair()
    original = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    for i in range(hf.config.num_hidden_layers):
        original[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(3)
    state, lm_head = LLAMA.to_polyhead(original, backbone.config)
    assert torch.equal(lm_head, hf.lm_head.weight)
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(state[key], tensor), key
    original["layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 32)  # as if every head had its own kv
    with pytest.raises(
        UserError, match=re.escape("layers.0.self_attn.k_proj.weight: (24, 32), expected (12, 32)")
    ):
        LLAMA.to_polyhead(original, backbone.config)


def test_what_llama_cannot_compute_is_refused_naming_the_key() -> None:
    for overrides, message in [  # config.json values as transformers 5 and 4 write them
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            "rope_type='llama3'",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"sliding_window": 4096}, "sliding_window=4096"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            LLAMA.backbone_config(SimpleNamespace(**(LLAMA_DEFAULTS | overrides)))
    config = llama_pair()[1].config
    for change, key in [
        ({"bias": True}, "model.backbone.bias=True"),
        ({"gated_ff": False}, "model.backbone.gated_ff=False"),
        ({"position": "learned"}, "model.backbone.position='learned' (LLaMA has 'rotary')"),
        ({"norm_type": "layernorm"}, "model.backbone.norm_type='layernorm'"),
    ]:
        with pytest.raises(UserError, match=re.escape(key)):
            LLAMA.config_to_hf(dataclasses.replace(config, **change), None, EOS, None)
    segmented = dataclasses.replace(config, type_vocab_size=2)
    backbone = Backbone(segmented)
    with pytest.raises(UserError, match="type_vocab_size: 0"):
        LLAMA.from_polyhead(backbone.state_dict(), torch.zeros(VOCAB, config.d_model), segmented)


# ------------------------------------------------------------------------------ `polyhead convert`


def test_llama_converts_with_its_tokenizer_and_round_trips_exactly(llama_dir, tmp_path, capsys):
    out = tmp_path / "llama.ckpt"
    polyhead("convert", str(llama_dir), str(out))
    report = capsys.readouterr().out
    assert "llama (LlamaForCausalLM)" in report and "prefix_lm (PrefixLM)" in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, HFTokenizer) and isinstance(model.tasks["prefix_lm"], PrefixLM)
    assert tokenizer.eos_id == tokenizer.pad_id == tokenizer.piece_id(LLAMA_EOS, "eos")
    assert tokenizer.bos_id == tokenizer.piece_id(LLAMA_BOS, "bos")  # what its post-processor puts first
    reference = transformers.AutoTokenizer.from_pretrained(llama_dir)
    texts = [*SENTENCES, "An unseen sentence, with Çafé accents."]
    assert tokenizer.encode(texts) == [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    task = model.tasks["prefix_lm"]
    prompts = task.tokenize({"source": texts}, tokenizer)["source_ids"]
    assert prompts == [
        reference(task.prompt({"source": t}))["input_ids"] for t in texts
    ]  # <|begin_of_text|> first

    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.tensor([tokenizer.encode([SENTENCES[4]])[0][:20]])
    with torch.no_grad():
        ours = model.heads["prefix_lm"](model.backbone.decode(ids), model.backbone.token_embedding)
        torch.testing.assert_close(ours, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)

    polyhead("convert", "--to-hf", str(out), str(tmp_path / "hf"))
    assert "llama (LlamaForCausalLM)" in capsys.readouterr().out
    assert_same_tensors(
        load_file(tmp_path / "hf" / "model.safetensors"), load_file(llama_dir / "model.safetensors")
    )
    again = loaded_cleanly(transformers.LlamaForCausalLM, tmp_path / "hf")
    assert again.config.num_key_value_heads == 2 and again.config.eos_token_id == tokenizer.eos_id
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [exported_tokenizer(t)["input_ids"] for t in texts] == [reference(t)["input_ids"] for t in texts]
    assert exported_tokenizer.bos_token == LLAMA_BOS and again.config.bos_token_id == tokenizer.bos_id


def test_a_llama_tokenizer_without_an_eos_token_is_refused_in_one_line(llama_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (partial / name).write_bytes((llama_dir / name).read_bytes())
    (partial / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    message = fails(capsys, "convert", str(partial), str(tmp_path / "out.ckpt"))
    assert "names no eos_token" in message and str(partial) in message
    assert not (tmp_path / "out.ckpt").exists()


def test_imported_llama_fine_tunes_as_a_summarizer_and_exports_what_it_computes(llama_dir, tmp_path, capsys):
    """Three PrefixLM steps from --model.init_from, with attention dropout on (the written-out
    attention path, grouped kv heads expanded), then export: HF computes the fine-tuned logits."""
    polyhead("convert", str(llama_dir), str(tmp_path / "llama.ckpt"))
    rows = [{"source": s, "target": s.split()[0]} for s in SENTENCES]
    last = fine_tune_summarizer(
        tmp_path / "llama.ckpt", rows, tmp_path, "--model.backbone.attention_dropout", "0.1"
    )
    ours = MultiTaskModel.from_checkpoint(last).eval()
    imported = MultiTaskModel.from_checkpoint(tmp_path / "llama.ckpt")
    assert not torch.equal(ours.backbone.token_embedding, imported.backbone.token_embedding)

    assert_export_computes_the_fine_tuned_logits(last, transformers.LlamaForCausalLM, tmp_path, capsys)
