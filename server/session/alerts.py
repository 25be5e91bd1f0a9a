"""The operator's view of a session's alerts: the alert list with evidence links, the
evidence snapshots, and re-scoring (`server.analysis.rescore`) over the stored facts.

Works for live and ended sessions alike: it reads the store (after a flush, so a live
session's latest alerts are there) and never writes alerts. `public_alert` is the one
place an alert's public record is built (the alert list, re-scoring, and later reviews).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

from server.analysis.rescore import (
    Replay,
    RescoreInvalid,
    RulesUnreadable,
    effective_rules,
    rules_from_record,
    validate_overrides,
)
from server.analysis.rules import AlertEngine, rules_from_settings
from server.config import Settings
from server.errors import BackendUnavailable, BadRequest, ProctorError, SessionNotFound
from server.session.audit import AuditLog
from server.session.live_session import CAPTURE_CLOCK_TRANSPORTS
from server.session.report import TIMESTAMP_RANGE
from server.session.store import Store, StoreError, loads_object

log = logging.getLogger(__name__)


class AlertNotFound(ProctorError):
    code = "alert_not_found"
    status = 404


class NoEvidence(ProctorError):
    code = "no_evidence"
    status = 404


def evidence_url(session_id: str, alert_id: str) -> str:
    return f"/api/sessions/{quote(session_id, safe='')}/alerts/{quote(alert_id, safe='')}/evidence"


def public_alert(
    episode: dict[str, Any],
    *,
    evidence: str | None = None,
    review: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An alert episode (as the rules raised and the store keeps it) as the API shows it."""
    ended_at = episode.get("ended_at")
    details = episode.get("details")
    return {
        "id": episode.get("episode_id"),
        "type": episode.get("type"),
        "severity": episode.get("severity"),
        "category": episode.get("category"),
        "object": episode.get("object"),
        "status": "active" if ended_at is None else "ended",
        "started_at": episode.get("started_at"),
        "ended_at": ended_at,
        "duration_s": episode.get("duration_s"),
        "onset_frame": episode.get("onset_frame"),
        "end_reason": episode.get("end_reason"),
        "message": episode.get("message"),
        "details": details if isinstance(details, dict) else {},
        "evidence_url": evidence,
        "review": review,
    }


def _order(alert: dict[str, Any]) -> tuple[Any, ...]:
    started = alert.get("started_at")
    frame = alert.get("onset_frame")
    return (
        started if isinstance(started, int | float) else float("inf"),
        frame if isinstance(frame, int) else -1,
        str(alert.get("type")),
        str(alert.get("object")),
    )


