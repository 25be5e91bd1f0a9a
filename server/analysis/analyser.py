"""The analyser interface: one async call from a frame and the checks wanted to an
`Observation`. Backends do their CPU or blocking I/O off the event loop and bound their
own concurrency; a failed check yields a degraded observation, never an exception,
except for a frame that is itself bad (`FrameError`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from server.analysis.observation import Checks, Observation
from server.media.frames import Frame


@runtime_checkable
class Analyser(Protocol):
    #: "rekognition" or "local"; every observation says which backend made it.
    name: str
    #: Calls cost money and count against a quota (the server-wide budget applies).
    billed: bool

    async def start(self) -> None:
        """Load models / open clients. Called once before the first frame."""

    async def analyse(self, frame: Frame, checks: Checks) -> Observation: ...

    async def close(self) -> None:
        """Release threads, clients and models."""


class PoseCalibration(Protocol):
    """Per-candidate head-pose baseline, for backends whose pose is only relative."""

    def apply(self, observation: Observation, now: float) -> Observation: ...
