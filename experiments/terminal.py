"""What polyhead's own commands (`convert`, `sweep`, `compare`) share at the terminal: an argparse whose
mistakes are UserErrors (which `polyhead` reports in its one-line form), and a rich console that
does not squeeze tables to 80 columns when output is piped or logged.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from rich.console import Console

from modules.errors import UserError

PIPED_WIDTH = 200  # a log file has no width; wide tables stay one line per row


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors naming the command and its usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(
            f"{self.prog.removeprefix('polyhead ')}: {message}; usage: {self.format_usage().strip().removeprefix('usage: ')}"
        )


def console() -> Console:
    width = None if sys.stdout.isatty() else max(PIPED_WIDTH, shutil.get_terminal_size().columns)
    return Console(width=width, soft_wrap=False)
