"""`proctor` command: `proctor serve [--host H] [--port P]`, `proctor analyze VIDEO`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from aiohttp import web
from dotenv import load_dotenv

from server.config import Settings
from server.observability import configure_logging

log = logging.getLogger("proctor")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proctor", description="Live interview-proctoring server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to bind (default from HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from PORT, else 5001)")
    serve.add_argument(
        "--backend", choices=["auto", "rekognition", "local"], help="analyser backend"
    )
    from server.video import analyze_command

    analyze_command.add_parser(sub)
    args = parser.parse_args(argv)

    # boto3 and the LLM SDKs read their own variables (AWS_ENDPOINT_URL_REKOGNITION,
    # OPENAI_BASE_URL, ...) from the process environment only: export `.env` for them.
    load_dotenv(override=False)
    overrides: dict[str, object] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None):
        overrides["port"] = args.port
    if args.backend:
        overrides["analyser_backend"] = args.backend
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if args.command == "analyze":
        configure_logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
        return analyze_command.run(args, settings)
    configure_logging(settings.log_level)
    if not _is_loopback(settings.host) and not settings.api_token:
        log.warning(
            "!!! Binding to %s with no API_TOKEN: anyone who can reach this address can list "
            "sessions and read every report. Set API_TOKEN or bind to 127.0.0.1. !!!",
            settings.host,
        )
    from server.app import create_app

    app = create_app(settings)
    log.info(
        "serving on http://%s:%d (backend %s)",
        settings.host,
        settings.port,
        settings.resolved_backend,
    )
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
