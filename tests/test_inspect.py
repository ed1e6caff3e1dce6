"""Pictures of what a model learned: the attention weights drawn are the ones the forward pass uses,
`polyhead inspect attention|embeddings` write PNGs of the expected size for every architecture,
bad input gets one clear line, and validation logs the pictures to W&B (offline)."""

from __future__ import annotations

import glob
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from datamodules.tokenizer import Tokenizer, TokenizerConfig
from experiments.attention_maps import AttentionRecorder, label_maps, select_maps
from experiments.cli import main
from experiments.embedding_maps import project
from experiments.inspect_attention import inspect_attention
from experiments.plots import DPI, SCATTER_SIZE, heatmap_grid_inches
from modules.attention import MultiHeadAttention, attention_bias
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.generation import GenerationConfig
from modules.model import MultiTaskModel
from tasks.prefix_lm import PrefixLM
from tasks.seq2seq import Seq2Seq
from tasks.triplet import SentenceEmbedding

from .conftest import SEED_CORPUS
from .test_cli import QUICKSTART

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(d_model=32, n_heads=2, d_ff=64, max_len=32, dropout=0.0, attention_dropout=0.0)
ARCHITECTURES = {  # name -> (tasks, layers); maps drawn: rows of (kind, layer) x 2 heads
    "encoder": (lambda: {"triplet": SentenceEmbedding(input="labelled", unit="sentence", max_length=32)},
                dict(encoder_layers=2, decoder_layers=0)),
    "decoder": (lambda: {"lm": PrefixLM(max_source_length=20, max_target_length=8,
                                        generation=GenerationConfig(max_new_tokens=6))},
                dict(encoder_layers=0, decoder_layers=2)),
    "encoder-decoder": (lambda: {"summarize": Seq2Seq(max_source_length=32, max_target_length=8,
                                                      generation=GenerationConfig(max_new_tokens=6))},
                        dict(encoder_layers=2, decoder_layers=2, position="relative", norm="pre")),
    "llama-decoder": (lambda: {"lm": PrefixLM(max_source_length=20, max_target_length=8,
                                              generation=GenerationConfig(max_new_tokens=6))},
                      dict(encoder_layers=0, decoder_layers=2, position="rotary", n_kv_heads=1, norm="pre",
                           norm_type="rmsnorm", gated_ff=True, activation="silu", bias=False)),
}  # fmt: skip
ROWS = {
    "encoder": 2,
    "decoder": 2,
    "encoder-decoder": 6,
    "llama-decoder": 2,
}  # encoder + decoder + cross layers
TEXT = "The river town kept its bridge of stone for three hundred years."


@pytest.fixture(scope="module")
def checkpoints(documents, tmp_path_factory) -> dict:
    """A tiny untrained checkpoint of each architecture, saved as `polyhead fit` saves them."""
    lines = [line for doc in documents for line in doc["text"].splitlines()] + [d["title"] for d in documents]
    tokenizer = Tokenizer.train(lines, TokenizerConfig(vocab_size=500), "seed corpus")
    folder, paths = tmp_path_factory.mktemp("inspect"), {}
    for name, (tasks, layers) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = MultiTaskModel(tasks(), BackboneConfig(**SMALL, **layers), tokenizer=tokenizer)
        checkpoint = {"state_dict": model.state_dict()}
        model.on_save_checkpoint(checkpoint)
        paths[name] = str(folder / f"{name}.ckpt")
        torch.save(checkpoint, paths[name])
    return paths


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()  # a whole, valid PNG
        assert image.format == "PNG"
        return image.size


