"""Where a local sweep keeps its state, shared by the controller and its trial processes:

    <sweeps dir>/<sweep id>/
        spec.yaml        the spec as launched, with the seed count (written once, atomically)
        optuna.journal   Optuna's journal: every trial's parameters, seed, intermediate values and
                         state, appended under a file lock by whichever process acts
        trials/<n>.log   each trial process's console output

The journal is append-only, so a killed controller loses nothing that happened: a relaunch reads
which trials finished and runs only the rest. Trial processes open the same journal to report
their metric at each validation and to read the pruner's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from experiments.sweep_spec import SweepSpec, parse_spec
from experiments.yaml_files import load_yaml_file
from modules.atomic_write import write_text_atomically
from modules.errors import UserError

DEFAULT_SWEEPS_DIR = "runs/sweeps"
# what a trial records about itself (Optuna user attributes)
CONFIG, SEED, RUN_DIR, FINAL, PRUNED_AT = "config", "seed", "run_dir", "final", "pruned_at"
ERROR, LOG = "error", "log"


def pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """W&B's hyperband settings as Optuna's HyperbandPruner; resources are validations at which
    the metric was logged (W&B counts iterations the same way: logged values of the metric).
    With max_iter and s, the first rung is max_iter / eta**s, as W&B's brackets place it."""
    settings = spec.early_terminate
    if settings is None:
        return optuna.pruners.NopPruner()
    eta = settings["eta"]
    minimum = settings.get("min_iter") or max(1, round(settings["max_iter"] / eta ** settings["s"]))
    return optuna.pruners.HyperbandPruner(
        min_resource=minimum, max_resource=settings.get("max_iter", "auto"), reduction_factor=round(eta)
    )


@dataclass(frozen=True)
class SweepStore:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    def log_file(self, trial: int) -> Path:
        return self.path / "trials" / f"{trial}.log"

    def exists(self) -> bool:
        return self.spec_file.is_file()

    def save(self, spec: SweepSpec, seeds: int) -> None:
        write_text_atomically(
            self.spec_file, yaml.safe_dump({"seeds": seeds, "spec": spec.raw}, sort_keys=False)
        )

    def load(self) -> tuple[SweepSpec, int]:
        """-> the spec the sweep was launched with, and its seed count."""
        if not self.exists():
            raise UserError(f"no local sweep at {self.path} (no spec.yaml)")
        saved = load_yaml_file(self.spec_file)
        if not (
            isinstance(saved, dict)
            and isinstance(saved.get("spec"), dict)
            and isinstance(saved.get("seeds"), int)
        ):
            raise UserError(
                f"{self.spec_file}: damaged (it must hold `seeds: N` and the sweep's `spec:`); restore it, or "
                "delete the sweep directory to start it over"
            )
        return parse_spec(saved["spec"], str(self.spec_file)), saved["seeds"]

    def storage(self) -> JournalStorage:
        self.path.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.path / "optuna.journal")))

    def study(
        self,
        spec: SweepSpec,
        sampler: optuna.samplers.BaseSampler | None = None,
        storage: JournalStorage | None = None,
    ) -> optuna.Study:
        """The sweep's study, created on first use; the pruner is rebuilt from the spec in every
        process that opens it, so controller and trials decide alike."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            storage=storage or self.storage(),
            study_name=self.id,
            direction=spec.goal,
            sampler=sampler,
            pruner=pruner(spec),
            load_if_exists=True,
        )

    def trial(self, spec: SweepSpec, number: int) -> optuna.trial.Trial:
        """A running trial, opened from another process (the trial's own) by its number."""
        storage = self.storage()
        study = self.study(spec, storage=storage)
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(self.id), number
        )
        return optuna.trial.Trial(study, trial_id)
