"""ICE servers handed to browsers, with ephemeral TURN credentials (the TURN REST API).

A browser behind a strict NAT needs a TURN relay. Static TURN credentials in a page can be
copied and used by anyone, so pages never see them: the server shares a secret with the
TURN server (coturn's `use-auth-secret` / `static-auth-secret`) and gives each client a
username `<expiry>:<name>` with the password base64(HMAC-SHA1(secret, username)), valid
until the expiry. The TURN server checks both without asking us. Entries of
RTC_ICE_SERVERS are the server's own: pages get their URLs only, never their credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from server.config import Settings


def turn_credentials(
    secret: str, name: str, ttl_s: int, now: float | None = None
) -> tuple[str, str]:
    """(username, password) valid for `ttl_s` seconds from `now`."""
    expiry = int(now if now is not None else time.time()) + max(1, ttl_s)
    username = f"{expiry}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def client_ice_servers(
    settings: Settings, name: str, now: float | None = None
) -> list[dict[str, Any]]:
    """What a page may use: STUN URLs from RTC_ICE_SERVERS (no credentials) and, when a
    TURN secret is set, TURN_URLS with fresh ephemeral credentials for `name`."""
    servers: list[dict[str, Any]] = []
    for entry in settings.rtc_ice_servers:
        urls = entry.get("urls")
        urls = [urls] if isinstance(urls, str) else list(urls or [])
        stun = [u for u in urls if isinstance(u, str) and u.lower().startswith(("stun:", "stuns:"))]
        if stun:
            servers.append({"urls": stun})
    if settings.turn_secret and settings.turn_urls:
        username, password = turn_credentials(settings.turn_secret, name, settings.turn_ttl_s, now)
        servers.append({"urls": list(settings.turn_urls), "username": username,
                        "credential": password})
    return servers
