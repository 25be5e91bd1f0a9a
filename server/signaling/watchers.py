"""Session events into Socket.IO rooms: the session's participants, its candidate, and the
proctor's console (`watch_session`, `watch_all`; SPEC "Evidence, review and re-scoring").

Every session that goes live on this node, whatever its transport (WebRTC, Socket.IO,
REST, recorded video), gets one `SessionFeed` as a listener when it starts (the manager's
session observers). The feed only emits into rooms through python-socketio's manager —
never to lists of watchers kept here — so a pub/sub manager (Redis) carries the same
emits to watchers on other nodes unchanged.

Rooms:
- `<session id>`: operators taking part (they started the session or named it);
- `candidate:<session id>`: its candidate, who sees what CANDIDATE_VIEW allows;
- `watch:<session id>`: `watch_session` watchers: `frame_analysis`, `alerts`,
  `live_metrics` (pushed every WATCH_METRICS_INTERVAL_S) and `session_ended`;
- `watch:all`: `watch_all` watchers: every session's `session_started`, `alerts` and
  `session_ended`.

An event bound for several rooms is one emit to the list of rooms, so a socket in more
than one of them (a console watching everything and one session) receives it once.
Payloads are bounded: `session_ended` reaches watchers without its per-alert detail and
timeline past 60 KiB (as on the data channel), the rest are small by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from server.config import Settings
from server.session.health import session_health
from server.session.live_session import LiveSession
from server.session.manager import SessionManager
from server.signaling.datachannel import fit_report
from server.signaling.views import candidate_payload

log = logging.getLogger(__name__)

WATCH_ALL_ROOM = "watch:all"
#: Sessions one connection may watch at once (each is a room it is in).
WATCHED_SESSIONS_MAX = 200

#: `emit(event, data, room=..., skip_sid=...)`: the namespace's emit.
Emit = Callable[..., Awaitable[None]]
#: The local sockets in a room (python-socketio's manager knows only this node's).
Participants = Callable[[str], Iterable[str]]


def candidate_room(session_id: str) -> str:
    return f"candidate:{session_id}"


def watch_room(session_id: str) -> str:
    return f"watch:{session_id}"


class SessionFeed:
    """The one listener a live session has for Socket.IO: publishes each of its events
    into the rooms that should see it."""

    def __init__(
        self,
        session_id: str,
        emit: Emit,
        view: Literal["results", "status"],
        participants: Participants,
    ) -> None:
        self.session_id = session_id
        self._emit = emit
        self._view = view
        self._participants = participants
        self.rooms = (session_id, watch_room(session_id))
        self.everyone = (*self.rooms, WATCH_ALL_ROOM)

    async def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if event == "alerts":
            await self._emit(event, payload, room=list(self.everyone))
        elif event == "session_ended":
            await self._ended(payload)
        elif event == "frame_analysis":
            await self._emit(event, payload, room=list(self.rooms))
        else:  # `error` and anything added later: the session's operators
            await self._emit(event, payload, room=self.session_id)
        seen = candidate_payload(event, payload, self._view)
        if seen is not None:
            await self._emit(event, seen, room=candidate_room(self.session_id))

    async def _ended(self, payload: dict[str, Any]) -> None:
        bounded = fit_report(payload)
        if bounded is payload:
            await self._emit("session_ended", payload, room=list(self.everyone))
            return
        # Participants get the full report, as the brief's clients always did; watchers
        # the bounded one (the full report is at GET /api/sessions/{id}/report).
        await self._emit("session_ended", payload, room=self.session_id)
        await self._emit(
            "session_ended",
            bounded,
            room=[watch_room(self.session_id), WATCH_ALL_ROOM],
            skip_sid=list(self._participants(self.session_id)),
        )


class WatchFeeds:
    """Attaches a `SessionFeed` to each session that goes live, tells `watch:all` about
    it, and pushes `live_metrics` to each live session's `watch_session` watchers."""

    def __init__(
        self,
        manager: SessionManager,
        settings: Settings,
        emit: Emit,
        participants: Participants,
        *,
        local_rooms_only: Callable[[], bool] = lambda: True,
    ) -> None:
        self.manager = manager
        self.settings = settings
        self._emit = emit
        self._participants = participants
        #: True while rooms live on this node only (python-socketio's default manager):
        #: an empty local room then has no watcher anywhere and is skipped.
        self._local_rooms_only = local_rooms_only
        self._fed: weakref.WeakSet[LiveSession] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        manager.session_observers.append(self.session_live)

    # --- sessions ---------------------------------------------------------------------

    async def session_live(self, session: LiveSession) -> None:
        self.feed(session)
        await self._emit(
            "session_started", self.manager.started_payload(session), room=WATCH_ALL_ROOM
        )

    def feed(self, session: LiveSession) -> None:
        """Subscribe the session's feed, once (a session the observer missed gets it when
        a socket first names it)."""
        if session in self._fed:
            return
        self._fed.add(session)
        session.subscribe(
            SessionFeed(
                session.id,
                self._emit,
                self.settings.resolved_candidate_view,
                self._participants,
            )
        )

    def live_metrics(self, session: LiveSession) -> dict[str, Any]:
        """The operator's live metrics, with the console's health column (and the WebRTC
        peer's numbers when there is one)."""
        payload = {**session.live_metrics(), "health": session_health(session)}
        if session.transport_stats is not None:
            with contextlib.suppress(Exception):  # a peer closing under us: no rtc block
                payload["rtc"] = session.transport_stats()
        return payload

    # --- live metrics to watchers -------------------------------------------------------

    def start(self) -> None:
        if self._task is None and self.settings.watch_metrics_interval_s > 0:
            self._task = asyncio.create_task(self._push_metrics(), name="watch-metrics")
            self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.manager.internal_error("watch_metrics", exc)  # a bug: say so, loudly

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _push_one(self, session: LiveSession) -> None:
        if session.status != "live":
            return
        room = watch_room(session.id)
        if self._local_rooms_only() and not any(True for _ in self._participants(room)):
            return  # nobody watches it anywhere: nothing to encode
        await self._emit("live_metrics", self.live_metrics(session), room=room)

    async def _push_metrics(self) -> None:
        interval = self.settings.watch_metrics_interval_s
        while True:
            await asyncio.sleep(interval)
            started = time.perf_counter()
            for session in self.manager.live_sessions():
                try:
                    await self._push_one(session)
                except Exception as exc:  # the next session, and the next round, go on
                    self.manager.internal_error("watch_metrics", exc, session)
            spent = time.perf_counter() - started
            if spent > interval / 2:
                log.warning("pushing live metrics to watchers took %.0f ms", spent * 1000)
