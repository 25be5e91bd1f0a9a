"""Node to node: a request for a session another node owns is passed to the owner, and
its answer (status, body, Retry-After...) returned to the client unchanged.

Authentication. Every forwarded request is signed with `CLUSTER_SECRET`: an HMAC-SHA256
over the time, the sending node, the method and path, and the identity claims the owner
will believe — the client's address (the per-address start limit, logs), the host and
scheme the client used, the transport (`via`) and the hop count. The owner takes those
claims from a request only when the signature is valid and at most `MAX_SKEW_S` old; a
request that carries any of these headers without a valid signature is refused (403
`forwarding_refused`), so a client cannot pose as a peer. The client's role is never a
claim: the client's own token travels with the request and the owner authorises it
itself, so a peer cannot grant more than the token does. The body is not signed: the
inter-node network must be private (or NODE_ADDRESS https), as for any proxy.

Loops: a forwarded request carries its hop count; a node never forwards a request that
was forwarded to it, it answers it itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from server.errors import ProctorError

log = logging.getLogger(__name__)

H_NODE = "X-Proctor-Peer"
H_SIGNATURE = "X-Proctor-Peer-Signature"
H_CLIENT = "X-Proctor-Peer-Client"
H_VIA = "X-Proctor-Peer-Via"
H_HOP = "X-Proctor-Peer-Hop"
CLUSTER_HEADERS = (H_NODE, H_SIGNATURE, H_CLIENT, H_VIA, H_HOP)
#: A signature older (or newer) than this is refused: node clocks must agree within it.
MAX_SKEW_S = 60.0
VIAS = frozenset({"rest", "socketio"})

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers not passed on: hop-by-hop ones, those the client library sets for the
#: new connection, Origin (CORS was decided here, and the owner's own origin differs),
#: and ours (rebuilt and signed).
_DROP_REQUEST = (
    HOP_BY_HOP
    | {"host", "content-length", "origin", "x-forwarded-host", "x-forwarded-proto"}
    | {h.lower() for h in CLUSTER_HEADERS}
)
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}


class OwnerUnavailable(ProctorError):
    """The node that owns the session cannot be reached (its lease lapsed, or the
    connection failed); once a peer marks the session interrupted it answers 409."""

    code = "owner_unavailable"
    status = 503


class SignatureError(Exception):
    pass


@dataclass(frozen=True)
class Forwarded:
    """A request a peer forwarded to this node, its signature verified."""

    node_id: str  # the peer that received it from the client
    via: str  # the client's transport there: "rest" or "socketio"
    hop: int


#: Where a verified forwarding lives on the request.
FORWARDED_KEY = web.RequestKey("proctor_forwarded", Forwarded)


@dataclass(frozen=True)
class Claims:
    forwarded: Forwarded
    client: str
    host: str
    scheme: str


def forwarded(request: web.Request) -> Forwarded | None:
    return request.get(FORWARDED_KEY)


def _message(
    ts: str, node_id: str, method: str, path_qs: str, client: str, host: str, scheme: str,
    via: str, hop: str,
) -> bytes:
    fields = ("v1", ts, node_id, method.upper(), path_qs, client, host, scheme, via, hop)
    return "\n".join(fields).encode("utf-8", "surrogatepass")


def signature(secret: bytes, *fields: str) -> str:
    return hmac.new(secret, _message(*fields), hashlib.sha256).hexdigest()


def sign_headers(
    secret: bytes, node_id: str, method: str, path_qs: str, *, client: str, host: str,
    scheme: str, via: str, hop: int, now: float | None = None,
) -> dict[str, str]:
    ts = str(int(time.time() if now is None else now))
    sig = signature(secret, ts, node_id, method, path_qs, client, host, scheme, via, str(hop))
    return {
        H_NODE: node_id,
        H_CLIENT: client,
        H_VIA: via,
        H_HOP: str(hop),
        H_SIGNATURE: f"t={ts},v1={sig}",
        "X-Forwarded-Host": host,
        "X-Forwarded-Proto": scheme,
    }


def verify(
    secret: bytes, headers: Mapping[str, str], method: str, path_qs: str,
    now: float | None = None,
) -> Claims:
    """The claims of a signed request; raises SignatureError for anything else."""
    raw = headers.get(H_SIGNATURE, "")
    parts = dict(p.split("=", 1) for p in raw.split(",") if "=" in p)
    ts, sig = parts.get("t", ""), parts.get("v1", "")
    if not ts.isdigit() or not sig:
        raise SignatureError("no signature")
    if abs((time.time() if now is None else now) - int(ts)) > MAX_SKEW_S:
        raise SignatureError("signature too old (or the nodes' clocks disagree)")
    node_id = headers.get(H_NODE, "")
    client = headers.get(H_CLIENT, "")
    via = headers.get(H_VIA, "")
    hop = headers.get(H_HOP, "")
    host = headers.get("X-Forwarded-Host", "")
    scheme = headers.get("X-Forwarded-Proto", "")
    expected = signature(secret, ts, node_id, method, path_qs, client, host, scheme, via, hop)
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("bad signature")
    if via not in VIAS or not hop.isdigit() or scheme not in ("http", "https"):
        raise SignatureError("malformed claims")
    return Claims(Forwarded(node_id, via, int(hop)), client, host, scheme)


def cluster_middleware(secret: str) -> Any:
    """Believe a peer's claims about a forwarded request; refuse them from anyone else."""
    key = secret.encode()

    @web.middleware
    async def peers(
        request: web.Request, handler: Any
    ) -> web.StreamResponse:
        if not any(h in request.headers for h in CLUSTER_HEADERS):
            return await handler(request)
        try:
            claims = verify(key, request.headers, request.method, request.path_qs)
        except SignatureError as exc:
            log.warning("refused a request posing as a forwarded one from %s: %s",
                        request.remote, exc)
            return web.json_response(
                {
                    "error": {
                        "code": "forwarding_refused",
                        "message": "X-Proctor-Peer-* headers are for nodes of this cluster only",
                    }
                },
                status=403,
            )
        changes: dict[str, Any] = {"scheme": claims.scheme}
        if claims.client:
            changes["remote"] = claims.client
        if claims.host:
            changes["host"] = claims.host
        request = request.clone(**changes)
        request[FORWARDED_KEY] = claims.forwarded
        return await handler(request)

    return peers


