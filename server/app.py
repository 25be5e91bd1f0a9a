"""The composition root: builds settings, analyser, store, narrator and session manager,
and wires the transports (REST, Socket.IO, static pages) onto one aiohttp application."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import socketio
from aiohttp import web

from server.analysis.analyser import Analyser
from server.analysis.backends import make_analyser, pose_calibration_factory
from server.cluster.forwarding import cluster_middleware, node_cookie_middleware
from server.cluster.node import NodeIdentity
from server.cluster.routing import CLUSTER, ClusterNode, check_cluster_settings
from server.config import Settings
from server.observability import Instruments
from server.session.alerts import AlertService
from server.session.database import Database, make_database
from server.session.manager import SessionManager
from server.session.narrative import make_narrator
from server.session.store import Store
from server.session.webhooks import WebhookSender
from server.signaling import socketio_json
from server.signaling.alerts_api import register_alert_routes
from server.signaling.auth import ACCESS, Access, token_middleware
from server.signaling.http_api import error_middleware
from server.signaling.operator_api import register_operator_routes
from server.signaling.rest import build_api
from server.signaling.rtc import RtcGateway
from server.signaling.socketio_events import GuardedServer, ProctorNamespace
from server.signaling.videos import register_video_routes
from server.signaling.web_guard import cors_middleware, host_middleware, proxy_middleware
from server.video.html_report import UPLOT_CSS, UPLOT_JS
from server.video.jobs import VideoJobs

if TYPE_CHECKING:
    from server.cluster.redis_parts import RedisParts

log = logging.getLogger(__name__)

MANAGER = web.AppKey("manager", SessionManager)
SETTINGS = web.AppKey("settings", Settings)
INSTRUMENTS = web.AppKey("instruments", Instruments)
SOCKETIO = web.AppKey("socketio", socketio.AsyncServer)
RTC = web.AppKey("rtc", RtcGateway)
VIDEO_JOBS = web.AppKey("video_jobs", VideoJobs)
NODE = web.AppKey("node", NodeIdentity)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
#: The cluster's Redis parts (REDIS_URL only).
REDIS: web.AppKey[RedisParts] = web.AppKey("redis")


#: The console holds the operator's token in memory: nothing but its own scripts may run
#: there (no inline script, no other origin), it is never framed, and no URL it visits
#: learns where it came from.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' blob: data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


# Room for base64 (4/3) and the JSON around the largest allowed frame.
def _max_body(settings: Settings) -> int:
    return settings.max_frame_bytes * 4 // 3 + 64 * 1024


def _file(path: Path) -> web.StreamResponse:
    if not path.is_file():
        raise web.HTTPNotFound(reason=f"{path.name} is not installed")
    return web.FileResponse(path)


def make_store(
    settings: Settings, cls: type[Store] = Store, database: Database | None = None
) -> Store:
    """The store on `database`, else on the one `DATABASE_URL` names (SQLite at
    `DATABASE_PATH` when it is empty, or PostgreSQL)."""
    return cls(
        database or make_database(settings),
        settings.store_queue_size,
        write_attempts=settings.store_write_attempts,
        retry_backoff_s=settings.store_retry_backoff_s,
        retry_window_s=settings.store_retry_window_s,
        retry_max_backoff_s=settings.store_retry_max_backoff_s,
        flush_timeout_s=settings.store_flush_timeout_s,
    )


def create_app(
    settings: Settings | None = None,
    *,
    analyser: Analyser | None = None,
    store: Store | None = None,
    offline_analyser: Analyser | None = None,
) -> web.Application:
    """`offline_analyser`: a started offline backend for sessions past the Rekognition
    cap (owned by the caller); default: one is made when first needed. Raises
    ConfigError for settings the server refuses (operator tokens, webhooks)."""
    settings = settings or Settings()
    instruments = Instruments()
    # Settings checked before anything is built: a refusal leaves nothing to close.
    access = Access(settings)
    webhooks = WebhookSender(settings, instruments)
    identity = NodeIdentity.from_settings(settings)
    if settings.clustered:
        check_cluster_settings(settings)
    analyser = analyser or make_analyser(settings, instruments)
    redis = None
    if settings.redis_url:  # a cluster node: budget, spend caps and video jobs in Redis
        from server.cluster.redis_parts import RedisParts

        redis = RedisParts(settings, instruments, identity.node_id)
    manager = SessionManager(
        settings,
        analyser,
        store or make_store(settings),
        instruments,
        narrator=make_narrator(settings, instruments),
        pose_calibration_factory=pose_calibration_factory(analyser, settings),
        offline_analyser=offline_analyser,
        budget=redis.budget if redis else None,
        shared_counters=redis.counters if redis else None,
    )
    manager.webhooks = webhooks
    manager.node_id = identity.node_id
    cluster: ClusterNode | None = None
    if settings.clustered:
        cluster = ClusterNode(settings, identity, manager, instruments)
        manager.clustered = True
        manager.session_id_tag = identity.tag
        manager.before_store_close.append(cluster.leave)
        access.share_candidate_tokens(manager.store)
    middlewares = [proxy_middleware(settings)]
    if cluster is not None:
        middlewares += [
            cluster_middleware(settings.cluster_secret),
            node_cookie_middleware(identity.tag),
        ]
    middlewares += [host_middleware(settings), cors_middleware(settings), error_middleware]
    if cluster is not None:
        middlewares.append(token_middleware(access))
    app = web.Application(
        # App-wide ceiling; each route reads its body with its own, smaller limit.
        client_max_size=_max_body(settings),
        middlewares=middlewares,
    )
    app[MANAGER] = manager
    app[SETTINGS] = settings
    app[INSTRUMENTS] = instruments
    app[ACCESS] = access
    app[NODE] = identity
    if cluster is not None:
        app[CLUSTER] = cluster
    app[WEBHOOKS] = webhooks

    sio = GuardedServer(
        async_mode="aiohttp",
        # Off: cors_middleware guards the Socket.IO endpoint like every other route.
        cors_allowed_origins=[],
        # The message size limit: a little above the largest valid frame, so an oversized
        # frame gets our error event; beyond this engine.io closes the connection.
        max_http_buffer_size=_max_body(settings) * 2,
        json=socketio_json,
        logger=False,
        engineio_logger=False,
        send_queue_max=settings.socketio_send_queue_max,
        on_backpressure=lambda action: instruments.socketio_backpressure.labels(
            action=action
        ).inc(),
        # Cluster: events to rooms reach their members on every node (over Redis).
        **({"client_manager": cluster.fanout} if cluster is not None else {}),
    )
    namespace = ProctorNamespace(manager, settings, access, cluster=cluster)
    sio.register_namespace(namespace)
    sio.attach(app)
    app[SOCKETIO] = sio

    api = build_api(
        manager,
        settings,
        instruments,
        redis_health=redis.health if redis else None,
        cluster=cluster,
    )
    rtc = RtcGateway(manager, settings, instruments, cluster=cluster)
    rtc.register(api)  # POST /api/rtc/offer, in the same OpenAPI document
    video_jobs = VideoJobs(manager, settings, queue=redis.queue if redis else None)
    manager.erase_hooks.append(video_jobs.forget_session)
    if redis is not None:
        redis.link.on_up(video_jobs.requeue_from_store)
        app[REDIS] = redis
    register_video_routes(api, video_jobs, settings)
    register_operator_routes(api, manager)
    register_alert_routes(api, AlertService(manager.store, settings, manager.audit))
    api.attach(app)
    app[RTC] = rtc
    app[VIDEO_JOBS] = video_jobs

    async def index(request: web.Request) -> web.StreamResponse:
        return _file(settings.public_dir / "index.html")

    async def client_example(request: web.Request) -> web.StreamResponse:
        return _file(settings.client_example)

    async def socketio_client(request: web.Request) -> web.StreamResponse:
        return _file(settings.node_modules_dir / "socket.io-client" / "dist" / "socket.io.min.js")

    async def console(request: web.Request) -> web.StreamResponse:
        response = _file(settings.public_dir / "console" / "index.html")
        response.headers.update(CONSOLE_HEADERS)
        return response

    def vendor(path: Path) -> Any:
        async def serve(request: web.Request) -> web.StreamResponse:
            return _file(settings.node_modules_dir / path)

        return serve

    app.router.add_get("/", index)
    app.router.add_get("/client_example.html", client_example)
    app.router.add_get("/console", console)
    app.router.add_get("/static/socket.io.min.js", socketio_client)
    # The charting library of the report renderer, from npm (node_modules), never a CDN.
    app.router.add_get("/static/vendor/uPlot.iife.min.js", vendor(UPLOT_JS))
    app.router.add_get("/static/vendor/uPlot.min.css", vendor(UPLOT_CSS))
    if settings.public_dir.is_dir():
        app.router.add_static("/static", settings.public_dir)

    async def on_startup(app: web.Application) -> None:
        await webhooks.start()
        await manager.start()
        if cluster is not None:  # the store is open: take the lease
            await cluster.start()
        await video_jobs.start()
        namespace.feeds.start()
        if redis is not None:  # last: reaching Redis runs the spend and job resyncs
            await redis.start()
            log.info("cluster node %s (Redis %s)", redis.link.node_id, redis.link.display_url)
        log.info("analyser backend: %s", analyser.name)

    async def on_shutdown(app: web.Application) -> None:
        # Jobs first: a running video becomes `interrupted` (resumable), not ended.
        await video_jobs.stop()
        await manager.stop()
        await namespace.feeds.stop()
        # Last: the session ends of the shutdown are queued for delivery by now.
        await webhooks.stop()
        if redis is not None:
            await redis.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    # After the manager: sessions end first (pages get session_ended), then every peer,
    # task and decoder is released.
    app.on_shutdown.append(rtc.close)

    async def close_sockets(app: web.Application) -> None:
        # Sessions have ended (clients got session_ended): close every Socket.IO client, so
        # no long-poll GET or websocket handler holds the stop for its ping interval.
        # (Without waiting for each client to fetch its close packet: no new poll can
        # reach a server that has stopped listening.)
        for socket in list(sio.eio.sockets.values()):
            try:
                async with asyncio.timeout(1.0):
                    await socket.close(wait=False)
                socket.queue.put_nowait(None)  # ends a websocket's writer: it closes
            except Exception:
                log.exception("closing a Socket.IO client at shutdown failed")
        sio.eio.sockets.clear()

    app.on_shutdown.append(close_sockets)
    if cluster is not None:
        # Last: sessions ending above still send their events to other nodes.
        async def close_cluster(app: web.Application) -> None:
            await cluster.close()

        app.on_shutdown.append(close_cluster)
    return app
