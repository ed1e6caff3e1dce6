"""Reading the user's YAML files (run configs, sweep specs) as data only, with a mistake reported
as the file, line and column and what YAML expected there, not as a parser traceback about "<unicode string>"."""

from __future__ import annotations

from pathlib import Path

import yaml

from modules.errors import UserError, one_line


def load_yaml_file(path: Path) -> object:
    """yaml.safe_load of the file: plain data, never objects built from tags."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or one_line(str(error))
        raise UserError(f"{path}{where}: not valid YAML ({problem}); fix the file") from None


def check_config_files(args: list[str]) -> None:
    """Read every `--config FILE` of a command line before LightningCLI does, so a broken file is
    named. An argument that is not a file (an inline YAML string) is left to the CLI."""
    for k, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if arg == "--config" and k + 1 < len(args):
            value = args[k + 1]
        if value is not None and Path(value).is_file():
            load_yaml_file(Path(value))