class AlertService:
    def __init__(self, store: Store, settings: Settings, audit: AuditLog) -> None:
        self.store = store
        self.settings = settings
        self.audit = audit
        self._replays = asyncio.Semaphore(settings.rescore_max_concurrent)

    async def _session(self, session_id: str) -> dict[str, Any]:
        try:
            # A live session's latest alerts and frames are committed first.
            await self.store.flush(session_id)
        except StoreError as exc:  # lost or slow writes: read what there is
            log.warning("alerts of %s: %s", session_id, exc)
        try:
            record = await self.store.get_session(session_id)
        except StoreError as exc:
            raise BackendUnavailable(
                "the session store cannot be read", code="store_unavailable"
            ) from exc
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        return record

    async def _episodes(self, session_id: str) -> list[dict[str, Any]]:
        rows = await self.store.alert_rows(session_id)
        episodes = [e for raw in rows if (e := loads_object(raw)) is not None]
        return sorted(episodes, key=_order)

    async def _evidence_ids(self, session_id: str) -> set[str]:
        if self.settings.evidence == "none":
            return set()  # nothing rendered or served
        return await self.store.evidence_ids(session_id)

    async def list_alerts(self, session_id: str) -> dict[str, Any]:
        await self._session(session_id)
        try:
            episodes = await self._episodes(session_id)
            with_evidence = await self._evidence_ids(session_id)
            reviews = await self.store.reviews(session_id)
        except StoreError as exc:
            raise BackendUnavailable(
                "the session store cannot be read", code="store_unavailable"
            ) from exc
        return {
            "session_id": session_id,
            "alerts": self._public(session_id, episodes, with_evidence, reviews),
        }

    @staticmethod
    def _public(
        session_id: str,
        episodes: list[dict[str, Any]],
        with_evidence: set[str],
        reviews: dict[str, dict[str, Any]],
    ) -> list[dict[str, Any]]:
        out = []
        for ep in episodes:
            alert_id = str(ep.get("episode_id"))
            url = evidence_url(session_id, alert_id) if alert_id in with_evidence else None
            out.append(public_alert(ep, evidence=url, review=reviews.get(alert_id)))
        return out

    async def evidence(self, session_id: str, alert_id: str) -> bytes:
        await self._session(session_id)
        try:
            if await self.store.get_alert(session_id, alert_id) is None:
                raise AlertNotFound(f"session {session_id} has no alert {alert_id}")
            snapshot = (
                None
                if self.settings.evidence == "none"
                else await self.store.get_evidence(session_id, alert_id)
            )
        except StoreError as exc:
            raise BackendUnavailable(
                "the session store cannot be read", code="store_unavailable"
            ) from exc
        if snapshot is None:
            raise NoEvidence(f"alert {alert_id} has no evidence snapshot")
        return bytes(snapshot["jpeg"])

    def _own_rules(self, record: dict[str, Any]) -> tuple[list[Any], float | None]:
        stored = record.get("rules")
        if stored is None:  # stored before sessions kept their rules: today's settings
            capture = record.get("transport") in CAPTURE_CLOCK_TRANSPORTS
            dwell = self.settings.rule_frame_interval_s if capture else None
            return rules_from_settings(self.settings), dwell
        try:
            return rules_from_record(stored)
        except RulesUnreadable as exc:
            raise ProctorError(
                f"the session's rule record cannot be read: {exc}",
                code="rules_unreadable",
                status=409,
            ) from None

    async def rescore(self, session_id: str, raw_rules: Any, actor: str) -> dict[str, Any]:
        """The alert history replayed with `raw_rules` (the request's `rules`), beside the
        original (unchanged); audited as `actor`'s re-scoring."""
        try:
            overrides = validate_overrides(raw_rules)
        except RescoreInvalid as exc:
            raise BadRequest(exc.message, code=exc.code) from None
        record = await self._session(session_id)
        own, dwell = self._own_rules(record)
        try:
            rules, disabled = effective_rules(own, dwell, overrides)
        except RescoreInvalid as exc:
            raise BadRequest(exc.message, code=exc.code) from None
        end = None
        if record.get("status") == "ended" and isinstance(record.get("ended_at"), int | float):
            analysed = (record.get("counters") or {}).get("frames_analysed")
            last = analysed - 1 if isinstance(analysed, int) and analysed > 0 else None
            end = (float(record["ended_at"]), last, "session_ended")
        replay = Replay(rules, dwell, end)
        try:
            async with self._replays:
                result = await self.store.scan_frames(session_id, replay.consume, TIMESTAMP_RANGE)
            episodes = await self._episodes(session_id)
            with_evidence = await self._evidence_ids(session_id)
            reviews = await self.store.reviews(session_id)
        except StoreError as exc:
            raise BackendUnavailable(
                "the session store cannot be read", code="store_unavailable"
            ) from exc
        original = self._public(session_id, episodes, with_evidence, reviews)
        by_onset = {(a["type"], a["object"], a["onset_frame"]): a for a in original}
        alerts = []
        for ep in sorted(result.alerts, key=_order):
            record_ = public_alert(ep)
            match = by_onset.get((record_["type"], record_["object"], record_["onset_frame"]))
            # Hypothetical alerts have no id; one that opens where an original did shows
            # that original's snapshot (the same frame confirmed it).
            record_["id"] = None
            record_["original_id"] = None if match is None else match["id"]
            record_["evidence_url"] = None if match is None else match["evidence_url"]
            alerts.append(record_)
        effective = AlertEngine(rules, dwell_interval_s=dwell).describe()
        effective["disabled"] = disabled
        counts = {"original": _counts(original), "rescored": _counts(alerts)}
        # Who tried which thresholds is part of the record (the session is unchanged).
        await self.audit.record(
            actor, "rescore", session_id, {"overrides": raw_rules, "counts": counts}
        )
        return {
            "session_id": session_id,
            "status": record.get("status"),
            "alerts": alerts,
            "original": original,
            "rules": effective,
            "overrides": {
                rule: {k: sorted(v) if isinstance(v, frozenset) else v for k, v in changes.items()}
                for rule, changes in overrides.items()
            },
            "frames": {
                "replayed": result.frames,
                "without_facts": result.frames_without_facts,
            },
            "counts": counts,
            "truncated": result.truncated,
        }


def _counts(alerts: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in alerts:
        out[str(a["type"])] = out.get(str(a["type"]), 0) + 1
    return out
