"""This node's identity in a cluster: `NODE_ID` (default host name + port), the address
peers reach it at (`NODE_ADDRESS`), the short tag its session ids carry, and a random
incarnation per process start.

A session id made on a clustered node ends in `.<tag>`: 8 hex digits of SHA-256 of the
node id. The proxy in front (deploy/nginx.conf.template) routes paths that name a
session straight to its owner by that tag; any other node forwards to the owner anyway,
so the tag is a shortcut, never trusted for anything.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from server.config import ConfigError, Settings

TAG_CHARS = 8
_TAG = re.compile(r"\.([0-9a-f]{" + str(TAG_CHARS) + r"})\Z")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")


class ClusterConfigError(ConfigError):
    """A cluster setting that cannot work (the message names it)."""


def node_tag(node_id: str) -> str:
    return hashlib.sha256(node_id.encode()).hexdigest()[:TAG_CHARS]


def session_tag(session_id: object) -> str | None:
    """The node tag a session id carries, if any."""
    if not isinstance(session_id, str):
        return None
    m = _TAG.search(session_id)
    return m.group(1) if m else None


def new_session_id(tag: str | None = None) -> str:
    """128 random bits (the session's capability), plus the owner's tag in a cluster."""
    sid = secrets.token_urlsafe(16)
    return f"{sid}.{tag}" if tag else sid


def _default_address(settings: Settings) -> str:
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    address: str  # http(s)://host:port, no path: where peers forward requests to
    tag: str
    incarnation: str
    started_at: float

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeIdentity:
        node_id = settings.node_id.strip() or f"{socket.gethostname()}:{settings.port}"
        if not _NODE_ID.fullmatch(node_id):
            raise ClusterConfigError(
                f"NODE_ID {node_id[:64]!r}: letters, digits and _ . : @ - only, 128 at most"
            )
        address = (settings.node_address.strip() or _default_address(settings)).rstrip("/")
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ClusterConfigError(
                f"NODE_ADDRESS {address[:80]!r} must be http(s)://host:port, without a path"
            )
        return cls(node_id, address, node_tag(node_id), secrets.token_hex(8), time.time())

    def to_json(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "tag": self.tag,
            "started_at": self.started_at,
        }
