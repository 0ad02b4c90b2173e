"""Hugging Face Hub reachability, shared by every loader (checkpoints, tokenizers, datasets).

huggingface_hub and datasets retry a failed connection with backoff for the better part of a minute
per file. A loader that will need the Hub asks `require_hub` first: it answers at once when offline
mode is on, and after one short TCP probe otherwise, with a message that names the offline fixes.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
import urllib.request
from typing import Final

HUB_PROBE_TIMEOUT_S: Final[float] = 3.0  # a reachable Hub answers a TCP connect well within this
HTTPS_DEFAULT_PORT: Final[int] = 443
# `org/name`, with the characters the Hub allows in both parts.
HUB_ID_PATTERN: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TRUE_STRINGS: Final[frozenset[str]] = frozenset({"1", "on", "yes", "true"})


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub cannot be reached and what was asked for is not in the local HF cache."""


def looks_like_hub_id(name: str) -> bool:
    """True for 'org/name'; relative paths such as './x', '~/x' or 'a/../b' never look like ids."""
    return bool(HUB_ID_PATTERN.fullmatch(name)) and ".." not in name and "--" not in name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read from the environment now (huggingface_hub reads it once, at import)."""
    import huggingface_hub

    from_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_STRINGS
    return from_env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def probe_hub() -> str | None:
    """Why the Hub endpoint (or the HTTPS proxy in front of it) refuses a TCP connection; None if it accepts."""
    import huggingface_hub

    endpoint = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or HTTPS_DEFAULT_PORT
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or HTTPS_DEFAULT_PORT
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as error:  # DNS failure, refused, unreachable network, timeout
        return f"cannot connect to {host}:{port}: {error}"


def unreachable_message(what: str, repo_id: str, reason: str, fixes: str) -> str:
    import huggingface_hub

    return (f"cannot load {what} {repo_id!r}: the Hugging Face Hub ({huggingface_hub.constants.ENDPOINT}) cannot "
            f"be reached ({reason}) and it is not in the local Hugging Face cache. Fixes: {fixes}")


def require_hub(what: str, repo_id: str, fixes: str) -> None:
    """Raises HubUnreachableError at once when the Hub cannot be used; returns when it can."""
    if hub_offline():
        raise HubUnreachableError(unreachable_message(what, repo_id, "HF_HUB_OFFLINE is set", fixes))
    reason = probe_hub()
    if reason is not None:
        raise HubUnreachableError(unreachable_message(what, repo_id, reason, fixes))


def caused_by_connection_failure(error: BaseException) -> bool:
    """True when a network failure sits anywhere in the error's __cause__ / __context__ chain.

    transformers and datasets re-raise Hub failures as bare OSErrors or their own types.
    """
    from huggingface_hub import errors as hub_errors

    network = (ConnectionError, TimeoutError, socket.gaierror, hub_errors.LocalEntryNotFoundError,
               hub_errors.OfflineModeIsEnabled)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, network):
            return True
        current = current.__cause__ or current.__context__
    return False
