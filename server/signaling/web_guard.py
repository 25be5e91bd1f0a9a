"""HTTP middlewares that decide which requests reach the routes at all (every route, the
Socket.IO endpoint included):

- trusted proxies: the client address, host and scheme come from `X-Forwarded-For`,
  `-Host` and `-Proto` only when the peer is listed in `TRUSTED_PROXIES`;
- Host check on a loopback-bound server: only localhost names (and `PUBLIC_URL`'s host),
  so a DNS-rebinding page cannot talk to a server on the operator's machine;
- CORS: a request with an `Origin` that is neither the server's own nor listed in
  `CORS_ORIGINS` is refused (403 `origin_not_allowed`), so another site's page can neither
  read answers nor trigger actions.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from server.config import Settings

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _refuse(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_networks(entries: list[str]) -> list[Network]:
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"TRUSTED_PROXIES: {entry!r} is not an IP address or network"
            ) from None
    return networks


def _in(address: str | None, networks: list[Network]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _last(request: web.Request, header: str) -> str | None:
    """The value the nearest proxy added (the right-most of a comma-separated list)."""
    values = ",".join(request.headers.getall(header, []))
    parts = [p.strip() for p in values.split(",") if p.strip()]
    return parts[-1] if parts else None


def forwarded_client(request: web.Request, networks: list[Network]) -> str | None:
    """The client address behind trusted proxies: the right-most X-Forwarded-For entry that
    is not itself a trusted proxy."""
    chain = ",".join(request.headers.getall("X-Forwarded-For", []))
    hops = [h.strip() for h in chain.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, networks):
            return hop
    return hops[0] if hops else None


def proxy_middleware(settings: Settings) -> Any:
    networks = parse_networks(settings.trusted_proxies)

    @web.middleware
    async def trusted_proxies(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote
        if networks and _in(peer, networks):
            changes: dict[str, Any] = {}
            client = forwarded_client(request, networks)
            if client:
                changes["remote"] = client
            host = _last(request, "X-Forwarded-Host")
            if host:
                changes["host"] = host
            proto = _last(request, "X-Forwarded-Proto")
            if proto in ("http", "https"):
                changes["scheme"] = proto
            if changes:
                request = request.clone(**changes)
        return await handler(request)

    return trusted_proxies


def hostname(host: str) -> str:
    """`example.com:5001` → `example.com`, `[::1]:5001` → `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(settings: Settings) -> frozenset[str]:
    names = set(LOOPBACK_NAMES)
    if settings.public_url:
        public = urlsplit(settings.public_url).hostname
        if public:
            names.add(public.lower())
    return frozenset(names)


def host_middleware(settings: Settings) -> Any:
    check = is_loopback(settings.host)
    names = allowed_hosts(settings)

    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if check and hostname(request.host) not in names:
            return _refuse(
                403,
                "host_not_allowed",
                "this server answers only to localhost names (set PUBLIC_URL for another)",
            )
        return await handler(request)

    return host_check


def own_origins(request: web.Request, settings: Settings) -> set[str]:
    own = {f"{request.scheme}://{request.host}".lower()}
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        own.add(f"{parts.scheme}://{parts.netloc}".lower())
    return own


def cors_middleware(settings: Settings) -> Any:
    listed = {o.rstrip("/").lower() for o in settings.cors_origins}
    allow_any = "*" in listed

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or origin.lower() in own_origins(request, settings):
            return await handler(request)
        if not (allow_any or origin.rstrip("/").lower() in listed):
            return _refuse(
                403, "origin_not_allowed", "cross-origin requests need the origin in CORS_ORIGINS"
            )
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = "*" if allow_any else origin
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, X-API-Token"
            )
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            if not allow_any:
                response.headers["Vary"] = "Origin"
        return response

    return cors
