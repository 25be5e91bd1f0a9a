"""When a session's frame is also asked for labels and text (slower, costlier signals).

Faces are checked on every analysed frame. Labels and text are checked on a session's
first frame, then at most every `labels_interval_s` / `text_interval_s` seconds, and
whenever the caller says the scene changed. With the defaults (5 s, 10 s) a client
pushing 1 frame/s costs 1.3 Rekognition calls per frame instead of 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.analysis.observation import Checks


@dataclass
class CheckCadence:
    labels_interval_s: float = 5.0
    text_interval_s: float = 10.0
    _last_labels: float | None = None
    _last_text: float | None = None

    def plan(self, now: float, scene_changed: bool = False) -> Checks:
        """The checks due for a frame at `now`, without recording them (the worker plans,
        waits for the budget, then commits what it really asks)."""
        labels = scene_changed or self._due(self._last_labels, self.labels_interval_s, now)
        text = scene_changed or self._due(self._last_text, self.text_interval_s, now)
        return Checks(faces=True, labels=labels, text=text)

    def commit(self, checks: Checks, now: float) -> None:
        if checks.labels:
            self._last_labels = now
        if checks.text:
            self._last_text = now

    def next(self, now: float, scene_changed: bool = False) -> Checks:
        checks = self.plan(now, scene_changed)
        self.commit(checks, now)
        return checks

    def missed(self, degraded: tuple[str, ...]) -> None:
        """A slow check the backend had no room for ("labels:busy") is due again on the
        next frame instead of waiting a whole interval."""
        if "labels:busy" in degraded:
            self._last_labels = None
        if "text:busy" in degraded:
            self._last_text = None

    @staticmethod
    def _due(last: float | None, interval: float, now: float) -> bool:
        return last is None or now - last >= interval
