"""Loopback-only network namespace detection for tests that open browsers or WebRTC peers.

Outside a private namespace Chromium (and aioice) gather the machine's real interface
addresses, which would break the rule that tests only talk to 127.0.0.1. The Makefile runs
the suite under `unshare --net` with `lo` up; these helpers tell a test whether it is in
such a namespace and skip (locally) or fail (under CI) when it is not.
"""

from __future__ import annotations

import os
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def in_loopback_only_netns() -> bool:
    """True when `lo` is the only network interface visible to this process."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return False
    return names == ["lo"]


def require_netns() -> None:
    """Skip the calling test outside a loopback-only namespace; under CI=true, fail instead,
    so a misconfigured CI run cannot pass by skipping everything."""
    if in_loopback_only_netns():
        return
    reason = (
        "needs a loopback-only network namespace "
        "(run: unshare --net bash -c 'ip link set lo up && exec \"$@\"' netns pytest ...)"
    )
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)
