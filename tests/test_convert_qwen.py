"""HF Qwen2 and Qwen3 <-> polyhead (modules/convert_qwen.py on LLaMA's key table, and `polyhead
convert` both ways): a converted Qwen2 (biased q/k/v) or Qwen3 (per-head query/key RMSNorm, a head
width of its own) computes HF's logits over padded batches and generates HF's tokens; export gives
HF back the same tensors; an imported Qwen reads its byte-level tokenizer without a bos, fine-tunes
and exports what it computes; what Qwen cannot compute (sliding windows, scaled rotary schedules,
Qwen3's output bias) is refused by key.

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
from modules.convert_qwen import QWEN2, QWEN3
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
    qwen_class,
    tiny_llama_config,
    transformers,
)
from .hf_tokenizers import QWEN_EOS, QWEN_PAD, SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, EOS = 90, 7
FAMILIES = {"qwen2": QWEN2, "qwen3": QWEN3}
each_family = pytest.mark.parametrize("model_type", list(FAMILIES))


def qwen_pair(model_type: str, tie: bool = False) -> tuple:
    """(HF Qwen2ForCausalLM or Qwen3ForCausalLM, its polyhead Backbone, the polyhead LM head) holding
    the same weights."""
    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB, EOS, tie, config_class=qwen_class(model_type, "Config"))
    hf = qwen_class(model_type)(config).eval()
    perturb(hf)
    family = FAMILIES[model_type]
    return polyhead_pair(hf, family.backbone_config, family.to_polyhead)


@each_family
@pytest.mark.parametrize("tie", [False, True])
def test_qwen_logits_match_hf_over_a_right_padded_batch(model_type: str, tie: bool) -> None:
    hf, backbone, head = qwen_pair(model_type, tie)
    config = backbone.config
    assert (config.kv_heads, config.attention_head_dim, config.rotary_base, config.bias) == (
        2,
        6,
        500.0,
        False,
    )
    assert (config.attention_qkv_bias, config.qk_norm) == (model_type == "qwen2", model_type == "qwen3")
    assert_logits_match_over_right_padding(hf, backbone, head, VOCAB)


@each_family
@pytest.mark.parametrize("beams", [1, 3])
def test_qwen_generation_from_left_padded_prompts_gives_hfs_tokens(model_type: str, beams: int) -> None:
    assert_generation_matches_hf(*qwen_pair(model_type), VOCAB, EOS, beams)


@each_family
def test_qwen_export_inverts_import_and_hf_reads_its_config(model_type: str) -> None:
    hf, backbone, head = qwen_pair(model_type)
    family, config = FAMILIES[model_type], backbone.config
    exported = family.from_polyhead(backbone.state_dict(), head.decoder.weight, config)
    assert_same_tensors(exported, hf.state_dict())
    hf_config = family.config_to_hf(config, None, EOS, None)
    assert family.backbone_config(SimpleNamespace(**(family.defaults | hf_config))) == config
    again = qwen_class(model_type)(qwen_class(model_type, "Config").from_dict(hf_config)).eval()
    again.load_state_dict(exported, strict=True)  # the config.json makes every tensor's place and shape
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids).logits, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL
        )


@each_family
def test_headless_keys_convert_and_a_missing_qwen_tensor_is_named(model_type: str) -> None:
    """Qwen2Model / Qwen3Model keys have no "model." prefix; LLaMA's weights under a Qwen config
    lack the q/k/v biases (Qwen2) or the query/key norms (Qwen3), which is refused by key."""
    hf, backbone, _ = qwen_pair(model_type)
    family = FAMILIES[model_type]
    original = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    state, lm_head = family.to_polyhead(original, backbone.config)
    assert torch.equal(lm_head, hf.lm_head.weight)
    assert_same_tensors(state, backbone.state_dict())
    own = "layers.1.self_attn.k_proj.bias" if model_type == "qwen2" else "layers.1.self_attn.k_norm.weight"
    del original[own]
    with pytest.raises(UserError, match=re.escape(f"missing keys: ['{own}']")):
        family.to_polyhead(original, backbone.config)


@each_family
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_sliding_window": True}, "use_sliding_window=true"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=['full_attention', 'sliding"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"hidden_act": "gelu_fast"}, "activation 'gelu_fast'"),
    ],
)
def test_what_qwen_cannot_compute_is_refused_naming_the_key(model_type: str, overrides, message) -> None:
    family = FAMILIES[model_type]
    hf_config = SimpleNamespace(**(family.defaults | overrides))
    with pytest.raises(UserError, match=re.escape(message)):
        family.backbone_config(hf_config)


def test_hub_qwen_sliding_window_settings_that_are_off_convert_and_qwen3s_attention_bias_is_refused():
    """Qwen2.5's config.json names a window and its layers with use_sliding_window false: HF attends
    in full, and so does polyhead. Qwen3's attention_bias would bias the output projection too."""
    hub = {"use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21}
    assert QWEN2.backbone_config(SimpleNamespace(**(QWEN2.defaults | hub))).qkv_bias is True
    assert QWEN2.backbone_config(SimpleNamespace(**(QWEN2.defaults | {"attention_bias": True}))).bias is False
    with pytest.raises(UserError, match=re.escape("Qwen3 attention_bias=true")):
        QWEN3.backbone_config(SimpleNamespace(**(QWEN3.defaults | {"attention_bias": True})))


@each_family
def test_a_backbone_qwen_cannot_compute_is_not_exported(model_type: str) -> None:
    family, config = FAMILIES[model_type], qwen_pair(model_type)[1].config
    own = {"qkv_bias": False} if model_type == "qwen2" else {"qk_norm": False}
    for change, key in [
        (own, f"model.backbone.{next(iter(own))}=False ({family.name} has True)"),
        ({"bias": True}, "model.backbone.bias=True"),
        ({"position": "learned"}, f"model.backbone.position='learned' ({family.name} has 'rotary')"),
    ]:
        with pytest.raises(UserError, match=re.escape(key)):
            family.config_to_hf(dataclasses.replace(config, **change), None, EOS, None)


# ------------------------------------------------------------------------------ `polyhead convert`


def test_qwen_converts_with_its_tokenizer_and_round_trips_exactly(qwen_dir, tmp_path, capsys):
    hf_class = transformers.AutoModelForCausalLM
    model_type = json.loads((qwen_dir / "config.json").read_text())["model_type"]
    architecture = qwen_class(model_type).__name__
    out = tmp_path / "qwen.ckpt"
    polyhead("convert", str(qwen_dir), str(out))
    report = capsys.readouterr().out
    assert f"{model_type} ({architecture})" in report and "prefix_lm (PrefixLM)" in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, HFTokenizer) and isinstance(model.tasks["prefix_lm"], PrefixLM)
    assert tokenizer.eos_id == tokenizer.piece_id(QWEN_EOS, "eos") != tokenizer.pad_id
    assert tokenizer.pad_id == tokenizer.piece_id(QWEN_PAD, "pad") and tokenizer.bos_id is None
    assert model.backbone.config.vocab_size > tokenizer.vocab_size  # Qwen's spare embedding rows
    reference = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    texts = [*SENTENCES, "An unseen sentence, with Çafé accents and 2048 digits."]
    assert tokenizer.encode(texts) == [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    task = model.tasks["prefix_lm"]
    prompts = task.tokenize({"source": texts}, tokenizer)["source_ids"]
    assert prompts == [reference(task.prompt({"source": t}))["input_ids"] for t in texts]  # nothing in front

    hf = hf_class.from_pretrained(qwen_dir).eval()
    ids = torch.tensor([tokenizer.encode([SENTENCES[4]])[0][:20]])
    with torch.no_grad():
        ours = model.heads["prefix_lm"](model.backbone.decode(ids), model.backbone.token_embedding)
        torch.testing.assert_close(ours, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)

    polyhead("convert", "--to-hf", str(out), str(tmp_path / "hf"))
    assert f"{model_type} ({architecture})" in capsys.readouterr().out
    assert_same_tensors(
        load_file(tmp_path / "hf" / "model.safetensors"), load_file(qwen_dir / "model.safetensors")
    )
    again = loaded_cleanly(qwen_class(model_type), tmp_path / "hf")
    assert again.config.head_dim == 6 and again.config.eos_token_id == tokenizer.eos_id
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [exported_tokenizer(t)["input_ids"] for t in texts] == [reference(t)["input_ids"] for t in texts]
    assert exported_tokenizer.bos_token is None and again.config.bos_token_id is None


def test_a_qwen_sliding_window_is_refused_in_one_line(qwen_dir, tmp_path, capsys):
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (windowed / name).write_bytes((qwen_dir / name).read_bytes())
    config = json.loads((qwen_dir / "config.json").read_text()) | {"use_sliding_window": True}
    (windowed / "config.json").write_text(json.dumps(config))
    message = fails(capsys, "convert", str(windowed), str(tmp_path / "out.ckpt"))
    assert "use_sliding_window=true" in message and str(windowed / "config.json") in message
    assert not (tmp_path / "out.ckpt").exists()


def test_imported_qwen_fine_tunes_as_a_summarizer_and_exports_what_it_computes(qwen_dir, tmp_path, capsys):
    """Three PrefixLM steps from --model.init_from, with attention dropout on (the written-out
    attention path, through the q/k/v biases or the query/key norms), then export: HF computes the
    fine-tuned logits."""
    model_type = json.loads((qwen_dir / "config.json").read_text())["model_type"]
    polyhead("convert", str(qwen_dir), str(tmp_path / "qwen.ckpt"))
    rows = [{"source": s, "target": s.split()[0]} for s in SENTENCES]
    last = fine_tune_summarizer(
        tmp_path / "qwen.ckpt", rows, tmp_path, "--model.backbone.attention_dropout", "0.1"
    )
    ours = MultiTaskModel.from_checkpoint(last).eval()
    imported = MultiTaskModel.from_checkpoint(tmp_path / "qwen.ckpt")
    assert not torch.equal(ours.backbone.token_embedding, imported.backbone.token_embedding)

    assert_export_computes_the_fine_tuned_logits(last, qwen_class(model_type), tmp_path, capsys)
