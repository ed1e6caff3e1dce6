"""Runs read back as plain data (config, summary, metric history, state) for `polyhead compare`
and sweeps: offline from a run directory's `run-*.wandb` transaction log, online through
`wandb.Api`. Both give the same `Run`, so the comparison code never knows where a run came from.

An offline run writes no `wandb-summary.json`; everything is in the transaction log, a LevelDB-style
log of `wandb.proto` `Record` messages. `read_records` reads that framing itself (W&B ships no
public reader for it), checking each fragment's CRC, and stops at a torn tail (a run still writing,
or killed mid-write) rather than failing.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from experiments.wandb_mode import wandb_project
from modules.errors import UserError, one_line

FILE_HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version
FRAGMENT_HEADER = struct.Struct("<IHB")  # crc32 of (type byte, data), data length, fragment type
BLOCK_SIZE = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
STEP_KEY = "trainer/global_step"  # the x axis Lightning's W&B logger writes with every row


@dataclass
class Run:
    """One training run. `config` is the nested logged config; `history` holds one dict per
    logged row (scalars only); `state`: finished, failed, crashed, running (or killed)."""

    id: str
    name: str
    path: str  # the run directory, or "entity/project/id" online
    project: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    state: str = "running"
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    root: str = ""  # the directory holding the run's wandb/ folder: its logger's save_dir

    def series(self, metric: str) -> tuple[list[float], list[float]]:
        """(steps, values) of every logged row that has `metric`."""
        rows = [row for row in self.history if isinstance(row.get(metric), int | float)]
        steps = [row.get(STEP_KEY, row.get("_step", i)) for i, row in enumerate(rows)]
        return steps, [float(row[metric]) for row in rows]

    def checkpoint(self, metric: str | None) -> Path | None:
        """The checkpoint that goes with this run's `metric`: the checkpoint callback's best file
        when it monitored that metric, else last.ckpt (the weights that produced the final
        values). Looked up where Lightning put it: `checkpoint.dirpath`, or by default
        <logger save_dir>/<project>/<run id>/checkpoints. None when it is not on this machine."""
        settings = self.config.get("checkpoint") or {}
        directory = Path(settings["dirpath"]) if settings.get("dirpath") else None
        if directory is None and self.root:
            directory = Path(self.root) / self.project / self.id / "checkpoints"
        if directory is None or not directory.is_dir():
            return None
        monitored = sorted(p for p in directory.glob("*.ckpt") if not p.name.startswith("last"))
        if metric and settings.get("monitor") == metric and len(monitored) == 1:
            return monitored[0]
        last = directory / "last.ckpt"
        return last if last.is_file() else None


def read_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """The `Record` messages of a `.wandb` file in order."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        raise UserError(f"{path}: not a W&B transaction log (.wandb)")
    offset, pieces = FILE_HEADER.size, []
    while offset + FRAGMENT_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < FRAGMENT_HEADER.size:  # a block's tail too short for a header is padding
            offset += left_in_block
            continue
        checksum, length, kind = FRAGMENT_HEADER.unpack_from(data, offset)
        start = offset + FRAGMENT_HEADER.size
        payload = data[start : start + length]
        if kind == 0 and length == 0:  # zero padding up to the block's end
            offset += left_in_block
            continue
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            return  # a torn tail: the writer stopped mid-record
        offset = start + length
        if kind in (FULL, FIRST):
            pieces = [payload]
        elif kind in (MIDDLE, LAST) and pieces:
            pieces.append(payload)
        if kind in (FULL, LAST) and pieces:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def _item_value(item):
    """A history / summary / config item's value: typed fields (newer writers) or JSON text."""
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind == "none":
        return None
    if kind in ("boolean", "integer", "number", "text"):
        return getattr(item, kind)
    if kind == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def _item_key(item) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _apply(target: dict, updates, removes=()) -> None:
    for item in updates:
        *parents, leaf = _item_key(item)
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _item_value(item)
    for item in removes:
        *parents, leaf = _item_key(item)
        node = target
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)


def flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def read_run_dir(path: str | Path) -> Run:
    """A run directory (`.../offline-run-<time>-<id>`, or its `.wandb` file) -> Run. The summary is
    each key's last logged value with the run's explicit summary updates applied on top, which is
    how W&B builds it."""
    path = Path(path)
    log = path if path.suffix == ".wandb" else next(iter(sorted(path.glob("run-*.wandb"))), None)
    if log is None or not log.is_file():
        raise UserError(f"{path}: not a W&B run directory (no run-*.wandb inside)")
    # <save_dir>/wandb/<run dir>/run-<id>.wandb: found here, so absolute however the run named it
    run = Run(id="", name="", path=str(log.parent.resolve()), root=str(log.parent.resolve().parent.parent))
    explicit_summary: dict = {}
    exit_code = None
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = record.run
            run.id, run.project, run.group = info.run_id, info.project, info.run_group
            run.name, run.tags = info.display_name or info.run_id, list(info.tags)
            _apply(run.config, info.config.update)
        elif kind == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            row: dict = {}
            _apply(row, record.history.item)
            row = flatten(row)
            run.history.append({k: v for k, v in row.items() if isinstance(v, int | float | str | None)})
        elif kind == "summary":
            _apply(explicit_summary, record.summary.update, record.summary.remove)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    for row in run.history:
        run.summary.update({k: v for k, v in row.items() if v is not None})
    run.summary.update(flatten(explicit_summary))
    run.state = "running" if exit_code is None else ("finished" if exit_code == 0 else "failed")
    return run


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every W&B run directory (offline or synced) under `root`, oldest first."""
    return sorted({log.parent for log in Path(root).glob("**/run-*.wandb")}, key=lambda p: p.name)


def sweep_path(sweep: str, project: str | None = None, entity: str | None = None) -> str:
    """entity/project/id of a W&B sweep, filling what a bare id or project/id leaves out (the
    project: `project`, else $WANDB_PROJECT or polyhead; the entity: `entity`, else $WANDB_ENTITY
    or the key's default entity)."""
    import wandb

    parts = sweep.split("/")
    if len(parts) == 3:
        return sweep
    project = parts[0] if len(parts) == 2 else project or wandb_project()
    entity = entity or os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
    return f"{entity}/{project}/{parts[-1]}"


def online_sweep(sweep: str) -> tuple[list[Run], dict | None]:
    """A W&B sweep's runs and its `metric` setting ({"name", "goal"}, or None), from the server
    (needs an API key and the network)."""
    import wandb

    with _wandb_errors():
        remote = wandb.Api().sweep(sweep_path(sweep))
        return [_from_api(run) for run in remote.runs], remote.config.get("metric")


def online_runs(*, group: str | None = None, project: str | None = None) -> list[Run]:
    """Runs from the W&B server (needs an API key and the network): a group, or a whole project."""
    import wandb

    with _wandb_errors():
        api = wandb.Api()
        path = project or f"{api.default_entity}/{wandb_project()}"
        runs = list(api.runs(path, filters={"group": group} if group else None))
    return [_from_api(run) for run in runs]


@contextlib.contextmanager
def _wandb_errors():
    """What the W&B server or its client refuses (no such sweep, project or key) -> one UserError line."""
    import wandb

    try:
        yield
    except (wandb.errors.CommError, wandb.errors.UsageError, ValueError) as error:
        raise UserError(f"W&B: {one_line(str(error))}") from None


def _from_api(remote) -> Run:
    history = [
        {k: v for k, v in row.items() if isinstance(v, int | float | str | None)}
        for row in remote.scan_history()
    ]
    return Run(
        id=remote.id,
        name=remote.name,
        path="/".join(remote.path),
        project=remote.project,
        group=remote.group or "",
        tags=list(remote.tags),
        state=remote.state,
        config={k: v for k, v in remote.config.items() if not k.startswith("_")},
        summary=flatten(dict(remote.summary)),
        history=history,
    )


def online_checkpoint(run: Run) -> Path | None:
    """A W&B run's checkpoint as a model artifact (logged with `log_model`), downloaded: the
    version aliased "best" if there is one, else "latest". None when the run logged no model."""
    import wandb

    remote = wandb.Api().run(run.path)
    models = [a for a in remote.logged_artifacts() if a.type == "model"]
    for alias in ("best", "latest"):
        for artifact in models:
            if alias in artifact.aliases:
                files = sorted(Path(artifact.download()).glob("*.ckpt"))
                return files[0] if files else None
    return None
