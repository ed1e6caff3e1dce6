"""`ValidationPictures`: at every validation, W&B images of what the model has learned so far.

For each task, the attention maps of the last layer of each stack for one fixed example (the
first of its validation data, run through the task's own forward pass: teacher-forced for
text-to-text tasks, so the decoder maps cover the reference output; `polyhead inspect attention`
draws every layer); for each sentence-embedding task, the map of its validation texts'
embeddings (PCA), coloured by label where the data have labels, else by k-means cluster. Logged
as W&B images under pictures/<task>/attention and pictures/<task>/embeddings; W&B keeps the
files in the run folder (files/media/images/pictures/), offline too. Runs without a W&B logger
(`--trainer.logger false`, fast dev runs) draw nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from datamodules.datamodule import MultiTaskDataModule
from experiments.attention_maps import AttentionMap, AttentionRecorder, draw_maps, label_maps, select_maps
from experiments.embedding_maps import clusters, embed, project
from experiments.plots import scatter_map
from tasks.groups import EvalRows, TextTable
from tasks.triplet import SentenceEmbedding


def stream_pieces(batch: dict, ids_key: str, mask_key: str, tokenizer) -> list[str]:
    """The real tokens of row 0 of one stream of a batch, as pieces (empty when the batch has no such stream)."""
    if ids_key not in batch:
        return []
    ids: Tensor = batch[ids_key][0][batch[mask_key][0].bool()]
    return tokenizer.id_to_piece(ids.tolist())


class ValidationPictures(pl.Callback):
    """Attention maps per task and embedding maps per sentence-embedding task, at each validation
    (see the module docstring). Every process runs the same forward passes (a sharded model needs
    them all); the first process draws and logs."""

    def __init__(self, max_points: int = 500) -> None:
        """max_points: the embedding map shows at most this many validation texts (the first)."""
        self.max_points = max_points

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        data = trainer.datamodule
        if trainer.sanity_checking or not loggers or not isinstance(data, MultiTaskDataModule):
            return
        with tempfile.TemporaryDirectory() as folder:
            for name, task in pl_module.tasks.items():
                examples = data.examples["validation"].get(name)
                if not examples:
                    continue
                maps = self._attention(pl_module, name, examples[0], data)
                embedded = (
                    self._embedded(pl_module, name, examples) if isinstance(task, SentenceEmbedding) else None
                )
                if not trainer.is_global_zero:
                    continue
                for kind, path in self._draw(Path(folder), name, pl_module.global_step, maps, embedded):
                    for logger in loggers:
                        logger.log_image(f"pictures/{name}/{kind}", [str(path)], step=trainer.global_step)

    def _attention(self, model, name: str, example, data: MultiTaskDataModule) -> list[AttentionMap]:
        """The last layer of each stack on one example, through the task's own forward pass; empty
        when no layer has full attention (all LSH)."""
        task, tokenizer = model.tasks[name], data.tokenizer
        batch = task.collate([example], [data.seed], tokenizer)
        batch = {k: v.to(model.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with torch.no_grad(), AttentionRecorder(model.backbone) as recorder:
            task.forward(model.backbone, model.heads[name], batch)
        if not recorder.weights:
            return []
        # an encoder-decoder task's decoder reads decoder_input_ids; a decoder-only task's, input_ids
        decoder = ("decoder_input_ids", "decoder_attention_mask")
        decoder = decoder if decoder[0] in batch else ("input_ids", "attention_mask")
        maps = label_maps(
            recorder.weights,
            stream_pieces(batch, "input_ids", "attention_mask", tokenizer),
            stream_pieces(batch, *decoder, tokenizer),
        )
        return select_maps(maps, layer=-1, head=None)  # what the heads read

    def _embedded(self, model, name: str, rows: EvalRows) -> tuple[np.ndarray, list[str] | None]:
        """(N, E) embeddings of the first max_points distinct texts of the validation rows, and their
        labels when the data are labelled (pairs and triplets carry none)."""
        texts, labels = TextTable(), []
        for row, value in zip(rows.rows, rows.values, strict=True):
            for index in row[: self.max_points - len(texts)]:
                before = len(texts)
                texts.add(rows.texts[index])
                if len(texts) > before:
                    labels.append(f"label {int(value)}")
        task = model.tasks[name]
        with torch.no_grad():
            vectors = embed(task, model.backbone, model.heads[name], model.tokenizer, texts)
        return vectors.numpy(), labels if task.input == "labelled" else None

    def _draw(
        self, folder: Path, name: str, step: int, maps: list[AttentionMap], embedded
    ) -> list[tuple[str, Path]]:
        """-> (kind, PNG) of each picture there is to show: the attention maps, the embedding map
        (PCA, coloured by label, else by k-means cluster)."""
        pictures = []
        if maps:
            title = f"{name}: last-layer attention on its first validation example, step {step}"
            pictures.append(("attention", draw_maps(folder / f"{name}_attention.png", maps, title)))
        if embedded is not None:
            vectors, labels = embedded
            points, (xlabel, ylabel) = project(vectors, "pca")
            coloured = "by label" if labels else "by k-means cluster"
            groups = labels or [f"cluster {c}" for c in clusters(vectors, 8)]
            title = f"{name}: {len(vectors)} validation texts at step {step}, {coloured}"
            path = scatter_map(folder / f"{name}_embeddings.png", points, groups, title, xlabel, ylabel)
            pictures.append(("embeddings", path))
        return pictures