def grid_pixels(rows: int, columns: int) -> tuple[int, int]:
    width, height = heatmap_grid_inches(rows, columns)
    return round(width * DPI), round(height * DPI)


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *args])
    message = str(exit_info.value.code)
    assert message.startswith("polyhead: error:") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def heads_to_values(module: MultiHeadAttention, x: Tensor) -> Tensor:
    """The values (B, H, S, Dh) a self-attention module computes from x (B, S, D)."""
    return module._heads(module.qkv(x).chunk(3, dim=-1)[2])


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_recorded_weights_are_the_ones_the_forward_pass_uses(scale, causal):
    torch.manual_seed(0)
    module = MultiHeadAttention(32, 4, 8, bias=True, dropout=0.0, scale=scale).eval()
    x = torch.randn(2, 6, 32)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False  # row 1: two padding positions
    bias = attention_bias(6, 6, real, causal=causal)
    fused = module(x, bias=bias)  # SDPA's fused path
    recorded = []
    module.on_weights = recorded.append
    shown = module(x, bias=bias)
    weights = recorded[0]  # (B, H, T, S)
    torch.testing.assert_close(shown, fused, rtol=0, atol=1e-5)
    again = (weights @ heads_to_values(module, x)).transpose(1, 2).reshape(2, 6, 32)  # attention from them
    torch.testing.assert_close(module.out(again), fused, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
    assert (weights[1, :, :, 4:] == 0).all(), "padding columns get no weight"
    if causal:
        assert (weights.triu(diagonal=1) == 0).all(), "nothing above the diagonal"


def test_sdpa_causal_flag_and_cross_attention_record_what_they_compute():
    torch.manual_seed(0)
    self_attention = MultiHeadAttention(32, 4, 8, bias=False, dropout=0.0, scale=True).eval()
    x = torch.randn(1, 5, 32)
    fused = self_attention(x, is_causal=True)
    recorded = []
    self_attention.on_weights = recorded.append
    torch.testing.assert_close(self_attention(x, is_causal=True), fused, rtol=0, atol=1e-5)
    assert (recorded[0].triu(diagonal=1) == 0).all()
    cross = MultiHeadAttention(32, 4, 8, bias=True, dropout=0.0, scale=True, cross=True).eval()
    memory, real = torch.randn(1, 7, 32), torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    bias = attention_bias(5, 7, real)
    fused = cross(x, memory=memory, bias=bias)
    cross.on_weights = recorded.append
    torch.testing.assert_close(cross(x, memory=memory, bias=bias), fused, rtol=0, atol=1e-5)
    assert (recorded[1][..., 5:] == 0).all() and recorded[1].shape == (1, 4, 5, 7)


def test_recording_a_backbone_leaves_its_outputs_and_fast_path_as_they_were():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(vocab_size=50, **SMALL, encoder_layers=2, decoder_layers=2)).eval()
    source, target = torch.randint(7, 50, (2, 9)), torch.randint(7, 50, (2, 5))
    source_mask = torch.ones(2, 9, dtype=torch.long)
    source_mask[0, 6:] = 0
    with torch.no_grad():
        memory = backbone.encode(source, source_mask)
        plain = backbone.decode(target, memory=memory, memory_mask=source_mask)
        with AttentionRecorder(backbone, row=0) as recorder:
            recorded = backbone.decode(
                target, memory=backbone.encode(source, source_mask), memory_mask=source_mask
            )
    torch.testing.assert_close(recorded, plain, rtol=0, atol=1e-5)
    assert sorted(recorder.weights) == [("cross", 0), ("cross", 1), ("decoder", 0), ("decoder", 1),
                                        ("encoder", 0), ("encoder", 1)]  # fmt: skip
    assert (recorder.weights[("encoder", 1)][:, :, 6:] == 0).all(), "padded source tokens get no weight"
    assert (recorder.weights[("cross", 0)][:, :, 6:] == 0).all()
    assert (recorder.weights[("decoder", 0)].triu(diagonal=1) == 0).all()
    assert all(m.on_weights is None for m in backbone.modules() if isinstance(m, MultiHeadAttention))


