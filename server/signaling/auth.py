"""Who may do what (SPEC "Access and roles"): one authorisation function for every
transport — REST, Socket.IO and the WebRTC offer.

Secured mode (an operator token is configured: `API_TOKEN`, whose holder is named
"operator", and/or named ones in `API_TOKENS=name:token,...`): an operator token may do
everything, and what it does is audited under its name; a candidate token, issued when
the operator starts a session, may only send that session's frames or media, read its
live metrics and end it (403 `forbidden` for anything else); no token, or one we do not
know, is 401 `unauthorized`.

Development mode (no operator token): the brief's open behaviour — a request without a token
acts as the operator. A valid candidate token still binds its holder to its session, so
the candidate page and its views behave the same in both modes.

Tokens are compared as SHA-256 digests: operators' with `hmac.compare_digest` against
every configured one (no early exit), candidates' by dictionary lookup of the digest
(timing reveals nothing about a token whose hash is not known). Only a short
fingerprint of a token ever reaches a log.

In a cluster a candidate token issued by one node must work on every node: tokens are
then also stored (as digests, committed before the start is answered) and a node loads a
token it does not know from the store once (`resolve`, before authorising), remembering
unknown ones too, so hostile guesses cost one read each, not one per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from aiohttp import web

from server.config import ConfigError, Settings
from server.errors import ProctorError, Unauthorized

if TYPE_CHECKING:
    from server.session.store import Store

log = logging.getLogger(__name__)

#: What a request wants to do. "start": create a session; "frame": send a session's frames
#: or media (the WebRTC offer for an existing session too); "live_metrics" and "end" on a
#: session; "operator": anything else (listing, reports, /metrics, ...).
Action = Literal["start", "frame", "live_metrics", "end", "operator"]
CANDIDATE_ACTIONS: frozenset[str] = frozenset({"frame", "live_metrics", "end"})
Role = Literal["operator", "candidate"]
#: The name API_TOKEN's holder is audited under; a development-mode request without a
#: token is "anonymous".
DEFAULT_OPERATOR = "operator"
ANONYMOUS = "anonymous"
TOKEN_MIN_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class Forbidden(ProctorError):
    code = "forbidden"
    status = 403


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def operator_tokens(settings: Settings) -> dict[str, str]:
    """name → token from API_TOKEN ("operator") and API_TOKENS ("name:token,..."). Raises
    ConfigError, naming the entry but never showing a token, for an empty name or token,
    a name that is not [A-Za-z0-9_.@-] (64 at most), a duplicate name or token, or a
    token shorter than TOKEN_MIN_CHARS."""
    entries: list[tuple[str, str, str]] = []  # (where, name, token)
    if settings.api_token:
        entries.append(("API_TOKEN", DEFAULT_OPERATOR, settings.api_token))
    raw = settings.api_tokens.strip()
    if raw:
        for i, part in enumerate(raw.split(","), 1):
            where = f"API_TOKENS entry {i}"
            name, sep, token = part.strip().partition(":")
            name, token = name.strip(), token.strip()
            if not sep or not name or not token:
                raise ConfigError(f"{where}: expected name:token with both parts non-empty")
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"{where}: the name {name[:64]!r} may use only letters, digits and _ . @ - "
                    "(64 at most, starting with a letter or digit)"
                )
            entries.append((where, name, token))
    names: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for where, name, token in entries:
        if len(token) < TOKEN_MIN_CHARS:
            raise ConfigError(
                f"{where}: the token of {name!r} is shorter than {TOKEN_MIN_CHARS} characters"
            )
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is also used by {names[name]}")
        if token in tokens:
            raise ConfigError(f"{where}: the token of {name!r} is also {tokens[token]}'s")
        names[name] = where
        tokens[token] = name
    return {name: token for token, name in tokens.items()}


def fingerprint(token: str | None) -> str:
    """What a log may say about a token: 12 hex digits of its hash."""
    return "-" if not token else _digest(token).hex()[:12]


def short_id(session_id: object) -> str:
    """A session id as logs show it (the full id is a capability of sorts)."""
    return str(session_id)[:8] if session_id else "-"


@dataclass(frozen=True)
class Principal:
    role: Role
    session_id: str | None = None  # the candidate's own session
    fingerprint: str = "-"
    anonymous: bool = False  # development mode, no token presented
    #: Who an operator is, for the audit log: API_TOKENS' name, "operator" for API_TOKEN,
    #: "anonymous" in development mode without a token; None for a candidate.
    name: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"

    def view(self, settings: Settings) -> Literal["results", "status"]:
        """What this principal receives back: operators always the full results."""
        return "results" if self.is_operator else settings.resolved_candidate_view


class Access:
    """The operator tokens and the candidate tokens issued so far (hashed, bounded).
    Raises ConfigError for a malformed API_TOKEN / API_TOKENS (see `operator_tokens`)."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        """`store`: in a cluster, where candidate tokens are shared between nodes."""
        self.settings = settings
        self._operators = [
            (_digest(token), name) for name, token in operator_tokens(settings).items()
        ]
        self._candidates: OrderedDict[bytes, str] = OrderedDict()
        self._store = store
        self._unknown: OrderedDict[bytes, None] = OrderedDict()

    @property
    def secured(self) -> bool:
        return bool(self._operators)

    @property
    def operator_names(self) -> list[str]:
        return [name for _d, name in self._operators]

    def _operator_name(self, digest: bytes) -> str | None:
        # Every configured token is compared, whichever matches: the time taken says
        # nothing about which one (or how much of one) a caller guessed.
        found = None
        for known, name in self._operators:
            if hmac.compare_digest(digest, known) and found is None:
                found = name
        return found

    def issue_candidate_token(self, session_id: str) -> str:
        token = secrets.token_urlsafe(24)
        self._candidates[_digest(token)] = session_id
        while len(self._candidates) > self.settings.candidate_tokens_max:
            self._candidates.popitem(last=False)
        log.info(
            "candidate token %s issued for session %s", fingerprint(token), short_id(session_id)
        )
        return token

    def share_candidate_tokens(self, store: Store) -> None:
        """Cluster: keep candidate tokens in the shared store too (see `issue`, `resolve`)."""
        self._store = store

    async def issue(self, session_id: str) -> str:
        """A candidate token for the session, usable on every node once this returns."""
        token = self.issue_candidate_token(session_id)
        if self._store is not None:
            from server.session.store import StoreError

            await self._store.save_candidate_token(_digest(token).hex(), session_id)
            try:
                await self._store.flush(session_id)
            except StoreError as exc:  # valid here; other nodes will not know it
                log.error("candidate token %s of session %s not stored: %s",
                          fingerprint(token), short_id(session_id), exc)
        return token

    async def resolve(self, token: str | None) -> None:
        """Learn a candidate token another node issued (cluster only; a no-op for tokens
        known here, the operator's, and tokens already found unknown). Raises StoreError
        when the store cannot be read."""
        if not token or self._store is None:
            return
        digest = _digest(token)
        if digest in self._candidates or digest in self._unknown:
            return
        if self._operator_name(digest) is not None:
            return
        session_id = await self._store.candidate_token_session(digest.hex())
        if session_id is None:
            # Tokens are random: one unknown now was never issued, and never will be.
            self._unknown[digest] = None
            while len(self._unknown) > self.settings.candidate_tokens_max:
                self._unknown.popitem(last=False)
            return
        self._candidates[digest] = session_id
        while len(self._candidates) > self.settings.candidate_tokens_max:
            self._candidates.popitem(last=False)

    def identify(self, token: str | None) -> Principal:
        if token:
            digest = _digest(token)
            name = self._operator_name(digest)
            if name is not None:
                return Principal("operator", fingerprint=fingerprint(token), name=name)
            session_id = self._candidates.get(digest)
            if session_id is not None:
                return Principal("candidate", session_id, fingerprint(token))
            if self.secured:
                log.info("refused unknown token %s", fingerprint(token))
                raise Unauthorized("the token is not valid")
        if self.secured:
            raise Unauthorized(
                "this server needs a token (Authorization: Bearer <token>, or Socket.IO "
                "auth: {token})"
            )
        return Principal("operator", anonymous=True, name=ANONYMOUS)

    def authorize(self, token: str | None, action: Action, session_id: object = None) -> Principal:
        """The principal behind `token` if it may do `action` (on `session_id`); raises
        401 `unauthorized` or 403 `forbidden` otherwise."""
        principal = self.identify(token)
        if principal.is_operator:
            return principal
        if (
            action in CANDIDATE_ACTIONS
            and isinstance(session_id, str)
            and principal.session_id is not None
            and hmac.compare_digest(session_id.encode(), principal.session_id.encode())
        ):
            return principal
        raise Forbidden(
            "a candidate token may only send its own session's frames, read its live "
            "metrics and end it"
        )


ACCESS = web.AppKey("access", Access)


def actor_of(who: Principal) -> str:
    """The name an operator's actions are audited under."""
    return who.name or "operator"


def presented_token(request: web.Request) -> str | None:
    """The token of a REST request: `Authorization: Bearer` (or X-API-Token, kept for
    clients written before roles)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-API-Token") or None


def authorize_request(request: web.Request, action: Action, session_id: object = None) -> Principal:
    return request.app[ACCESS].authorize(presented_token(request), action, session_id)


def token_middleware(access: Access) -> Any:
    """Cluster: a candidate token issued by another node is loaded before any handler
    authorises with it (handlers authorise synchronously)."""

    @web.middleware
    async def tokens(request: web.Request, handler: Any) -> web.StreamResponse:
        from server.errors import BackendUnavailable
        from server.session.store import StoreError

        try:
            await access.resolve(presented_token(request))
        except StoreError:
            raise BackendUnavailable(
                "the session store cannot be read", code="store_unavailable"
            ) from None
        return await handler(request)

    return tokens


def join_url(base: str, session_id: str, token: str) -> str:
    """The candidate page for a session. The token is in the fragment, which browsers
    never send to a server, so it reaches no access log."""
    return f"{base.rstrip('/')}/#session={quote(session_id)}&token={quote(token)}"


def socket_token(auth: Any) -> str | None:
    """The token of a Socket.IO connection: `auth: {token}` (or a bare string)."""
    if isinstance(auth, dict):
        token = auth.get("token")
    else:
        token = auth
    return token if isinstance(token, str) and token else None
