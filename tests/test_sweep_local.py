"""Local sweeps end to end, with real `polyhead fit` trials on the quickstart (tiny steps):

- a 2 x 2 grid whose trials on one side first fail (their corpus file does not exist yet): they are
  recorded as failed, the others finish; once the file exists, a relaunch runs only those two.
  The sweep then holds exactly 4 offline W&B runs with the right parameters, and `compare` shows 4
  rows whose numbers equal what `wandb leet inspect` reads from the run files;
- a 2-process DDP trial receives its parameters on every rank;
- a killed controller's trials are run again, finished ones are not.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from experiments.cli import main as cli_main
from experiments.compare_command import best_checkpoint, compare
from experiments.runs import read_records, read_run_dir
from experiments.sweep_local import LocalSweep, outcomes
from experiments.sweep_spec import parse_spec
from experiments.sweep_store import CONFIG, SEED, SweepStore
from modules.errors import UserError

from .conftest import ROOT, SEED_CORPUS, offline_env

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
TINY = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--model.backbone.d_model=32", "--model.backbone.n_heads=2", "--model.backbone.d_ff=64",
        "--trainer.enable_progress_bar=false", "--data.batch_size=8", "--trainer.num_sanity_val_steps=0",
        "--model.tasks.summarize.init_args.generation.max_new_tokens=2"]  # fmt: skip
LEARNING_RATES = [1e-3, 1e-2]


def sweep(spec: Path, tmp: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "sweep",
            str(spec),
            "--sweeps-dir",
            str(tmp / "sweeps"),
            *options,
        ],
        cwd=ROOT,
        env=offline_env(tmp) | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def leet(*args: str) -> str:
    wandb = str(Path(sys.executable).with_name("wandb"))
    return subprocess.run(
        [wandb, "leet", "inspect", *args], capture_output=True, text=True, timeout=60
    ).stdout


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    late = tmp / "late.jsonl"  # the corpus two trials read: missing at the first launch
    spec = tmp / "grid.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "grid",
                "method": "grid",
                "metric": {"name": "val/loss", "goal": "minimize"},
                "parameters": {
                    "model.optimizer.lr": {"values": LEARNING_RATES},
                    "data.sources.mlm_nsp.path": {"values": [str(SEED_CORPUS), str(late)]},
                },
                "command": [
                    "${env}",
                    "polyhead",
                    "fit",
                    "--config",
                    QUICKSTART,
                    *TINY,
                    f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
                    "${args}",
                ],  # fmt: skip
            }
        )
    )
    first = sweep(spec, tmp, "--parallel", "2")
    shutil.copy(SEED_CORPUS, late)
    second = sweep(spec, tmp, "--parallel", "2")
    sweep_id = re.search(r"^sweep (\S+) \(grid, local\)", first.stdout, re.M).group(1)
    return {"tmp": tmp, "late": str(late), "first": first, "second": second, "id": sweep_id, "spec": spec}


def started(output: str) -> list[str]:
    """The configurations of the trials a launch started, in order."""
    return re.findall(r"^trial \d+: (data\.sources\.mlm_nsp\.path=.*)$", output, re.M)


def test_failed_trials_are_recorded_and_a_relaunch_runs_only_them(grid_sweep):
    first, second, late = grid_sweep["first"], grid_sweep["second"], grid_sweep["late"]
    assert first.returncode == 1, first.stderr[-3000:]
    assert len(started(first.stdout)) == 4
    failures = re.findall(r"^trial \d+: failed \(exit 1\) after \d+ s: (.*)$", first.stdout, re.M)
    assert len(failures) == 2 and all("file not found" in f and "late.jsonl" in f for f in failures), (
        first.stdout
    )
    assert len(re.findall(r"^trial \d+: val/loss = ", first.stdout, re.M)) == 2, "the others finish"
    assert first.stderr.strip().splitlines()[-1].startswith("polyhead: error: 2 of 4 trial(s) of sweep")

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "2 run(s) done, 2 to run" in second.stdout
    assert started(second.stdout) == [
        f"data.sources.mlm_nsp.path={late}, model.optimizer.lr={lr}" for lr in LEARNING_RATES
    ]
    store = SweepStore(grid_sweep["tmp"] / "sweeps" / grid_sweep["id"])
    spec, _ = store.load()
    assert [o.state for o in outcomes(store, spec)] == ["finished"] * 4
    assert "state" in second.stdout and second.stdout.count("finished") >= 4  # the summary table


def test_the_sweep_leaves_one_offline_run_per_configuration(grid_sweep):
    tmp, late = grid_sweep["tmp"], grid_sweep["late"]
    run_dirs = sorted((tmp / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 4
    seen = set()
    for run_dir in run_dirs:
        run = json.loads(leet("--summary", "--json", str(run_dir)))
        config = run["config"]
        seen.add((config["model"]["optimizer"]["lr"], config["data"]["sources"]["mlm_nsp"]["path"]))
        assert run["state"] == "finished" and grid_sweep["id"] in run["tags"]
        assert read_run_dir(run_dir).group == grid_sweep["id"], "runs are grouped by sweep"
    assert seen == {(lr, path) for lr in LEARNING_RATES for path in (str(SEED_CORPUS), late)}

    # a log cut mid-record (a run killed while writing) reads up to the cut
    log = next(run_dirs[0].glob("run-*.wandb"))
    cut = tmp / "cut.wandb"
    cut.write_bytes(log.read_bytes()[: int(log.stat().st_size * 0.6)])
    assert 0 < len(list(read_records(cut))) < len(list(read_records(log)))


def test_compare_shows_the_values_in_the_run_files(grid_sweep, capsys):
    tmp, sweep_id = grid_sweep["tmp"], grid_sweep["id"]
    where = ["--sweep", sweep_id, "--sweeps-dir", str(tmp / "sweeps")]
    table, plots = tmp / "table.csv", tmp / "plots"
    compare([*where, "--csv", str(table), "--markdown", str(tmp / "table.md"), "--plots", str(plots)])
    printed = capsys.readouterr().out
    assert "4 run(s), 4 configuration(s)" in printed
    records = list(csv.DictReader(table.read_text().splitlines()))
    assert [r["row"] for r in records] == ["1", "2", "3", "4"]
    finals = []
    for record in records:
        (run_dir,) = (tmp / "runs" / "wandb").glob(f"offline-run-*-{record['run_ids']}")
        summary = json.loads(leet("--summary", "--json", str(run_dir)))["summary"]
        history = [json.loads(line)["history"]["item"] for line in leet("--json", str(run_dir)).splitlines()
                   if '"type":"history"' in line]  # fmt: skip
        logged = [row["val/loss"] for row in history if "val/loss" in row]
        assert len(logged) == 2, "two validations in 4 steps"
        assert float(record["val/loss final mean"]) == summary["val/loss"]
        assert float(record["val/loss best mean"]) == min(logged)
        assert f"{summary['val/loss']:.4g}" in printed
        finals.append(summary["val/loss"])
    assert finals == sorted(finals), "best first"
    assert (
        sum(line.startswith("| ") for line in (tmp / "table.md").read_text().splitlines()) == 5
    )  # header, 4 rows
    for name in (
        "val_loss_curves.png",
        "val_loss_vs_model.optimizer.lr.png",
        "val_loss_vs_data.sources.mlm_nsp.path.png",
    ):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    compare([*where, "--best"])
    checkpoint = capsys.readouterr().out.strip()
    best_run = records[0]["run_ids"]
    assert Path(checkpoint).is_file() and f"/{best_run}/checkpoints/" in checkpoint
    assert best_checkpoint(str(tmp / "sweeps" / sweep_id)) == checkpoint, "a sweep named by its directory"

    blocked = tmp / "table.md" / "under-a-file.csv"  # a file where its directory should be
    with pytest.raises(UserError, match=rf"compare --csv {re.escape(str(blocked))}: cannot write it"):
        compare([*where, "--csv", str(blocked)])


def test_init_from_best_fine_tunes_from_the_sweeps_best_checkpoint(grid_sweep, tmp_path, monkeypatch, capsys):
    """`--model.init_from best:SWEEP` resolves to the checkpoint `compare --best` names."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sweeps").symlink_to(grid_sweep["tmp"] / "sweeps")  # the default sweeps dir
    monkeypatch.chdir(tmp_path)
    best = best_checkpoint(grid_sweep["id"])
    with pytest.raises(SystemExit) as printed:
        cli_main(
            ["fit", "--config", QUICKSTART, "--model.init_from", f"best:{grid_sweep['id']}", "--print_config"]
        )
    assert printed.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_from"] == best


