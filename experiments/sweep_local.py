"""The local sweep controller: a W&B sweep spec run on this machine, no W&B server needed.

Every trial is its own `polyhead fit` process with its parameters on the command line (which is
what makes sweeps work under DDP: every rank parses the same arguments). Configurations come from
Optuna (grid points enqueued in W&B's order, `RandomSampler`, TPE for bayes) and hyperband early
termination is Optuna's `HyperbandPruner`, fed by `experiments.sweep_trial.SweepTrialReporter`
inside each trial. Up to `parallel` trials run at once. With `seeds` > 1 each configuration runs
once per seed (`--seed_everything=0..S-1`), each seed its own run.

State lives in the sweep's directory (experiments/sweep_store.py). A relaunch of the same spec
finds it and runs only what is missing: configurations x seeds never started, interrupted by a
killed controller, or failed (a failed trial is retried once per launch, so a fixed data file or
freed memory lets the sweep complete). A crashing trial is recorded as failed, with the error
read from its log, and the others go on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import optuna
from optuna.trial import FrozenTrial, TrialState

from experiments.sweep_space import check_local_support, configuration, grid_suggestions, search_space
from experiments.sweep_spec import SEED_KEY, SweepSpec
from experiments.sweep_store import CONFIG, ERROR, FINAL, LOG, PRUNED_AT, RUN_DIR, SEED, SweepStore
from modules.errors import UserError

STATE_NAMES = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}  # fmt: skip
REPORTER = "experiments.sweep_trial.SweepTrialReporter"
SETTLED = (TrialState.COMPLETE, TrialState.PRUNED)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?\w+(\.\w+)*(Error|Exception|Interrupt): ")


@dataclass
class TrialOutcome:
    """One configuration x seed as the sweep's summary shows it (its latest attempt)."""

    number: int
    state: str
    config: dict
    seed: int | None
    value: float | None = None
    run_dir: str | None = None
    error: str | None = None
    log: str | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialOutcome:
        attrs = trial.user_attrs
        value = trial.value if trial.state == TrialState.COMPLETE else attrs.get(FINAL)
        return cls(
            number=trial.number,
            state=STATE_NAMES[trial.state],
            config=attrs.get(CONFIG, {}),
            seed=attrs.get(SEED),
            value=value,
            run_dir=attrs.get(RUN_DIR),
            error=attrs.get(ERROR),
            log=attrs.get(LOG),
        )


@dataclass
class Work:
    """A configuration (as Optuna params; None: ask the sampler for a new one) and its seed."""

    suggestions: dict | None
    seed: int | None

    def key(self) -> str:
        return json.dumps([self.suggestions, self.seed], sort_keys=True)


@dataclass
class Running:
    trial: optuna.trial.Trial
    process: subprocess.Popen
    log: IO[str]
    started: float = field(default_factory=time.monotonic)


def trial_key(trial: FrozenTrial) -> str:
    return Work(trial.params, trial.user_attrs.get(SEED)).key()


def latest_attempts(study: optuna.Study) -> dict[str, FrozenTrial]:
    """The deciding attempt of each configuration x seed: a finished or pruned one if any, else
    the latest (trials a crashed controller left without a configuration are skipped)."""
    latest: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        key = trial_key(trial)
        settled = key in latest and latest[key].state in SETTLED
        if CONFIG in trial.user_attrs and not settled:
            latest[key] = trial
    return latest


def outcomes(store: SweepStore, spec: SweepSpec) -> list[TrialOutcome]:
    """The sweep's trials as they stand (readable while the sweep runs)."""
    return [
        TrialOutcome.of(t)
        for t in sorted(latest_attempts(store.study(spec)).values(), key=lambda t: t.number)
    ]


