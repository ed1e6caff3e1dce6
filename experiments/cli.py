"""`polyhead fit|validate|test|predict --config X.yaml`: LightningCLI over MultiTaskModel and
MultiTaskDataModule, with W&B logging (offline unless credentials exist), checkpoints, and one-line
errors for user mistakes. `polyhead convert` (HF BERT / T5 / GPT-2 <-> polyhead) is its own small command,
experiments/convert_command.py, as is `polyhead inspect` (pictures of attention and embeddings),
experiments/inspect_command.py."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import datasets
from jsonargparse import ArgumentError, Namespace, lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

import tasks  # noqa: F401  (registers every Task subclass for class_path lookup)
from datamodules.datamodule import MultiTaskDataModule
from experiments.callbacks import FinalValidationReport, PredictionsWriter, TokenThroughput
from experiments.compare_command import best_checkpoint, compare
from experiments.convert_command import convert
from experiments.fault_messages import explain
from experiments.graceful_stop import GracefulStop
from experiments.inspect_command import inspect
from experiments.latest_checkpoint import LatestCheckpoint
from experiments.objective_guard import ObjectiveGuard
from experiments.sweep_command import sweep
from experiments.validation_pictures import ValidationPictures
from experiments.wandb_mode import configure_wandb_mode
from experiments.yaml_files import check_config_files
from modules.atomic_io import AtomicCheckpointIO
from modules.atomic_write import write_text_atomically
from modules.checkpoint import check_same_model, read_checkpoint
from modules.config import BackboneConfig
from modules.errors import UserError, one_line
from modules.lora import LoraConfig
from modules.model import MultiTaskModel
from modules.sharding import FullyShardedBlocks


class ConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the W&B run's files and logs it as the run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if logger is None:
            return
        config = self.config.clone()
        config.pop("config", None)
        resolved = {  # values the config leaves to the run: the learned vocabulary, the model's size
            "vocab_size": pl_module.backbone_config.vocab_size,
            "parameters": sum(p.numel() for p in pl_module.parameters()),
        }
        logger.log_hyperparams(config.as_dict() | {"resolved": resolved})
        run_dir = getattr(getattr(logger, "experiment", None), "dir", None)
        if run_dir:
            write_text_atomically(
                Path(run_dir) / "polyhead-config.yaml", self.parser.dump(config, skip_none=False)
            )


class PolyheadCLI(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Add the learning-rate monitor only when there is a logger, and the checkpoint callback
        only when checkpointing is on: either would stop the run otherwise. Plain "ddp" gets DDP's
        unused-parameter detection: a step trains one task, so the other tasks' heads (and e.g. the
        pooler) get no gradient in it, which DDP otherwise refuses; "fsdp" is FSDP2 with a unit per
        transformer block (modules/sharding.py). Checkpoints are written atomically
        and read with weights_only (AtomicCheckpointIO) unless the trainer is given another CheckpointIO."""
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config.get("strategy") == "ddp":
            config["strategy"] = "ddp_find_unused_parameters_true"
        elif config.get("strategy") == "fsdp":
            config["strategy"] = FullyShardedBlocks()
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if config.get("logger") is not False:
            callbacks = [*callbacks, LearningRateMonitor(logging_interval="step")]
        loggers = config.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, WandbLogger):
                # Lightning hands wandb.init anonymous=None, which wandb 0.2x answers with a warning
                # on every run although the setting does nothing: leave it out
                getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """A run from a checkpoint file (--ckpt_path, or --model.init_from to fine-tune) has the
        checkpoint's architecture as the default of model.backbone, so a config changes only the
        backbone fields it names (dropout, say) and a model imported with `polyhead convert` needs
        no architecture typed out. A first parse finds the checkpoint (--print_config held back:
        what it prints must be the run's config); the real parse then runs over its defaults."""
        given = sys.argv[1:] if args is None else args
        first = parser.parse_args([arg for arg in given if not arg.startswith("--print_config")])
        reference = command_config(first).model.get("init_from")
        if isinstance(reference, str) and reference.startswith("best:"):
            # the best run of a sweep or group (polyhead compare --best), resolved once, here
            given = [*given, "--model.init_from", best_checkpoint(reference.removeprefix("best:"))]
            rank_zero_info(f"model.init_from {reference} -> {given[-1]}")
            first = parser.parse_args([arg for arg in given if not arg.startswith("--print_config")])
        source = checkpoint_source(first)
        checkpoint = read_checkpoint(source, whole=False) if source else None  # its sections
        self.checkpoint_saved = checkpoint["polyhead"] if checkpoint else None
        if (
            checkpoint
            and first.get("subcommand") == "fit"
            and source == command_config(first).get("ckpt_path")
        ):
            check_resumable(checkpoint, source)
        if source:
            defaults = {"model.backbone": self.checkpoint_saved["backbone"]}
            if source == command_config(first).get("ckpt_path"):  # its adapters too, to load them
                defaults["model.lora"] = self.checkpoint_saved.get("lora", LoraConfig().to_dict())
            self._parser(first.get("subcommand")).set_defaults(defaults)
        # Lightning warns whenever both args and sys.argv exist; `given` is the whole command line
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, given)

    def before_instantiate_classes(self) -> None:
        """A run from a checkpoint file uses the checkpoint's tokenizer, never a newly trained one,
        and its architecture where the config says `model.backbone: null` (over a config that
        names one: `--model.backbone null`). A run from --ckpt_path must name no other architecture
        or tasks than the checkpoint's: its weights load only into the model that wrote them."""
        config = command_config(self.config)
        if self.subcommand == "fit":
            check_something_trains(config.model.tasks)
        source = checkpoint_source(self.config)
        if source and not config.data.tokenizer_checkpoint:
            config.data.tokenizer_checkpoint = source
        backbone = config.model.get("backbone")
        if config.get("ckpt_path") and source == config.ckpt_path:
            tasks = {name: task.class_path.rsplit(".", 1)[-1] for name, task in config.model.tasks.items()}
            lora = config.model.lora.as_dict()
            check_same_model(self.checkpoint_saved, backbone and backbone.as_dict(), tasks, lora, source)
        if backbone is None and source:
            config.model.backbone = Namespace(**self.checkpoint_saved["backbone"])
        elif backbone is not None:
            # jsonargparse reports a BackboneConfig that refuses its values (`BackboneConfig | None`)
            # as matching no member of the union; built here first, its own UserError reaches the user
            BackboneConfig(**backbone.as_dict())

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")  # last.ckpt: the latest state
        parser.add_lightning_class_args(PredictionsWriter, "predictions")
        parser.set_defaults(
            {"checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.save_last": True}
        )
        # the vocabulary is learned from the data, and fixes the size of the model's embeddings
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")