def test_ctrl_c_stops_each_trial_with_one_signal_so_it_saves_its_checkpoint(tmp_path):
    """Ctrl+C signals the terminal's whole process group. Only the controller may get it: it stops
    each trial with one SIGTERM, which the trial answers by saving last.ckpt at a step boundary (a
    second signal, had the trial got the terminal's too, would stop it at once without one)."""
    spec = tmp_path / "long.yaml"
    spec.write_text(yaml.safe_dump({
        "method": "grid",
        "parameters": {"model.optimizer.lr": {"values": [1e-3]}},
        "command": ["${env}", "polyhead", "fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=100000",
                    "--trainer.limit_val_batches=0", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
                    "--checkpoint.monitor=null", "--trainer.logger=false", "${args}"],
    }))  # fmt: skip
    controller = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "sweep", str(spec), "--sweeps-dir", str(tmp_path / "sweeps")],
        cwd=ROOT, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a shell gives a job
        # as a terminal's job has it: a suite started in the background by a script (`pytest &`)
        # ignores SIGINT, and the controller would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    logs = tmp_path / "sweeps"
    deadline = time.monotonic() + 300
    while not any("Total params" in p.read_text() for p in logs.rglob("trials/*.log")):  # the model summary
        assert controller.poll() is None and time.monotonic() < deadline, controller.communicate()
        time.sleep(0.5)
    time.sleep(3)  # a few steps in
    os.killpg(controller.pid, signal.SIGINT)
    out, err = controller.communicate(timeout=120)
    assert controller.returncode != 0 and "interrupted; relaunch the same command to resume it" in err, err
    (log,) = logs.rglob("trials/*.log")
    last = log.read_text().strip().splitlines()[-1]
    assert re.fullmatch(
        r"polyhead: stopped by SIGTERM after step \d+; checkpoint saved to .*last\.ckpt; .*", last
    ), last
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_a_ddp_trial_gets_its_parameters_on_every_rank(tmp_path):
    """Two CPU processes under DDP: rank 1 builds its optimizer with the swept learning rate (the
    trial's command line reaches every rank; W&B's agent config would reach rank 0 only), and the
    pruning decision is shared by both ranks."""
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    del config["model"]["tasks"]["summarize"], config["data"]["sources"]["summarize"]  # no ROUGE under DDP
    two_tasks = tmp_path / "two_tasks.yaml"
    two_tasks.write_text(yaml.safe_dump(config))
    probe = json.dumps(
        {"class_path": "tests.sweep_probe.RecordSweptValue", "init_args": {"prefix": str(tmp_path / "seen")}}
    )
    spec = tmp_path / "ddp.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "metric": {"name": "val/loss", "goal": "minimize"},
                "parameters": {"model.optimizer.lr": {"values": [0.0123]}},
                "early_terminate": {"type": "hyperband", "min_iter": 1},
                "command": [
                    "polyhead",
                    "fit",
                    "--config",
                    str(two_tasks),
                    "--trainer.max_steps=2",
                    "--trainer.val_check_interval=1",
                    "--trainer.num_sanity_val_steps=0",
                    "--model.backbone.d_model=32",
                    "--model.backbone.n_heads=2",
                    "--model.backbone.d_ff=64",
                    "--trainer.accelerator=cpu",
                    "--trainer.devices=2",
                    "--trainer.strategy=ddp",
                    f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                    "--trainer.callbacks+",
                    probe,
                    "${args}",
                ],  # fmt: skip
            }
        )
    )
    result = sweep(spec, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^trial 0: val/loss = ", result.stdout, re.M)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen.rank{rank}.json").read_text())
        assert seen == {"lr": 0.0123, "world_size": 2}, rank