def last_error(path: Path) -> str:
    """What made a trial fail, from its log: its `polyhead: error: ...` line (a user mistake),
    else the first exception line of a traceback (the cause: under DDP the rank that broke first,
    before the others' "connection closed"), else the last line that is not W&B's closing chatter.
    Terminal colour codes are dropped."""
    lines = [ANSI.sub("", line).strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    user_errors = [line for line in lines if line.startswith("polyhead: error:")]
    exceptions = [line for line in lines if EXCEPTION_LINE.match(line)]
    own = [line for line in lines if not line.startswith("wandb:")]
    return (user_errors[-1:] or exceptions[:1] or own[-1:] or ["no output"])[0][:500]


class LocalSweep:
    def __init__(
        self,
        spec: SweepSpec,
        store: SweepStore,
        seeds: int = 1,
        parallel: int = 1,
        count: int | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        """count: the sweep's size in configurations (each run once per seed); a relaunch tops it
        up to `count`. A grid defaults to all of its points; random and bayes need it (or the
        spec's run_cap, which counts runs)."""
        check_local_support(spec)
        self.spec, self.store, self.parallel, self.echo = spec, store, parallel, echo
        self.seeds = list(range(seeds)) if seeds > 1 else [None]
        self.space = search_space(spec)
        limits = [n for n in (count, spec.run_cap and max(1, spec.run_cap // len(self.seeds))) if n]
        if spec.method == "grid":
            self.grid = grid_suggestions(spec)
            self.target = min([len(self.grid), *limits])
        elif limits:
            self.target = min(limits)
        else:
            raise UserError(
                f"{spec.method} search never ends by itself: give --count N (configurations) or a run_cap"
            )

    def sampler(self) -> optuna.samplers.BaseSampler:
        # unseeded: a relaunch must not propose the first configurations again
        return (
            optuna.samplers.TPESampler() if self.spec.method == "bayes" else optuna.samplers.RandomSampler()
        )

    @contextlib.contextmanager
    def lock(self):
        """Hold the sweep: one controller at a time. Trials inherit the lock, so a relaunch while a
        killed controller's trials still run is refused rather than running them twice."""
        self.store.path.mkdir(parents=True, exist_ok=True)
        with open(self.store.path / "controller.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(
                    f"sweep {self.store.id} is already running (its controller, or a trial left by a killed "
                    "one, still holds it); wait for it or stop it first"
                ) from None
            self.lock_fd = handle.fileno()
            yield

    def run(self) -> list[TrialOutcome]:
        """Run every missing trial; -> the latest attempt of every configuration x seed."""
        with self.lock():
            pending, configurations = self.resume()
            done = sum(1 for t in latest_attempts(self.study).values() if t.state in SETTLED)
            to_run = len(pending) + (self.target - len(configurations)) * len(self.seeds)
            self.echo(
                f"sweep {self.store.id} ({self.spec.method}, local): {self.target} configuration(s) x "
                f"{len(self.seeds)} seed(s); {done} run(s) done, {to_run} to run; state in {self.store.path}"
            )
            self._loop(pending, configurations)
        return outcomes(self.store, self.spec)

    def _trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.store.id)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def resume(self) -> tuple[list[Work], list[str]]:
        """Open the sweep's study (under the lock) and -> the configurations x seeds to run now,
        and the configurations the sweep has so far. Trials a killed controller left running
        (their processes are gone: a live one would hold the lock) or enqueued are marked failed
        first, so they are run again."""
        self.storage = self.store.storage()
        self.study = self.store.study(self.spec, self.sampler(), self.storage)
        for _ in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.tell(self.study.ask(), state=TrialState.FAIL)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.storage.set_trial_user_attr(self._trial_id(trial.number), ERROR, "interrupted")
            self.study.tell(trial.number, state=TrialState.FAIL)
        latest = latest_attempts(self.study)
        settled = {k for k, t in latest.items() if t.state in SETTLED}
        if self.spec.method == "grid":
            known = self.grid[: self.target]
        else:
            known = []
            for trial in sorted(latest.values(), key=lambda t: t.number):
                if trial.params not in known:
                    known.append(trial.params)
        pending = [Work(s, seed) for s in known for seed in self.seeds if Work(s, seed).key() not in settled]
        return pending, [json.dumps(s, sort_keys=True) for s in known]

    def _next(self, pending: list[Work], configurations: list[str]) -> Work | None:
        if pending:
            return pending.pop(0)
        if self.spec.method != "grid" and len(configurations) < self.target:
            return Work(None, self.seeds[0])
        return None

    def _loop(self, pending: list[Work], configurations: list[str]) -> None:
        running: dict[int, Running] = {}
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while True:
                while len(running) < self.parallel and (work := self._next(pending, configurations)):
                    started = self._start(work)
                    running[started.trial.number] = started
                    if work.suggestions is None:  # a new configuration: its other seeds come next
                        configurations.append(json.dumps(started.trial.params, sort_keys=True))
                        pending[:0] = [Work(started.trial.params, seed) for seed in self.seeds[1:]]
                if not running:
                    return
                finished = [n for n, r in running.items() if r.process.poll() is not None]
                for number in finished:
                    self._finish(running.pop(number))
                if not finished:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            for entry in running.values():
                entry.process.terminate()
            for entry in running.values():
                try:
                    entry.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    entry.process.kill()
                entry.log.close()
                entry.trial.set_user_attr(ERROR, "interrupted")
                self.study.tell(entry.trial, state=TrialState.FAIL)
            raise UserError(
                f"sweep {self.store.id} interrupted; relaunch the same command to resume it"
            ) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _start(self, work: Work) -> Running:
        if work.suggestions is not None:
            self.study.enqueue_trial(work.suggestions, user_attrs={SEED: work.seed})
        trial = self.study.ask(self.space)
        config = configuration(self.spec, trial.params)
        trial.set_user_attr(CONFIG, config)
        trial.set_user_attr(SEED, work.seed)
        log_path = self.store.log_file(trial.number)
        trial.set_user_attr(LOG, str(log_path))
        values = config if work.seed is None else config | {SEED_KEY: work.seed}
        reporter = {
            "class_path": REPORTER,
            "init_args": {"sweep_dir": str(self.store.path.resolve()), "trial": trial.number},
        }
        command = [sys.executable, "-m", "experiments.cli", "fit", *self.spec.fit_arguments(values),
                   "--trainer.callbacks+", json.dumps(reporter)]  # fmt: skip
        seed_note = "" if work.seed is None else f", seed {work.seed}"
        self.echo(f"trial {trial.number}: {_describe(config, self.spec)}{seed_note}")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in _finish)
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(trial.number),
            pass_fds=(self.lock_fd,),
            # out of the terminal's process group: Ctrl+C reaches the controller alone, which stops
            # each trial with one SIGTERM (saved at a step boundary); a second signal would stop it
            # at once, without its checkpoint
            start_new_session=True,
        )
        return Running(trial, process, log)

    def _environment(self, number: int) -> dict[str, str]:
        """The trial's W&B run joins the sweep's group and carries its tag; with several trials at
        once each gets an equal share of the CPU threads."""
        env = dict(os.environ)
        env.update(
            WANDB_RUN_ID="".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)),
            WANDB_RUN_GROUP=self.store.id,
            WANDB_TAGS=f"sweep,{self.store.id}",
            WANDB_NAME=f"{self.store.id}-{number}",
        )
        if self.parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))
        return env

    def _finish(self, entry: Running) -> None:
        entry.log.close()
        trial, code = entry.trial, entry.process.returncode
        attrs = self.storage.get_trial_user_attrs(self._trial_id(trial.number))
        seconds = f"{time.monotonic() - entry.started:.0f} s"
        metric = self.spec.metric
        if code != 0:
            error = last_error(Path(attrs[LOG]))
            trial.set_user_attr(ERROR, f"exit {code}: {error}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.echo(f"trial {trial.number}: failed (exit {code}) after {seconds}: {error}")
        elif PRUNED_AT in attrs:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.echo(
                f"trial {trial.number}: pruned by hyperband after validation {attrs[PRUNED_AT]} ({seconds})"
            )
        elif metric and (attrs.get(FINAL) is None or not math.isfinite(attrs[FINAL])):
            problem = "never logged" if attrs.get(FINAL) is None else f"ended at {attrs[FINAL]}"
            trial.set_user_attr(ERROR, f"the metric {metric} {problem}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.echo(f"trial {trial.number}: failed: {metric} {problem} (see {attrs[LOG]})")
        else:
            # without a metric (grid and random may have none) the study still needs a number
            self.study.tell(trial, attrs.get(FINAL, 0.0))
            result = f"{metric} = {attrs[FINAL]:.6g}" if metric else "finished"
            self.echo(f"trial {trial.number}: {result} ({seconds})")


def _describe(config: dict, spec: SweepSpec) -> str:
    swept = {p.name for p in spec.swept}
    return ", ".join(f"{name}={value}" for name, value in config.items() if name in swept) or "constants only"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
