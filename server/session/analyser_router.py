"""Which analyser answers a session's next frame: the server's own backend, or — once the
daily Rekognition cap is reached — the offline backend, for that session from then on.

A session under way is never cut off by the cap: the router moves it to the offline
backend (`LiveSession.backend_switches` records when and why, and its report shows it),
and sessions that start past the cap start there. The offline backend is created lazily,
the first time it is needed, and loads in a task of its own (its import and model load
never run on the event loop); until it is ready, frames are answered degraded with the
reason `offline_loading` (or `offline_unavailable` if it could not load).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.analysis.analyser import Analyser, PoseCalibration
from server.analysis.observation import Checks, Observation
from server.config import Settings
from server.observability import Instruments
from server.session.live_session import LiveSession
from server.session.spend import REKOGNITION_CAP, Held, SpendCaps
from server.session.store import Store

log = logging.getLogger(__name__)

OFFLINE = "local"


@dataclass(frozen=True)
class Route:
    """The analyser for one analysis (None: answer degraded with `reason`), and the
    billed calls reserved for it."""

    analyser: Analyser | None
    backend: str
    reserved: int = 0
    reason: str = ""
    held: Held = "local"  # where the reserved calls are counted (this node, or Redis)


class AnalyserRouter:
    def __init__(
        self,
        settings: Settings,
        primary: Analyser,
        spend: SpendCaps,
        store: Store,
        instruments: Instruments,
        *,
        offline: Analyser | None = None,
        pose_calibration_factory: Callable[[Any], Callable[[], PoseCalibration] | None],
    ) -> None:
        self.settings = settings
        self.primary = primary
        self.spend = spend
        self.store = store
        self.instruments = instruments
        self._pose_factory = pose_calibration_factory
        # Given (already started, owned by the caller: tests share one) or made here.
        self._offline = offline
        self._owned = offline is None
        self._loading: asyncio.Task[None] | None = None
        self._failed = False

    @property
    def capped(self) -> bool:
        """Is the primary backend under a daily cap at all?"""
        return bool(getattr(self.primary, "billed", False)) and bool(
            self.spend.caps["rekognition_calls"]
        )

    def billed_for(self, session: LiveSession) -> bool:
        """Does this session's next analysis spend the API budget?"""
        return bool(getattr(self.primary, "billed", False)) and not session.backend_switches

    # --- sessions ------------------------------------------------------------------------

    def starting(self, session: LiveSession) -> None:
        """A session being created (not stored yet): past the cap it starts offline."""
        if session.backend_switches:  # a reopened session that had already moved
            self._move(session, None)
        elif self.capped and self.spend.reached("rekognition_calls"):
            self._move(session, time.time())

    async def route(self, session: LiveSession, checks: Checks) -> Route:
        if not session.backend_switches:
            if not self.capped:
                return Route(self.primary, self.primary.name)
            calls = len(checks.names())
            held = await self.spend.reserve_rekognition(calls)
            if held is not None:
                return Route(self.primary, self.primary.name, reserved=calls, held=held)
            self._move(session, time.time())
            await self.store.set_backend(session.id, session.backend, session.backend_switches)
            log.warning(
                "daily Rekognition cap of %d calls reached: the session goes on with the "
                "offline backend", self.spend.caps["rekognition_calls"],
                extra={"session_id": session.id},
            )
        if self._offline is not None:
            return Route(self._offline, self._offline.name)
        self._ensure_loading()
        return Route(
            None, OFFLINE, reason="offline_unavailable" if self._failed else "offline_loading"
        )

    def settle(self, route: Route, obs: Observation | None) -> None:
        """The calls an analysis really billed (the observation's `calls`) are counted."""
        if route.analyser is self.primary and self.capped:
            billed = 0 if obs is None else sum(obs.calls.values())
            self.spend.settle_rekognition(route.reserved, billed, route.held)

    def _move(self, session: LiveSession, at: float | None) -> None:
        """Put `session` on the offline backend; `at` None: it had moved before."""
        if at is not None:
            session.backend_switches.append({
                "at": at,
                "from": session.backend,
                "to": OFFLINE,
                "reason": REKOGNITION_CAP,
            })
            self.spend.hit("rekognition_daily_calls")
        session.backend = OFFLINE
        if session.pose_calibration is None:
            # The offline backend's head pose is relative to a generic face.
            factory = self._pose_factory(self._offline or _OfflineTraits())
            session.pose_calibration = factory() if factory is not None else None
        self._ensure_loading()

    # --- the offline backend -----------------------------------------------------------------

    def _ensure_loading(self) -> None:
        if self._offline is not None or self._loading is not None or self._failed:
            return
        self._loading = asyncio.create_task(self._load(), name="offline-backend-load")

    async def _load(self) -> None:
        t0 = time.monotonic()
        try:
            # Importing it pulls OpenCV and the model runtimes: off the event loop.
            module: Any = await asyncio.to_thread(
                importlib.import_module, "server.analysis.local_backend"
            )
            analyser: Analyser = module.LocalAnalyser(self.settings, self.instruments)
            await analyser.start()
        except Exception:
            self._failed = True
            log.exception("the offline backend could not be loaded: capped sessions are degraded")
            self.instruments.internal_errors.labels(where="offline_backend").inc()
            return
        self._offline = analyser
        log.info("offline backend ready for capped sessions (%.1f s)", time.monotonic() - t0)

    async def close(self) -> None:
        """Release the offline backend if this router made it; a load under way is
        waited for (its threads cannot be cancelled; the caller bounds the wait)."""
        if self._loading is not None and not self._loading.done():
            await asyncio.wait({self._loading})
        if self._owned and self._offline is not None:
            offline, self._offline = self._offline, None
            await offline.close()


class _OfflineTraits:
    """What `pose_calibration_factory` asks of the offline backend before it exists."""

    needs_pose_baseline = True