def node_cookie_middleware(tag: str) -> Any:
    """Socket.IO long-polling needs every request of a connection on one node: the
    handshake's answer names this node in a cookie the proxy routes on (nginx map)."""

    @web.middleware
    async def node_cookie(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if (
            request.path.startswith("/socket.io/")
            and not response.prepared
            and request.cookies.get(NODE_COOKIE) != tag
        ):
            response.set_cookie(NODE_COOKIE, tag, path="/socket.io/", httponly=True,
                                samesite="Lax")
        return response

    return node_cookie


NODE_COOKIE = "proctor_node"


@dataclass(frozen=True)
class Answer:
    """The owner's answer to a forwarded call."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        from server import safe_json

        try:
            return safe_json.loads(self.body)
        except safe_json.JsonRejected:
            return None


class Forwarder:
    """Passes requests to their owner over one aiohttp client session (owned here,
    closed by `close`), with timeouts: a dead owner is a 503, never a hang."""

    def __init__(
        self, node_id: str, secret: str, connect_timeout_s: float, retry_after_s: int,
        registry: CollectorRegistry,
    ) -> None:
        self.node_id = node_id
        self._secret = secret.encode()
        self.connect_timeout_s = connect_timeout_s
        self.retry_after_s = retry_after_s
        self._http: aiohttp.ClientSession | None = None
        self.forwarded = Counter(
            "proctor_cluster_forwarded",
            "Requests and Socket.IO events forwarded to the session's owner, by kind "
            "(frame, metrics, end, offer) and outcome (the owner's status class, or "
            "unreachable)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "proctor_cluster_forward_seconds",
            "Round trip of a forwarded request to the owner",
            ["kind"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
            registry=registry,
        )

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, ttl_dns_cache=60),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def send(
        self,
        address: str,
        method: str,
        path_qs: str,
        *,
        kind: str,
        timeout_s: float,
        client: str,
        host: str,
        scheme: str,
        via: str,
        hop: int = 1,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Answer:
        """One request to the owner at `address`; raises OwnerUnavailable when it cannot be
        reached or does not answer within `timeout_s`."""
        if self._http is None:
            raise OwnerUnavailable("this node is shutting down", code="shutting_down")
        out = dict(headers or {})
        out.update(
            sign_headers(
                self._secret, self.node_id, method, path_qs, client=client, host=host,
                scheme=scheme, via=via, hop=hop,
            )
        )
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s)
        started = time.perf_counter()
        try:
            async with self._http.request(
                method, address + path_qs, headers=out, data=body, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                data = await resp.read()
                answer = Answer(resp.status, data, resp.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.forwarded.labels(kind=kind, outcome="unreachable").inc()
            log.warning("the owner at %s did not answer a forwarded %s (%s: %s)", address,
                        kind, type(exc).__name__, exc)
            error = OwnerUnavailable(
                "the node running this session cannot be reached; retry shortly"
            )
            error.retry_after_s = self.retry_after_s
            raise error from None
        self.latency.labels(kind=kind).observe(time.perf_counter() - started)
        self.forwarded.labels(kind=kind, outcome=f"{answer.status // 100}xx").inc()
        return answer

    async def proxy(
        self, request: web.Request, address: str, body: bytes | None, *, kind: str,
        timeout_s: float,
    ) -> web.Response:
        """Forward a client's REST request as it came (its token included) and answer
        with the owner's status, body and end-to-end headers."""
        hop_headers = _connection_tokens(request.headers)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _DROP_REQUEST and k.lower() not in hop_headers
        }
        # The chain so far plus the peer this node saw, as any proxy appends.
        chain = ", ".join(request.headers.getall("X-Forwarded-For", []))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peer_ip = peer[0] if isinstance(peer, tuple) and peer else ""
        headers["X-Forwarded-For"] = ", ".join(p for p in (chain, peer_ip) if p)
        answer = await self.send(
            address, request.method, request.path_qs, kind=kind, timeout_s=timeout_s,
            client=request.remote or "", host=request.host, scheme=request.scheme,
            via="rest", headers=headers, body=body,
        )
        out = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in _DROP_RESPONSE and k.lower() not in _connection_tokens(
                answer.headers
            )
        }
        return web.Response(status=answer.status, body=answer.body, headers=out)


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """Headers a `Connection` header names: hop-by-hop too (RFC 9110 §7.6.1)."""
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}
