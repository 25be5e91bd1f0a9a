"""`proctor` command: `proctor serve`, `proctor analyze`, `proctor doctor`,
`proctor sample-frame`.

Each command other than `serve` lives in its own module with a `register(sub)` that adds
its parser and sets `run`; this file only lists them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web
from dotenv import load_dotenv
from pydantic import ValidationError

from server import doctor, sample_frame
from server.config import Settings
from server.doctor import is_loopback
from server.observability import configure_logging
from server.session.database import StoreError
from server.session.migrations import SchemaTooNew
from server.video import analyze_command

log = logging.getLogger("proctor")


def serve(args: argparse.Namespace) -> int:
    # boto3 and the LLM SDKs read their own variables (AWS_ENDPOINT_URL_REKOGNITION,
    # OPENAI_BASE_URL, ...) from the process environment only: export `.env` for them.
    load_dotenv(override=False)
    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.backend:
        overrides["analyser_backend"] = args.backend
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level)
    if not is_loopback(settings.host) and not settings.secured:
        if not settings.allow_insecure:
            log.error(
                "refusing to listen on %s without API_TOKEN (or API_TOKENS): anyone who "
                "could reach it could start sessions and read every report. Set API_TOKEN, "
                "bind to 127.0.0.1, or set ALLOW_INSECURE=true to accept that.",
                settings.host,
            )
            return 2
        log.warning(
            "!!! Listening on %s with no API_TOKEN (ALLOW_INSECURE=true): anyone who can "
            "reach this address can start sessions and read every report. !!!",
            settings.host,
        )
    from server.app import MANAGER, create_app
    from server.config import ConfigError

    try:
        app = create_app(settings)
    except ConfigError as exc:  # the message names the setting, never a secret
        log.error("refusing to start: %s", exc)
        return 2

    async def announce_ready(app: web.Application) -> None:  # after the models are loaded
        host = "localhost" if is_loopback(settings.host) else settings.host
        log.info("ready: open http://%s:%d/ (backend %s)", host, settings.port,
                 settings.resolved_backend)

    async def announce_shutdown(app: web.Application) -> None:
        live = app[MANAGER].live_count
        log.info("shutting down: ending %d live session(s) with their reports", live)

    app.on_startup.append(announce_ready)
    app.on_shutdown.insert(0, announce_shutdown)
    log.info("starting on %s:%d (backend %s)", settings.host, settings.port,
             settings.resolved_backend)
    try:
        web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    except (StoreError, SchemaTooNew) as exc:  # the database is unreachable or too new
        log.error("cannot start: %s", exc)
        return 1
    log.info("stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proctor", description="Live interview-proctoring server")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="run the server", description="Run the server.")
    p.add_argument("--host", help="address to bind (default from HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from PORT, else 5001)")
    p.add_argument("--backend", choices=["auto", "rekognition", "local"], help="analyser backend")
    p.set_defaults(run=serve)
    analyze_command.register(sub)
    doctor.register(sub)
    sample_frame.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ValidationError as exc:  # a setting the server cannot run with: say which
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"proctor {args.command}: {name}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
