"""How often a still candidate is analysed: the idle interval follows the backend's cost.

A billed cloud backend costs money per call, so a stable scene is looked at rarely
(`SAMPLER_IDLE_INTERVAL_S`, 12 s: scene changes and pending alerts still sample at once).
The offline backend costs only CPU, so while the machine has headroom a still candidate
is analysed about once a second (`SAMPLER_LOCAL_IDLE_INTERVAL_S`), giving reports a dense
timeline; as the analyser's workers fill up, or while the WebRTC load monitor reports
overload, the interval backs off towards the cloud's.

Utilisation is measured, not guessed: the analyser time of every analysis in the last
`window_s`, divided by the time the backend's workers had. Analyser time grows both with
more analyses and with slower ones (cores shared with video decoding), so it tracks the
machine's real headroom.
"""

from __future__ import annotations

import time
from collections import deque


class IdlePacing:
    HEADROOM = 0.5  # utilisation up to which the offline backend keeps its base rate

    def __init__(
        self,
        billed: bool,
        cloud_idle_s: float,
        local_idle_s: float,
        workers: int,
        window_s: float = 5.0,
    ) -> None:
        self.billed = billed
        self.cloud_idle_s = cloud_idle_s
        self.local_idle_s = min(local_idle_s, cloud_idle_s)
        self.workers = max(1, workers)
        self.window_s = window_s
        # (end, seconds) of recent analyses and their running total: utilisation is read
        # on every frame a sampler considers, so it must not sum the window each time.
        self._recent: deque[tuple[float, float]] = deque()
        self._busy_s = 0.0
        self._overloaded_until = 0.0

    def record(self, analyser_s: float) -> None:
        now = time.monotonic()
        self._expire(now)
        self._recent.append((now, analyser_s))
        self._busy_s += analyser_s

    def overloaded_for(self, seconds: float) -> None:
        """The transport layer saw overload (decode or event-loop lag): back off."""
        self._overloaded_until = max(self._overloaded_until, time.monotonic() + seconds)

    def _expire(self, now: float) -> None:
        # Bounded by the window: entries older than `window_s` leave on every call.
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._busy_s -= self._recent.popleft()[1]
        if not self._recent:
            self._busy_s = 0.0  # no float drift once the window is empty

    def utilisation(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._expire(now)
        return max(0.0, self._busy_s) / (self.window_s * self.workers)

    def interval(self) -> float:
        if self.billed:
            return self.cloud_idle_s
        now = time.monotonic()
        if now < self._overloaded_until:
            return self.cloud_idle_s
        u = self.utilisation(now)
        if u <= self.HEADROOM:
            return self.local_idle_s
        # Past the headroom the interval grows with the square of the excess, reaching the
        # cloud's interval when the workers are fully busy.
        excess = min(1.0, (u - self.HEADROOM) / (1.0 - self.HEADROOM))
        return self.local_idle_s + (self.cloud_idle_s - self.local_idle_s) * excess**2