def check_something_trains(task_configs: Namespace) -> None:
    """Before anything is built or logged: with every task's loss_weight 0 the weights that mix the
    tasks' losses sum to nothing, and the run would spend its steps changing nothing."""
    if not any(task.init_args.get("loss_weight", 1.0) for task in task_configs.values()):
        raise UserError(
            "model.tasks: every task has loss_weight 0, so the training loss is always 0 and nothing "
            "would train; give at least one task a positive loss_weight"
        )


def check_resumable(checkpoint: dict, path: str) -> None:
    """`fit --ckpt_path` continues a run: it needs the optimizer's state, which a converted or
    weights-only checkpoint lacks (Lightning would stop with a KeyError)."""
    if "optimizer_states" not in checkpoint:
        raise UserError(
            f"{path}: holds weights only (no optimizer state), so --ckpt_path cannot resume from it; "
            "start a new run from its weights with --model.init_from instead"
        )


def command_config(parsed: Namespace) -> Namespace:
    """The settings of the subcommand (fit, validate, ...) of a whole parsed command line."""
    return parsed[parsed.subcommand] if parsed.get("subcommand") else parsed


def checkpoint_source(parsed) -> str | None:
    """The checkpoint file a run starts from: --ckpt_path (a path, not "last" / "best"), else
    --model.init_from; None for a run from scratch. `parsed`: the whole parsed command line."""
    config = command_config(parsed)
    ckpt_path = config.get("ckpt_path")
    if ckpt_path in ("last", "best", "hpc"):
        ckpt_path = None
    return ckpt_path or config.model.get("init_from")


TRAINER_DEFAULTS = {
    "logger": lazy_instance(WandbLogger, save_dir="runs", log_model=False),
    "callbacks": [
        lazy_instance(FinalValidationReport),
        lazy_instance(TokenThroughput),
        lazy_instance(GracefulStop),
        lazy_instance(ObjectiveGuard),
        lazy_instance(ValidationPictures),
    ],
    # the mixture sampler shards data across processes itself
    "use_distributed_sampler": False,
}


class NoProductTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines, which advertise its own cloud products at every run; a
    polyhead run already logs to W&B."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(NoProductTips())


def run(args: list[str] | None = None) -> PolyheadCLI:
    """Parse `args` (default: the command line), build everything and run the subcommand; user
    mistakes raise UserError or ArgumentError. -> the CLI, whose trainer holds the final metrics."""
    check_config_files(sys.argv[1:] if args is None else args)
    configure_wandb_mode()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.logging.set_verbosity_error()  # our own messages name the bad file and line
    return PolyheadCLI(
        MultiTaskModel,
        MultiTaskDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=ConfigToRun,
        save_config_kwargs={"save_to_log_dir": False},
        parser_kwargs={"exit_on_error": False, "default_env": False, "allow_abbrev": False},
        args=args,
        auto_configure_optimizers=False,
    )


def end_wandb_run(exit_code: int) -> None:
    """Finish the W&B run this command started (if any), so that a next command in the same Python
    process (a notebook, a script calling main() in turn) starts a run of its own in its own
    directory instead of W&B quietly appending to this one."""
    wandb = sys.modules.get("wandb")  # not imported: no run was started
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def main(args: list[str] | None = None) -> None:
    """The `polyhead` command: `convert`, `sweep`, `compare`, `inspect`, or `run` (LightningCLI's subcommands),
    with user mistakes reported in one line and a non-zero exit."""
    command = sys.argv[1:] if args is None else args
    try:
        if command[:1] == ["convert"]:
            convert(command[1:])
        elif command[:1] == ["sweep"]:
            sweep(command[1:])
        elif command[:1] == ["compare"]:
            compare(command[1:])
        elif command[:1] == ["inspect"]:
            inspect(command[1:])
        else:
            try:
                run(args)
            except SystemExit as stop:  # a stop by signal exits 128 + its number
                end_wandb_run(stop.code if isinstance(stop.code, int) else int(stop.code is not None))
                raise
            except BaseException:
                end_wandb_run(1)
                raise
            end_wandb_run(0)
    except UserError as error:
        # explain() first: a data loader worker re-raises a UserError with its traceback as the message
        sys.exit(f"polyhead: error: {one_line(explain(error) or str(error))}")
    except ArgumentError as error:
        sys.exit(f"polyhead: error: {one_line(str(error))}")
    except Exception as error:  # a fault the user can act on (a data worker died), else a bug: traceback
        message = explain(error)
        if message is None:
            raise
        sys.exit(f"polyhead: error: {one_line(message)}")


if __name__ == "__main__":
    main()