def test_a_killed_controller_s_trials_run_again_and_finished_ones_do_not(tmp_path):
    spec = parse_spec(
        {
            "method": "grid",
            "metric": {"name": "val/loss"},
            "parameters": {"model.optimizer.lr": {"values": [1e-3, 1e-2, 1e-1]}},
            "command": ["polyhead", "fit", "${args}"],
        }
    )
    store = SweepStore(tmp_path / "sweeps" / "killed")
    store.save(spec, seeds=2)
    # what a controller killed mid-sweep leaves: lr 1e-3 done for both seeds, lr 1e-2 seed 0 running,
    # a trial enqueued but never started
    study = store.study(spec)
    space = {"model.optimizer.lr": optuna.distributions.CategoricalDistribution([0, 1, 2])}
    for seed in (0, 1):
        study.enqueue_trial(
            {"model.optimizer.lr": 0}, user_attrs={SEED: seed, CONFIG: {"model.optimizer.lr": 1e-3}}
        )
        study.tell(study.ask(space), 2.0)
    study.enqueue_trial({"model.optimizer.lr": 1}, user_attrs={SEED: 0, CONFIG: {"model.optimizer.lr": 1e-2}})
    study.ask(space)
    study.enqueue_trial({"model.optimizer.lr": 2})

    controller = LocalSweep(spec, store, seeds=2)
    with controller.lock():
        pending, _ = controller.resume()
    assert [(w.suggestions, w.seed) for w in pending] == [
        ({"model.optimizer.lr": 1}, 0),
        ({"model.optimizer.lr": 1}, 1),
        ({"model.optimizer.lr": 2}, 0),
        ({"model.optimizer.lr": 2}, 1),
    ]
    states = [t.state for t in store.study(spec).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert [o.error for o in outcomes(store, spec)] == [None, None, "interrupted"]


def test_hyperband_prunes_a_lagging_trial_through_the_journal(tmp_path):
    """What a trial's reporter does at each validation, in separate storage connections as the
    trial processes have: report the metric to the sweep's journal, ask the pruner. A trial far
    behind finished ones is stopped at a rung; one ahead of them is not."""
    spec = parse_spec(
        {
            "method": "random",
            "metric": {"name": "val/loss", "goal": "minimize"},
            "parameters": {"model.optimizer.lr": {"min": 0.0001, "max": 0.01}},
            "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 3},
            "command": ["polyhead", "fit", "${args}"],
        }
    )
    store = SweepStore(tmp_path / "sweeps" / "hyperband")
    store.save(spec, seeds=1)
    controller = store.study(spec, optuna.samplers.RandomSampler(seed=0))

    def validations(values: list[float]) -> int | None:
        """Run one trial's reports; -> the validation at which it was told to stop, or None."""
        number = controller.ask(
            {"model.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
        ).number
        trial = store.trial(spec, number)  # opened afresh, as the trial process opens it
        for step, value in enumerate(values, 1):
            trial.report(value, step)
            if trial.should_prune():
                controller.tell(number, state=TrialState.PRUNED)
                return step
        controller.tell(number, values[-1])
        return None

    for i in range(12):
        assert validations([3.0 - 0.1 * step - 0.01 * i for step in range(9)]) is None
    assert validations([9.0] * 9) is not None, "far behind: stopped at a rung"
    assert validations([1.0] * 9) is None, "ahead of every finished trial: runs to the end"