def test_lsh_layers_have_no_weights_to_draw_and_asking_for_one_says_so():
    config = BackboneConfig(
        vocab_size=50, **SMALL, encoder_layers=2, attention=["full", "lsh"], lsh_bucket_size=4
    )
    backbone = Backbone(config).eval()
    with torch.no_grad(), AttentionRecorder(backbone) as recorder:
        backbone.encode(torch.randint(7, 50, (1, 16)))
    assert sorted(recorder.weights) == [("encoder", 0)]
    maps = label_maps(recorder.weights, [str(i) for i in range(16)], [])
    assert select_maps(maps, layer=0, head=None)[0].weights.shape == (2, 16, 16)
    with pytest.raises(UserError, match=r"--layer 1: no attention weights .* such as LSH layers"):
        select_maps(maps, layer=1, head=None)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_attention_command_writes_a_png_of_the_expected_size(architecture, checkpoints, tmp_path, capsys):
    out = tmp_path / "attention.png"
    main(["inspect", "attention", "--ckpt", checkpoints[architecture], "--text", TEXT, "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    assert png_size(out) == grid_pixels(ROWS[architecture], 2)
    assert grid_pixels(2, 2) == (600, 660)  # panels of 300 px, a 60 px title
    one = tmp_path / "one.png"  # the last layer of each stack, head 1
    main(["inspect", "attention", "--ckpt", checkpoints[architecture], "--text", TEXT, "--layer", "-1",
          "--head", "1", "--out", str(one)])  # fmt: skip
    assert png_size(one) == grid_pixels(ROWS[architecture] // 2, 1)


def test_a_text_pair_is_read_as_bert_reads_it(checkpoints, tmp_path):
    maps = inspect_attention(checkpoints["encoder"], "a bridge", tmp_path / "a.png", text_pair="of stone")
    assert maps[0].queries[0] == "[CLS]" and maps[0].queries.count("[SEP]") == 2
    assert maps[0].weights.shape == (2, len(maps[0].queries), len(maps[0].keys))


def test_a_text_longer_than_the_model_reads_is_cut_and_said_so(checkpoints, tmp_path, capsys):
    maps = inspect_attention(checkpoints["encoder"], " ".join([TEXT] * 5), tmp_path / "long.png")
    assert "cut to 32" in capsys.readouterr().err
    assert maps[0].weights.shape == (2, 32, 32) and maps[0].keys[-1] == "[SEP]"
    main(["inspect", "attention", "--ckpt", checkpoints["encoder-decoder"], "--text", " ".join([TEXT] * 5),
          "--out", str(tmp_path / "long_seq2seq.png")])  # fmt: skip
    assert "max_source_length); cut to 32" in capsys.readouterr().err


def test_embeddings_command_draws_the_map_and_lists_neighbours(checkpoints, tmp_path, capsys):
    out = tmp_path / "embeddings.png"
    main(["inspect", "embeddings", "--ckpt", checkpoints["encoder"], "--data", str(SEED_CORPUS),
          "--label-column", "title", "--max-texts", "200", "--queries", "2", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    assert png_size(out) == (round(SCATTER_SIZE[0] * DPI), round(SCATTER_SIZE[1] * DPI))
    table = printed.out.split("nearest neighbours by cosine similarity\n")[1].splitlines()
    assert [line.split()[0] for line in table if not line.startswith(" ")] == ["q1", "q2"]
    assert len(table) == 2 * (1 + 3)  # each query and its 3 neighbours
    assert "the first 200 are drawn" in printed.err and "longer than the 30 tokens" in printed.err
    unlabelled = tmp_path / "texts.txt"
    unlabelled.write_text("\n".join(f"{TEXT} Number {i}." for i in range(12)))
    main(["inspect", "embeddings", "--ckpt", checkpoints["encoder"], "--data", str(unlabelled), "--clusters", "3",
          "--out", str(out)])  # fmt: skip
    assert "k-means cluster (k=3)" in capsys.readouterr().out


def test_bad_input_ends_in_one_clear_line(checkpoints, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    message = fails(capsys, "embeddings", "--ckpt", checkpoints["encoder-decoder"], "--data", str(SEED_CORPUS),
                    "--out", out)  # fmt: skip
    assert "has no sentence-embedding head (its tasks: summarize (Seq2Seq))" in message
    message = fails(
        capsys, "attention", "--ckpt", checkpoints["encoder"], "--text", TEXT, "--layer", "2", "--out", out
    )
    assert "--layer 2: no attention weights recorded for that layer (recorded: encoder [0, 1]" in message
    message = fails(capsys, "attention", "--ckpt", checkpoints["encoder"], "--text", TEXT, "--out", "x.jpg")
    assert "must be a .png file" in message
    message = fails(capsys, "attention", "--ckpt", checkpoints["encoder-decoder"], "--text", TEXT,
                    "--text-pair", "more", "--out", out)  # fmt: skip
    assert "writes its input 'summarize: {source}' from 1 text(s) ['source']: give --text" in message


def test_validation_logs_attention_and_embedding_pictures_to_wandb(tmp_path):
    tiny = ["--model.backbone.d_model", "32", "--model.backbone.n_heads", "2", "--model.backbone.d_ff", "64",
            "--model.backbone.encoder_layers", "1", "--model.backbone.decoder_layers", "1",
            "--data.tokenizer.vocab_size", "500", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--checkpoint.dirpath", str(tmp_path / "ckpt")]  # fmt: skip
    main(["fit", "--config", QUICKSTART, *tiny])
    (run,) = glob.glob(str(tmp_path / "runs" / "wandb" / "offline-run-*"))
    images = f"{run}/files/media/images/pictures"
    for picture in ("mlm_nsp/attention", "triplet/attention", "summarize/attention", "triplet/embeddings"):
        (path,) = glob.glob(f"{images}/{picture}_*.png")
        png_size(path)


def three_clusters(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(60, 16) points in three tight, far-apart clusters, and each point's cluster."""
    centres = rng.normal(0.0, 10.0, (3, 16))
    labels = np.repeat(np.arange(3), 20)
    return centres[labels] + rng.normal(0.0, 0.5, (60, 16)), labels


def test_pca_axes_are_the_leading_eigenvectors_of_the_covariance():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 8)) * np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1])  # (200, 8)
    vectors = vectors @ np.linalg.qr(rng.normal(size=(8, 8)))[0]  # rotated: the axes are not the basis
    points, (first, second) = project(vectors, "pca")
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(vectors, rowvar=False))  # ascending
    for axis, (value, direction) in enumerate([(eigenvalues[-1], eigenvectors[:, -1]),
                                               (eigenvalues[-2], eigenvectors[:, -2])]):  # fmt: skip
        expected = (vectors - vectors.mean(0)) @ direction
        assert np.allclose(np.abs(points[:, axis]), np.abs(expected), atol=1e-8)
        assert np.isclose(points[:, axis].var(ddof=1), value)
    share = eigenvalues[-1] / eigenvalues.sum()
    assert first == f"PC1 ({share:.0%} of variance)" and second.startswith("PC2 (")


@pytest.mark.parametrize("method, module, name", [("tsne", "sklearn", "t-SNE"), ("umap", "umap", "UMAP")])
def test_tsne_and_umap_keep_each_cluster_together(method, module, name):
    pytest.importorskip(
        module, reason=f"--method {method} needs {module} installed (scikit-learn is in the dev extra)"
    )
    vectors, labels = three_clusters(np.random.default_rng(1))
    points, axes = project(vectors, method)
    assert points.shape == (60, 2) and axes == (f"{name} 1", f"{name} 2")
    distance = ((points[:, None] - points[None]) ** 2).sum(-1) + np.diag(np.full(60, np.inf))  # (60, 60)
    assert (labels[distance.argmin(1)] == labels).all()


@pytest.mark.parametrize("method, module, package", [("tsne", "sklearn.manifold", "scikit-learn"),
                                                     ("umap", "umap", "umap-learn")])  # fmt: skip
def test_a_projection_whose_library_is_missing_names_what_to_install(monkeypatch, method, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    vectors, _ = three_clusters(np.random.default_rng(2))
    with pytest.raises(UserError, match=f"--method {method} needs {package} \\(pip install {package}\\)"):
        project(vectors, method)
