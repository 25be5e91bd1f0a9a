"""Human review of alerts: an operator confirms or dismisses each alert, with a note.

Alerts are flags for a human, never verdicts (SPEC "Alerts"); the review is the human's
verdict. One review per alert (a later one replaces it; the audit log keeps every one).
Reviews live in their own table and are merged into a report whenever it is read or
built, so a report written before a review shows it too.

A session's review status:
- `confirmed_alerts`: at least one alert was confirmed;
- `reviewed`: every alert has a review, all dismissed;
- `not_reviewed`: anything else (no alerts, or some alerts still without a review).
`review_counts` ({alerts, confirmed, dismissed}) says how far a review has got.
"""

from __future__ import annotations

from typing import Any, Literal

Verdict = Literal["confirmed", "dismissed"]
VERDICTS: tuple[str, ...] = ("confirmed", "dismissed")
ReviewStatus = Literal["not_reviewed", "reviewed", "confirmed_alerts"]
#: A review as the API shows it.
Review = dict[str, Any]  # {verdict, note, at, by}


def review_status(counts: dict[str, int]) -> ReviewStatus:
    if counts.get("confirmed", 0) > 0:
        return "confirmed_alerts"
    alerts = counts.get("alerts", 0)
    if alerts > 0 and counts.get("dismissed", 0) >= alerts:
        return "reviewed"
    return "not_reviewed"


def counts_for(alert_ids: list[str], reviews: dict[str, Review]) -> dict[str, int]:
    verdicts = [reviews[a]["verdict"] for a in alert_ids if a in reviews]
    return {
        "alerts": len(alert_ids),
        "confirmed": verdicts.count("confirmed"),
        "dismissed": verdicts.count("dismissed"),
    }


def apply_reviews(report: dict[str, Any], reviews: dict[str, Review]) -> dict[str, Any]:
    """Each alert of the report gets its `review` (None when not reviewed); the report
    gets `review_status` and `review_counts`. In place; returns the report."""
    alerts = [a for a in report.get("alerts") or [] if isinstance(a, dict)]
    ids = []
    for a in alerts:
        alert_id = a.get("episode_id")
        a["review"] = reviews.get(alert_id) if isinstance(alert_id, str) else None
        if isinstance(alert_id, str):
            ids.append(alert_id)
    counts = counts_for(ids, reviews)
    report["review_status"] = review_status(counts)
    report["review_counts"] = counts
    return report

