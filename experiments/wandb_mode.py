"""Whether this process uses W&B online, decided once for every `polyhead` command (fit, sweep,
compare), so that none of them waits on a W&B server that is not there: W&B waits 90 seconds to
start an online run, and its API client retries for longer.

Online needs credentials (WANDB_API_KEY, or a netrc entry for the server) and a server that answers
one quick probe; otherwise WANDB_MODE is set to offline for this process and those it starts.
A WANDB_MODE the user set wins.
"""

from __future__ import annotations

import netrc
import os
import sys
from urllib.parse import urlparse

from modules.errors import UserError
from modules.network import reachable

WANDB_SERVER = "https://api.wandb.ai"
DEFAULT_PROJECT = "polyhead"


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", WANDB_SERVER)


def has_wandb_credentials() -> bool:
    """An API key in the environment, or `wandb login`'s netrc entry for the server in use."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(wandb_server()).hostname or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def configure_wandb_mode() -> None:
    """Set WANDB_MODE=offline unless the user set a mode or W&B can be used online; say so when
    credentials exist but the server does not answer (the run can be uploaded later)."""
    os.environ.setdefault("WANDB_PROJECT", DEFAULT_PROJECT)
    if "WANDB_MODE" in os.environ:
        return
    if not has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    elif not reachable(wandb_server()):
        os.environ["WANDB_MODE"] = "offline"
        print(
            f"polyhead: W&B ({wandb_server()}) does not answer: logging offline; upload the run later "
            "with `wandb sync <run dir>`",
            file=sys.stderr,
        )


def wandb_online() -> bool:
    configure_wandb_mode()
    return os.environ["WANDB_MODE"] not in ("offline", "disabled", "dryrun")


def wandb_project() -> str:
    """The W&B project runs go to when none is named: $WANDB_PROJECT, else polyhead."""
    return os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT)


def require_wandb_online(who: str) -> None:
    """Refuse at once what only the W&B server can do (a W&B sweep), naming why it is offline."""
    if wandb_online():
        return
    if not has_wandb_credentials():
        reason = "there is no W&B API key (`wandb login` or WANDB_API_KEY)"
    else:
        reason = f"W&B is offline here (WANDB_MODE=offline: set by you, or {wandb_server()} did not answer)"
    raise UserError(f"{who} needs the W&B server, but {reason}; use --backend local")
