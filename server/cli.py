"""`proctor` command: `proctor serve [--host H] [--port P]`."""

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
    args = parser.parse_args(argv)

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
    if not _is_loopback(settings.host) and not settings.api_token:
        if not settings.allow_insecure:
            log.error(
                "refusing to listen on %s without API_TOKEN: anyone who could reach it could "
                "start sessions and read every report. Set API_TOKEN, bind to 127.0.0.1, or "
                "set ALLOW_INSECURE=true to accept that.",
                settings.host,
            )
            return 2
        log.warning(
            "!!! Listening on %s with no API_TOKEN (ALLOW_INSECURE=true): anyone who can "
            "reach this address can start sessions and read every report. !!!",
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
