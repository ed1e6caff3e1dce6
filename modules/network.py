"""Whether a service can be reached, found out once and fast, so that no command waits on a network
that is not there.

Asked an unreachable host, datasets retries for half a minute before it gives up (longer where a
firewall drops packets instead of refusing them), and W&B waits 90 seconds to start an online run.
One HEAD request answers in at most PROBE_SECONDS instead.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

import datasets
import huggingface_hub.constants

PROBE_SECONDS = 3.0


@functools.cache
def reachable(url: str) -> bool:
    """Does the server at `url` answer (with any HTTP status) within PROBE_SECONDS? One HEAD
    request, through the proxy the environment names, once per process and URL."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False  # no route, no name, refused, timed out, TLS failed, or not a URL
    return True


def hub_offline() -> bool:
    """True when the HuggingFace hub is not to be asked: offline by the user's settings
    (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), or unreachable, in which case datasets and
    huggingface_hub are switched to offline mode for the rest of the process (and the processes it
    starts): a name in the local HF cache still loads, any other fails at once."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return True
    if reachable(huggingface_hub.constants.ENDPOINT):
        return False
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return True
