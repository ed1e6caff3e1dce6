"""`MultiTaskModel`: the one LightningModule. One backbone, one head per task, any set of tasks.

Each batch carries its task's name; the step runs that task's forward and loss on the shared
backbone. Single-task training is the case of one task. Checkpoints carry the backbone config,
the task list and the tokenizer, so `MultiTaskModel.from_checkpoint(path)` needs nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone, init_weights
from modules.checkpoint import (
    load_matching,
    load_report_table,
    random_states,
    read_checkpoint,
    restore_frozen_weights,
    restore_random_states,
    tensor_digest,
)
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.flops import network_cost
from modules.freezing import FreezeConfig, freeze_report, frozen_names, parameter_depth
from modules.lora import LoraConfig, LoRALinear, add_lora, merge_lora, without_adapters
from modules.optim import OptimizerConfig, build_optimizer
from modules.sharding import shard_blocks
from modules.speed import SpeedConfig, apply_speed
from modules.step_means import StepMeans, logging_step, write_to_loggers
from tasks.base import Task, batch_stack_sizes, task_class

CHECKPOINT_FORMAT = 1


class MultiTaskModel(pl.LightningModule):
    def __init__(
        self,
        tasks: dict[str, Task],
        backbone: BackboneConfig | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(),
        tokenizer: Tokenizer | None = None,
        init_from: str | None = None,
        score: dict[str, float] | None = None,
        freeze: FreezeConfig = FreezeConfig(),
        speed: SpeedConfig = SpeedConfig(),
        lora: LoraConfig = LoraConfig(),
    ) -> None:
        """
        tasks: task name -> task (its class and settings); names also key data.sources and the logs.
        backbone: the shared transformer's architecture. None: the init_from checkpoint's, or the
            default BackboneConfig without one. (The CLI makes the checkpoint's architecture the
            default of model.backbone, so a config changes only the fields it names, e.g. dropout.)
        optimizer: AdamW and learning-rate schedule.
        tokenizer: the run's tokenizer; the CLI passes the data module's, which fixes vocab_size
            (an imported model's embedding table may have more rows than its tokenizer has ids,
            as T5's 32128 for 32100).
        init_from: a polyhead checkpoint to start from (pretraining -> fine-tuning, or a model
            imported with `polyhead convert`): the backbone and every head whose names and shapes
            match are loaded, the rest start fresh, and a report of loaded / new / unexpected /
            mismatched tensors is printed. The CLI also takes the checkpoint's tokenizer, so token
            ids mean what they meant in pretraining.
        freeze: what does not train (feature extraction, the bottom layers, gradual unfreezing);
            see modules/freezing.py. What is frozen is printed at the start.
        lora: low-rank adaptation (modules/lora.py): with a rank, the backbone is frozen and only
            small updates of its chosen projections train, beside the task heads. A checkpoint
            with adapters given to init_from arrives with them folded into its weights.
        speed: compiled blocks and activation checkpointing (modules/speed.py); they change speed
            and memory, never the result.
        score: one number for sweeps and checkpointing across tasks, logged as val/score: the
            weighted mean of "<task>/<metric>" entries, e.g. {"sst2/f1": 1, "squad/f1": 2}. By
            default every task whose main metric rises as it improves (F1, ROUGE-L, Spearman, ...)
            counts once with that metric; tasks judged by a loss are left out of the default.
        """
        super().__init__()
        if not tasks:
            raise UserError("model.tasks is empty: name at least one task")
        if tokenizer is None:
            raise UserError("MultiTaskModel needs a tokenizer (the CLI takes it from the data module)")
        starting_point = read_checkpoint(init_from) if init_from else None
        if backbone is None:
            saved = starting_point["polyhead"]["backbone"] if starting_point else {}
            backbone = BackboneConfig.from_dict(saved)
        backbone = dataclasses.replace(backbone)  # a copy: vocab_size is filled in below
        if backbone.vocab_size is None:
            backbone.vocab_size = tokenizer.vocab_size
        elif backbone.vocab_size < tokenizer.vocab_size:
            raise UserError(
                f"model.backbone.vocab_size={backbone.vocab_size} but the tokenizer has {tokenizer.vocab_size} "
                "pieces, more than the embedding table holds; leave vocab_size unset to take the tokenizer's"
            )
        for name, task in tasks.items():
            task.use_tokenizer(tokenizer, name)
            needs = task.stacks.split("-")
            if ("encoder" in needs and not backbone.encoder_layers) or (
                "decoder" in needs and not backbone.decoder_layers
            ):
                raise UserError(
                    f"model.tasks.{name} ({type(task).__name__}) needs the backbone's {task.stacks} stack(s); "
                    f"this backbone is {backbone.architecture}-only"
                )
        self.tasks, self.tokenizer = dict(tasks), tokenizer
        self.score_weights = self._score_weights(score)
        self.backbone_config, self.optimizer_config = backbone, optimizer
        self.backbone = Backbone(backbone)
        self.heads = nn.ModuleDict({name: task.build_head(backbone) for name, task in self.tasks.items()})
        init_weights(self.heads, backbone)
        self.eval_metrics = nn.ModuleDict(
            {name: task.metrics(backbone.vocab_size) for name, task in self.tasks.items()}
        )
        self.init_from = init_from
        base_weights = without_adapters(starting_point) if starting_point else {}
        loaded: list[str] = []
        if starting_point:
            report = load_matching(self, base_weights)
            loaded = report["loaded"]
            rank_zero_info(load_report_table(report, init_from))
        self.freeze, self.frozen = freeze, set()
        self.resume_random_states: dict | None = None  # set by on_load_checkpoint when resuming
        if freeze.policy != "none" and not freeze.unfreeze_every:
            # frozen for good: no gradients at all, which also saves their backward compute
            self._set_frozen(0)
            for name, param in self.named_parameters():
                param.requires_grad_(name not in self.frozen)
            backbone_trains = any(p.requires_grad for p in self.backbone.parameters())
            for name, head in self.heads.items():
                if not backbone_trains and not any(p.requires_grad for p in head.parameters()):
                    raise UserError(
                        f"model.freeze.policy {freeze.policy!r} leaves task {name!r} nothing to train: its "
                        "head has no weights of its own (it reads or ties to the frozen backbone); freeze "
                        "fewer layers (policy 'bottom') or unfreeze gradually (unfreeze_every)"
                    )
        self.lora = lora
        self.lora_base: dict | None = None  # what checkpoints leave out (see `_frozen_from_base`)
        if lora.enabled:
            self._add_adapters(freeze, loaded)
            if init_from:
                self.lora_base = self._frozen_from_base(init_from, base_weights)
        # each task's share of the network, for the model FLOPs of a step (modules/flops.py), which
        # TokenThroughput (experiments/callbacks.py) divides by the device's peak to log MFU; what is
        # frozen for good (model.freeze, LoRA) has no weight gradients to compute
        self.network_costs = {
            name: network_cost(self.backbone, self.heads[name], task.stacks)
            for name, task in self.tasks.items()
        }
        self.flops_per_batch = 0
        self.step_means = StepMeans()
        self.speed = speed
        apply_speed(self.backbone, speed)

    def _add_adapters(self, freeze: FreezeConfig, loaded: list[str]) -> None:
        """Freeze the backbone behind LoRA adapters (model.lora), and the heads' weights loaded from
        init_from (an imported LM head is a vocabulary-sized matrix: LoRA leaves it, as peft does),
        and say what trains: the adapters, the pooler and the heads' new weights."""
        if freeze.policy != "none":
            raise UserError(
                f"model.lora.rank {self.lora.rank} freezes the whole backbone already; model.freeze.policy "
                f"{freeze.policy!r} applies to full fine-tuning: leave it 'none', or set model.lora.rank 0"
            )
        adapters = add_lora(self.backbone, self.lora)
        if self.backbone.pooler is not None:  # a sentence head's first layer, as BERT trains it with NSP
            self.backbone.pooler.requires_grad_(True)
        loaded_heads = {name for name in loaded if name.startswith("heads.")}
        for name, param in self.heads.named_parameters(prefix="heads"):
            param.requires_grad_(name not in loaded_heads)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        pooler = ", the pooler" if self.backbone.pooler is not None else ""
        rank_zero_info(
            f"LoRA (model.lora): rank {self.lora.rank} on {', '.join(self.lora.targets)}; "
            f"{adapters:,} adapter parameters{pooler} and the heads' new weights train, "
            f"the other {frozen:,} (the backbone's and the loaded heads') are frozen"
        )

    def _frozen_from_base(self, init_from: str, base_weights: dict[str, Tensor]) -> dict:
        """The frozen parameters that are the init_from checkpoint's, bit for bit: LoRA never changes
        them, so checkpoints leave them out and name the base instead (with their digest, checked on
        reading). A frozen one the base lacked (a fresh one) and every buffer (a head's running
        statistics move in training) are kept in every checkpoint."""
        state = self.state_dict()
        frozen = {name: state[name] for name, p in self.named_parameters() if not p.requires_grad}
        same = {
            name: tensor
            for name, tensor in frozen.items()
            if name in base_weights
            and base_weights[name].shape == tensor.shape
            and torch.equal(base_weights[name], tensor)
        }
        return {"path": str(Path(init_from).resolve()), "keys": sorted(same), "sha256": tensor_digest(same)}

    def configure_model(self) -> None:
        """Under `strategy: fsdp` (modules/sharding.py), which leaves a device mesh here, shard the
        model across processes; under any other strategy, nothing to do."""
        if self._device_mesh is not None:
            shard_blocks(self, self._device_mesh)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """A batch tagged with its task -> that task's outputs."""
        name = batch["task"]
        return self.tasks[name].forward(self.backbone, self.heads[name], batch)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        name, task = batch["task"], self.tasks[batch["task"]]
        losses = task.loss(self(batch), batch)
        self.flops_per_batch = self.network_costs[name].training_flops(*batch_stack_sizes(batch))
        self.step_means.add({f"train/{name}/{key}": value for key, value in losses.items()})
        return task.loss_weight * losses["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        """At a logging step, log each training value's mean since the last one, across processes
        (modules/step_means.py); the progress bar gets host tensors, which it reads without waiting."""
        steps_done = self.trainer.global_step + 1
        if not logging_step(self.trainer, steps_done):
            return
        means = self.step_means.drain(self._sum_across_processes)
        write_to_loggers(self.trainer, means, steps_done)
        for key, mean in means.items():
            self.log(key, torch.tensor(mean), prog_bar=key.endswith("/loss"), logger=False, on_step=True)

    def on_train_end(self) -> None:
        """The means of the steps after the last logging step (a run stopped between two)."""
        if self.trainer.log_every_n_steps > 0:
            write_to_loggers(
                self.trainer, self.step_means.drain(self._sum_across_processes), self.trainer.global_step
            )

    def _sum_across_processes(self, values: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(values, reduce_op="sum")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = batch["task"]
        self.tasks[name].update_metrics(self.eval_metrics[name], self(batch), batch, self.tokenizer)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """-> one JSON-ready record per example, as the task describes its predictions."""
        name = batch["task"]
        records = self.tasks[name].predict(self(batch), batch, self.tokenizer)
        return [{"task": name, **record} for record in records]

    def _score_weights(self, score: dict[str, float] | None) -> dict[tuple[str, str], float]:
        """model.score -> {(task, metric): weight}, checked against the task names."""
        if score is None:
            return {(name, t.monitor[0]): 1.0 for name, t in self.tasks.items() if t.monitor[1] == "max"}
        weights = {}
        for key, weight in score.items():
            name, _, metric = key.partition("/")
            if name not in self.tasks or not metric:
                raise UserError(
                    f"model.score: {key!r} is not '<task>/<metric>' for a task of this run; tasks: {sorted(self.tasks)}"
                )
            if weight < 0:
                raise UserError(f"model.score: the weight of {key!r} must be >= 0, got {weight}")
            weights[(name, metric)] = float(weight)
        if not sum(weights.values()):
            raise UserError("model.score needs at least one positive weight")
        return weights

    def _log_eval_metrics(self, stage: str) -> None:
        overall, logged = 0.0, {}
        for name, metrics in self.eval_metrics.items():
            # synced across processes by torchmetrics; metrics never updated (a baseline that needs
            # training data, in a test-only run) are left out rather than logged as NaN
            values = {}
            for key, metric in metrics.items():
                if metric.update_count:
                    value = metric.compute()  # a metric may return several named values
                    values.update(value if isinstance(value, dict) else {key: value})
            metrics.reset()
            if not values:  # a task this run gave no data: `polyhead test` of some tasks only
                continue
            for key, value in values.items():  # sync_dist: the same value on every rank, said so to Lightning
                self.log(
                    f"{stage}/{name}/{key}",
                    value,
                    prog_bar=key == self.tasks[name].monitor[0],
                    sync_dist=True,
                )
            overall = overall + self.tasks[name].loss_weight * values["loss"]
            logged |= {(name, key): value for key, value in values.items()}
            self._log_samples(f"{stage}/{name}/samples", self.tasks[name].take_samples())
        self.log(f"{stage}/loss", overall, sync_dist=True)
        self._log_score(stage, logged)

    def _log_score(self, stage: str, values: dict[tuple[str, str], Tensor]) -> None:
        """{stage}/score: the weighted mean of the chosen task metrics (see `score`). Left out when a
        task of the score was not evaluated (a test run without its data); a metric that an evaluated
        task does not report is a misspelt name, and says so."""
        if not self.score_weights:
            return
        missing = [f"{t}/{m}" for t, m in self.score_weights if (t, m) not in values]
        evaluated = {t for t, _ in values}
        misspelt = [key for key in missing if key.split("/")[0] in evaluated]
        if misspelt:
            reported = sorted(f"{t}/{m}" for t, m in values)
            raise UserError(f"model.score names {misspelt}, which no task reports; reported: {reported}")
        if missing:
            return
        total = sum(self.score_weights.values())
        score = sum(w * values[key] for key, w in self.score_weights.items()) / total
        self.log(f"{stage}/score", score, sync_dist=True)

    def _log_samples(self, key: str, samples: tuple[list[str], list[list[str]]] | None) -> None:
        """A task's example outputs as a W&B table (other loggers have no tables)."""
        if samples is None or not self.trainer.is_global_zero:
            return
        columns, rows = samples
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=key, columns=columns, data=rows, step=self.global_step)

    def on_train_epoch_start(self) -> None:
        if self.freeze.unfreeze_every:
            self._set_frozen(self.current_epoch)
        for name, task in self.tasks.items():
            task.on_train_epoch_start(self, name)

    def _set_frozen(self, epoch: int) -> None:
        """Work out this epoch's frozen parameters and print them when they change."""
        frozen = frozen_names(self, self.freeze, self.backbone_config, epoch)
        if frozen != self.frozen or epoch == 0:
            rank_zero_info(f"frozen parameters (epoch {epoch}, model.freeze):\n{freeze_report(self, frozen)}")
        self.frozen = frozen

    def on_after_backward(self) -> None:
        """Gradual unfreezing keeps every parameter trainable for DDP (which fixes the set of
        trainable parameters when it wraps the model) and drops the gradients of the frozen ones:
        AdamW leaves a parameter without a gradient untouched, weight decay included."""
        if self.freeze.unfreeze_every and self.frozen:
            for name, param in self.named_parameters():
                if name in self.frozen:
                    param.grad = None

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING:  # `polyhead validate`, not fit's validation
            self._merge_adapters()

    def on_test_start(self) -> None:
        self._merge_adapters()

    def on_predict_start(self) -> None:
        self._merge_adapters()

    def _merge_adapters(self) -> None:
        """validate, test and predict train nothing and save nothing: LoRA adapters are folded into
        their weights for them, so each projection is one matmul again (decoding a token through
        unmerged adapters on every projection took twice as long). Sharded weights (FSDP) are
        left as they are."""
        adapted = [m for m in self.backbone.modules() if isinstance(m, LoRALinear)]
        if adapted and not any(isinstance(m.weight, DTensor) for m in adapted):
            merge_lora(self.backbone)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def configure_optimizers(self) -> dict:
        return build_optimizer(
            self,
            self.optimizer_config,
            int(self.trainer.estimated_stepping_batches),
            lambda name: parameter_depth(name, self.backbone_config),
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["polyhead"] = {
            "format": CHECKPOINT_FORMAT,
            "backbone": self.backbone_config.to_dict(),
            "optimizer": vars(self.optimizer_config) | {"betas": list(self.optimizer_config.betas)},
            "tasks": {
                name: {"class": type(t).__name__, "init_args": t.init_args()}
                for name, t in self.tasks.items()
            },
            "tokenizer": self.tokenizer.state_dict(),
            "lora": self.lora.to_dict(),
        }
        if self.lora_base:  # adapters and heads only: the frozen weights are the base checkpoint's
            checkpoint["polyhead"]["lora_base"] = self.lora_base
            for name in self.lora_base["keys"]:
                checkpoint["state_dict"].pop(name, None)
        checkpoint["rng"] = random_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming (--ckpt_path) continues the random streams too (dropout masks, sampling), so a
        resumed run matches an uninterrupted one; Lightning restores model, optimizer and loops only.
        The states are put back just before the first resumed batch: setting up the data loader
        draws from torch's generator, which the uninterrupted run did at its epoch start.
        A LoRA checkpoint gets its frozen weights back from its base first (`restore_frozen_weights`),
        and they stay frozen."""
        self.resume_random_states = checkpoint.get("rng")
        restore_frozen_weights(checkpoint, (self._trainer and self._trainer.ckpt_path) or "the checkpoint")
        self.lora_base = checkpoint["polyhead"].get("lora_base", self.lora_base)
        if self.lora_base:  # what the run froze stays frozen, so its optimizer state fits (resume)
            frozen = set(self.lora_base["keys"])
            for name, param in self.named_parameters():
                if name in frozen:
                    param.requires_grad_(False)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.resume_random_states is not None:
            restore_random_states(self.resume_random_states)
            self.resume_random_states = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> MultiTaskModel:
        """Rebuild a trained model from its checkpoint file alone (weights_only: no code runs on load)."""
        checkpoint = read_checkpoint(path, map_location)
        saved = checkpoint["polyhead"]
        tasks = {
            name: task_class(spec["class"])(**spec["init_args"]) for name, spec in saved["tasks"].items()
        }
        model = cls(
            tasks,
            BackboneConfig.from_dict(saved["backbone"]),
            OptimizerConfig(**saved["optimizer"]),
            Tokenizer.from_state_dict(saved["tokenizer"]),
            lora=LoraConfig(**saved.get("lora", {})),
        )
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()
