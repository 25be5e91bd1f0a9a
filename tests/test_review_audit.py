"""Human review of alerts and who did what (SPEC "Evidence, review and re-scoring"):
named operator tokens (API_TOKENS), reviews on live and ended sessions replacing each
other, the report and the session's review status showing them, the audit log; bad
input, unknown ids, and tokens that stop the server from starting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import ConfigError
from server.signaling.auth import operator_tokens
from tests.cluster_kit import eventually
from tests.conftest import ROOT, RunningServer, free_port, make_settings
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url

ALICE = "alice-token-0123456789"
BOB = "bob-token-abcdefghijkl"
OPERATOR = "operator-s3cret-token"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_token": OPERATOR, "api_tokens": f"alice:{ALICE}, bob:{BOB}"}


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=bearer(token)) as r:
        return r.status, await r.json()


async def session_with_alert(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition, token: str
) -> tuple[str, str]:
    """A live session whose one frame raised multiple_faces_detected: (session, alert)."""
    status, started = await call(
        http, "POST", f"{server.url}/api/sessions/start", token, {"job_data": {"jobTitle": "QA"}}
    )
    assert status == 200, started
    sid = started["session_id"]
    rekognition.set_scene(faces=[fake_face(), fake_face(box=(0.05, 0.1, 0.2, 0.3))])
    status, frame = await call(
        http, "POST", f"{server.url}/api/sessions/{sid}/frame", token, {"frame": face_data_url()}
    )
    assert status == 200, frame
    alerts = frame["result"]["alerts"]
    assert [a["type"] for a in alerts] == ["multiple_faces_detected"]
    rekognition.set_scene(faces=[fake_face()])
    # The evidence snapshot is encoded and stored off the live path: wait for it, so the
    # alert reads the same (with its evidence_url) in every answer a test compares.
    async def evidence_stored() -> bool:
        status, listed = await call(http, "GET", f"{server.url}/api/sessions/{sid}/alerts", token)
        assert status == 200, listed
        return bool(listed["alerts"]) and listed["alerts"][0]["evidence_url"] is not None

    assert await eventually(evidence_stored, within=10, step=0.05), "evidence never stored"
    return sid, alerts[0]["episode_id"]


async def test_reviews_replace_each_other_and_show_in_status_report_and_audit(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid, alert_id = await session_with_alert(server, http, rekognition, ALICE)
    base = f"{server.url}/api/sessions/{sid}"
    status, record = await call(http, "GET", base, ALICE)
    assert status == 200 and record["review_status"] == "not_reviewed"
    assert record["review_counts"] == {"alerts": 1, "confirmed": 0, "dismissed": 0}

    # Alice confirms on the live session; the answer is the alert with her review.
    status, alert = await call(
        http,
        "POST",
        f"{base}/alerts/{alert_id}/review",
        ALICE,
        {"verdict": "confirmed", "note": "a second person sat down"},
    )
    assert status == 200, alert
    assert alert["id"] == alert_id and alert["type"] == "multiple_faces_detected"
    assert alert["severity"] == "critical" and alert["category"] == "behaviour"
    review = alert["review"]
    assert review["verdict"] == "confirmed" and review["by"] == "alice"
    assert review["note"] == "a second person sat down" and isinstance(review["at"], float)
    status, record = await call(http, "GET", base, BOB)
    assert record["review_status"] == "confirmed_alerts"
    status, listed = await call(http, "GET", f"{server.url}/api/sessions", BOB)
    assert [s["review_status"] for s in listed["sessions"]] == ["confirmed_alerts"]

    # Bob's later review replaces it: every alert reviewed, all dismissed.
    status, alert = await call(
        http, "POST", f"{base}/alerts/{alert_id}/review", BOB, {"verdict": "dismissed"}
    )
    assert status == 200 and alert["review"]["by"] == "bob" and alert["review"]["note"] is None
    status, record = await call(http, "GET", base, OPERATOR)
    assert record["review_status"] == "reviewed"
    assert record["review_counts"] == {"alerts": 1, "confirmed": 0, "dismissed": 1}

    # The report built at the end carries the review; so does every later read.
    status, report = await call(http, "POST", f"{base}/end", OPERATOR)
    assert status == 200
    [reported] = report["alerts"]
    assert reported["review"]["verdict"] == "dismissed" and reported["review"]["by"] == "bob"
    assert report["review_status"] == "reviewed"

    # The audit log keeps both reviews, newest first, with who and what came before.
    status, audit = await call(http, "GET", f"{server.url}/api/audit?session_id={sid}", ALICE)
    assert status == 200, audit
    reviews = [e for e in audit["entries"] if e["action"] == "review"]
    assert [(e["actor"], e["details"]["verdict"]) for e in reviews] == [
        ("bob", "dismissed"),
        ("alice", "confirmed"),
    ]
    assert reviews[0]["details"]["previous_verdict"] == "confirmed"
    assert reviews[1]["details"]["previous_verdict"] is None
    assert {e["session_id"] for e in reviews} == {sid}
    assert all(
        set(e) == {"id", "at", "actor", "action", "session_id", "details"} for e in audit["entries"]
    )
    assert len({e["id"] for e in audit["entries"]}) == len(audit["entries"])


async def test_the_alert_list_shows_reviews_and_rescoring_is_audited(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid, alert_id = await session_with_alert(server, http, rekognition, ALICE)
    base = f"{server.url}/api/sessions/{sid}"
    status, listed = await call(http, "GET", f"{base}/alerts", BOB)
    assert status == 200 and [a["review"] for a in listed["alerts"]] == [None]

    status, reviewed = await call(
        http, "POST", f"{base}/alerts/{alert_id}/review", BOB, {"verdict": "dismissed"}
    )
    assert status == 200 and reviewed["evidence_url"] == listed["alerts"][0]["evidence_url"]
    status, listed = await call(http, "GET", f"{base}/alerts", ALICE)
    assert status == 200
    (alert,) = listed["alerts"]
    assert alert["id"] == alert_id
    assert alert["review"]["verdict"] == "dismissed" and alert["review"]["by"] == "bob"

    rules = {"multiple_faces_detected": {"enabled": False}}
    status, rescored = await call(http, "POST", f"{base}/rescore", ALICE, {"rules": rules})
    assert status == 200 and rescored["alerts"] == []
    assert rescored["original"][0]["review"]["verdict"] == "dismissed"
    status, audit = await call(http, "GET", f"{server.url}/api/audit?session_id={sid}", BOB)
    assert status == 200
    entry = next(e for e in audit["entries"] if e["action"] == "rescore")
    assert entry["actor"] == "alice" and entry["details"]["overrides"] == rules
    assert entry["details"]["counts"]["rescored"] == {}


async def test_a_review_after_the_report_was_stored_shows_in_it(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid, alert_id = await session_with_alert(server, http, rekognition, OPERATOR)
    base = f"{server.url}/api/sessions/{sid}"
    status, _ = await call(http, "POST", f"{base}/end", OPERATOR)
    status, before = await call(http, "GET", f"{base}/report", OPERATOR)
    assert status == 200 and before["alerts"][0]["review"] is None
    assert before["review_status"] == "not_reviewed"
    status, alert = await call(
        http,
        "POST",
        f"{base}/alerts/{alert_id}/review",
        OPERATOR,
        {"verdict": "confirmed", "note": "seen on the recording"},
    )
    assert status == 200 and alert["review"]["by"] == "operator"  # API_TOKEN's name
    assert alert["ended_at"] is not None and alert["duration_s"] is not None
    status, after = await call(http, "GET", f"{base}/report", OPERATOR)
    assert after["alerts"][0]["review"]["verdict"] == "confirmed"
    assert after["review_status"] == "confirmed_alerts"
    assert after["review_counts"] == {"alerts": 1, "confirmed": 1, "dismissed": 0}


async def test_review_refuses_bad_input_and_unknown_ids(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid, alert_id = await session_with_alert(server, http, rekognition, OPERATOR)
    url = f"{server.url}/api/sessions/{sid}/alerts/{alert_id}/review"
    for body, code in (
        ({}, "missing_field"),
        ({"verdict": "maybe"}, "invalid_field"),
        ({"verdict": "confirmed", "note": "x" * 2001}, "invalid_field"),
        ({"verdict": "confirmed", "note": 5}, "invalid_field"),
        ({"verdict": "confirmed", "by": "mallory"}, "invalid_field"),  # who is the token
        ([], "invalid_json"),
    ):
        status, data = await call(http, "POST", url, OPERATOR, body)
        assert (status, data["error"]["code"]) == (400, code), body
    async with http.post(url, data=b"{not json", headers=bearer(OPERATOR)) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    status, data = await call(
        http, "POST", url, OPERATOR, {"verdict": "confirmed", "note": "é" * 2000}
    )
    assert status == 200 and data["review"]["note"] == "é" * 2000  # at the cap: accepted
    for path, code in (
        (f"/api/sessions/no-such-session/alerts/{alert_id}/review", "session_not_found"),
        (f"/api/sessions/{sid}/alerts/no-such-alert/review", "alert_not_found"),
    ):
        status, data = await call(
            http, "POST", server.url + path, OPERATOR, {"verdict": "dismissed"}
        )
        assert (status, data["error"]["code"]) == (404, code)
    # An alert of another session is unknown in this one.
    _other, other_alert = await session_with_alert(server, http, rekognition, OPERATOR)
    status, data = await call(
        http,
        "POST",
        f"{server.url}/api/sessions/{sid}/alerts/{other_alert}/review",
        OPERATOR,
        {"verdict": "dismissed"},
    )
    assert (status, data["error"]["code"]) == (404, "alert_not_found")
    status, data = await call(http, "GET", f"{server.url}/api/sessions/nope", OPERATOR)
    assert (status, data["error"]["code"]) == (404, "session_not_found")
    # Only the operator reviews: the session's own candidate may not.
    status, started = await call(
        http, "POST", f"{server.url}/api/sessions/start", OPERATOR, {"job_data": {}}
    )
    status, data = await call(
        http,
        "POST",
        f"{server.url}/api/sessions/{started['session_id']}/alerts/x/review",
        started["candidate_token"],
        {"verdict": "dismissed"},
    )
    assert (status, data["error"]["code"]) == (403, "forbidden")


async def test_audit_list_pages_and_validates(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid, alert_id = await session_with_alert(server, http, rekognition, ALICE)
    url = f"{server.url}/api/sessions/{sid}/alerts/{alert_id}/review"
    for verdict in ("confirmed", "dismissed", "confirmed"):
        status, _ = await call(http, "POST", url, BOB, {"verdict": verdict})
        assert status == 200
    status, page1 = await call(http, "GET", f"{server.url}/api/audit?limit=2", ALICE)
    status, page2 = await call(http, "GET", f"{server.url}/api/audit?limit=2&offset=2", ALICE)
    assert page1["count"] == 2 and page2["count"] == 1
    verdicts = [e["details"]["verdict"] for e in page1["entries"] + page2["entries"]]
    assert verdicts == ["confirmed", "dismissed", "confirmed"]
    status, none = await call(http, "GET", f"{server.url}/api/audit?session_id=other", ALICE)
    assert status == 200 and none == {"entries": [], "count": 0}
    for query in ("limit=0", "limit=1001", "limit=x", "offset=-1"):
        status, data = await call(http, "GET", f"{server.url}/api/audit?{query}", ALICE)
        assert (status, data["error"]["code"]) == (400, "invalid_field"), query


async def test_named_tokens_alone_secure_the_server(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    from tests.conftest import start_server

    srv = await start_server(make_settings(tmp_path, api_tokens=f"carol:{ALICE}"))
    try:
        status, data = await call(http, "GET", f"{srv.url}/api/sessions", None)
        assert (status, data["error"]["code"]) == (401, "unauthorized")
        status, _ = await call(http, "GET", f"{srv.url}/api/sessions", ALICE)
        assert status == 200
        status, _ = await call(http, "GET", f"{srv.url}/api/sessions", OPERATOR)
        assert status == 401  # API_TOKEN is not set here
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("api_token", "api_tokens", "complaint"),
    [
        ("", "alice", "expected name:token"),
        ("", "alice:", "expected name:token"),
        ("", ":" + ALICE, "expected name:token"),
        ("", f"alice:{ALICE},,bob:{BOB}", "entry 2"),
        ("", "al ice:" + ALICE, "may use only letters"),
        ("", "alice:short-secret", "shorter than 16"),
        ("", f"alice:{ALICE},alice:{BOB}", "name 'alice' is also used"),
        ("", f"alice:{ALICE},bob:{ALICE}", "also alice's"),
        (ALICE, f"bob:{ALICE}", "also operator's"),
        (OPERATOR, f"operator:{ALICE}", "name 'operator' is also used"),
        ("short", "", "API_TOKEN: the token of 'operator' is shorter"),
    ],
)
def test_malformed_operator_tokens_are_refused_without_showing_them(
    api_token: str, api_tokens: str, complaint: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, api_token=api_token, api_tokens=api_tokens)
    with pytest.raises(ConfigError) as refused:
        operator_tokens(settings)
    message = str(refused.value)
    assert complaint in message, message
    for secret in (ALICE, BOB, OPERATOR, "short-secret"):
        assert secret not in message


def test_operator_tokens_are_named() -> None:
    settings = make_settings(
        Path("/nonexistent"), api_token=OPERATOR, api_tokens=f" alice:{ALICE} , bob:{BOB}:x "
    )
    assert operator_tokens(settings) == {
        "operator": OPERATOR,
        "alice": ALICE,
        "bob": f"{BOB}:x",  # a token may hold a colon; only the first one splits
    }


def test_serve_refuses_to_start_with_malformed_tokens(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "API_TOKEN": "",
        "API_TOKENS": f"alice:{ALICE},bob:tiny-secret",
        "DATABASE_PATH": str(tmp_path / "db.sqlite3"),
        "ANALYSER_BACKEND": "local",
    }
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "refusing to start: API_TOKENS entry 2" in out and "shorter than 16" in out
    assert "tiny-secret" not in out and ALICE not in out
