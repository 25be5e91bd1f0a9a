"""The LLM narrative through the real OpenAI and Anthropic SDKs, against local fakes of
their HTTP APIs (tests/fakes/llm.py) reached through the SDKs' own base-URL variables."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from server.config import Settings
from server.observability import Instruments
from server.session.narrative import (
    MAX_ALERTS,
    AnthropicNarrator,
    Narrative,
    Narrator,
    OpenAINarrator,
    TokenUsage,
    build_prompt,
    facts_from_report,
    make_narrator,
    parse_reply,
)
from tests.fakes.llm import FakeAnthropic, FakeOpenAI, FakeReply

HERMETIC_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "OPENAI_CUSTOM_HEADERS",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_AUTH_TOKEN",
)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,  # never a developer's .env
        "openai_api_key": "sk-test-openai",
        "anthropic_api_key": "sk-ant-test",
        "openai_model": "gpt-test-mini",
        "anthropic_model": "claude-test-haiku",
        "llm_timeout_s": 5.0,
        "llm_max_tokens": 321,
        "llm_provider": "auto",
    }
    values.update(overrides)
    return Settings(**values)


def report(n_alerts: int = 3) -> dict[str, Any]:
    t0 = 1_700_000_000.0
    alerts = [
        {
            "type": "multiple_faces_detected" if i % 10 == 0 else "looking_away",
            "severity": "critical" if i % 10 == 0 else "warning",
            "started_at": t0 + 10 * i,
            "ended_at": t0 + 10 * i + 4,
            "duration_s": 4.0,
            "frames": [{"bbox": [0.1, 0.2, 0.3, 0.4]}] * 20,  # frame-level: must not be sent
            "snapshot": "data:image/jpeg;base64," + "A" * 1000,
        }
        for i in range(n_alerts)
    ]
    return {
        "session_id": "s-1",
        "job_data": {
            "jobTitle": "Software Engineer",
            "department": "Platform",
            "description": "Builds distributed systems. " * 400,
        },
        # As server/session/report.py writes them: ISO in the summary, epoch in alerts.
        "summary": {
            "started_at": datetime.fromtimestamp(t0, UTC).isoformat(),
            "ended_at": datetime.fromtimestamp(t0 + 1800, UTC).isoformat(),
            "duration_seconds": 1800,
            "frames_received": 3600,
            "frames_analysed": 1800,
        },
        "behavioural_scores": {
            m: {"average": 71.23456, "min": 20.0, "max": 98.0, "trend": "stable"}
            for m in ("eye_contact", "engagement", "facial_expression", "posture", "confidence")
        },
        "emotion_distribution": {
            "CALM": 0.61234,
            "HAPPY": 0.2,
            "CONFUSED": 0.1,
            "SAD": 0.05,
            "ANGRY": 0.01,
            "DISGUSTED": 0.01,
            "SURPRISED": 0.01,
            "FEAR": 0.005,
            "UNKNOWN": 0.001,
        },
        "emotion_timeline": [{"t": i, "CALM": 0.5} for i in range(2000)],
        "frames": [{"t": i, "faces": 1} for i in range(2000)],
        "alerts": alerts,
        "alert_summary": {
            "looking_away": {"count": n_alerts, "total_duration_s": 4.0 * n_alerts},
        },
    }


def llm_calls(instruments: Instruments, provider: str, outcome: str) -> float:
    value = instruments.registry.get_sample_value(
        "proctor_llm_calls_total", {"provider": provider, "outcome": outcome}
    )
    return value or 0.0


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HERMETIC_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def fake_openai(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_anthropic(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", await fake.start())
    yield fake
    await fake.stop()


@pytest.fixture(params=["openai", "anthropic"])
async def provider(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, FakeOpenAI | FakeAnthropic]]:
    fake: FakeOpenAI | FakeAnthropic
    if request.param == "openai":
        fake = FakeOpenAI()
        monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    else:
        fake = FakeAnthropic()
        monkeypatch.setenv("ANTHROPIC_BASE_URL", await fake.start())
    yield request.param, fake
    await fake.stop()


def narrator_for(
    name: str, settings: Settings, instruments: Instruments | None = None, **kw: Any
) -> OpenAINarrator | AnthropicNarrator:
    cls = OpenAINarrator if name == "openai" else AnthropicNarrator
    return cls(settings, instruments, **kw)


async def test_openai_success(fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = FakeReply(
        content=json.dumps({"summary": "Focused session.", "cultural_fit": "Fits the role."}),
        prompt_tokens=1234,
        completion_tokens=87,
    )
    instruments = Instruments()
    settings = make_settings()
    narrator = OpenAINarrator(settings, instruments)
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()

    assert result.error is None
    assert (result.provider, result.model) == ("openai", "gpt-test-mini")
    assert result.summary == "Focused session."
    assert result.cultural_fit == "Fits the role."
    assert result.usage == TokenUsage(prompt_tokens=1234, completion_tokens=87, total_tokens=1321)
    assert result.latency_ms > 0
    assert llm_calls(instruments, "openai", "ok") == 1

    assert len(fake_openai.requests) == 1
    req = fake_openai.last
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer sk-test-openai"
    assert req.body["model"] == "gpt-test-mini"
    assert req.body["max_completion_tokens"] == 321
    assert req.body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in req.body["messages"]] == ["system", "user"]
    prompt = req.prompt_text()
    assert "Software Engineer" in prompt
    assert "apparent facial expressions" in prompt
    assert "protected characteristics" in prompt
    assert "emotion_timeline" not in prompt and "data:image" not in prompt

    as_json = json.loads(json.dumps(result.to_json()))
    assert as_json["usage"] == {
        "prompt_tokens": 1234,
        "completion_tokens": 87,
        "total_tokens": 1321,
    }
    assert as_json["summary"] == "Focused session." and as_json["error"] is None


async def test_anthropic_success(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.reply = FakeReply(
        content=json.dumps({"summary": "Calm and attentive.", "cultural_fit": "Suits a team."}),
        prompt_tokens=900,
        completion_tokens=61,
    )
    instruments = Instruments()
    narrator = AnthropicNarrator(make_settings(), instruments)
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()

    assert result.error is None
    assert (result.provider, result.model) == ("anthropic", "claude-test-haiku")
    assert result.summary == "Calm and attentive."
    assert result.cultural_fit == "Suits a team."
    assert result.usage == TokenUsage(prompt_tokens=900, completion_tokens=61, total_tokens=961)
    assert llm_calls(instruments, "anthropic", "ok") == 1

    req = fake_anthropic.last
    assert req.path == "/v1/messages"
    # This SDK generation sends the key as a bearer token; older ones as x-api-key.
    sent_key = req.headers.get("x-api-key") or req.headers["Authorization"].removeprefix("Bearer ")
    assert sent_key == "sk-ant-test"
    assert req.headers.get("anthropic-version")
    assert req.body["model"] == "claude-test-haiku"
    assert req.body["max_tokens"] == 321
    assert "apparent facial expressions" in req.body["system"]
    assert [m["role"] for m in req.body["messages"]] == ["user"]
    assert "Software Engineer" in req.body["messages"][0]["content"]


async def test_server_error_is_reported_not_raised(
    provider: tuple[str, FakeOpenAI | FakeAnthropic],
) -> None:
    name, fake = provider
    fake.reply = FakeReply(status=500)
    instruments = Instruments()
    narrator = narrator_for(name, make_settings(), instruments, max_retries=0)
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    assert result.error is not None and result.error.startswith("api_error: 500")
    assert "nternal server error" in result.error or "had an error" in result.error
    assert result.summary is None and result.cultural_fit is None
    assert result.usage == TokenUsage()
    assert len(fake.requests) == 1
    assert llm_calls(instruments, name, "api_error") == 1


async def test_one_retry_recovers_from_a_transient_error(
    provider: tuple[str, FakeOpenAI | FakeAnthropic],
) -> None:
    name, fake = provider
    fake.push(FakeReply(status=500, retry_after_ms=10))
    narrator = narrator_for(name, make_settings())  # default: one retry
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    assert result.error is None
    assert result.summary
    assert len(fake.requests) == 2


@pytest.mark.parametrize(("status", "expected"), [(429, "rate_limited"), (401, "auth")])
async def test_rate_limit_and_auth_errors(
    provider: tuple[str, FakeOpenAI | FakeAnthropic], status: int, expected: str
) -> None:
    name, fake = provider
    fake.reply = FakeReply(status=status)
    instruments = Instruments()
    narrator = narrator_for(name, make_settings(), instruments, max_retries=0)
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    assert result.error == expected
    assert result.summary is None
    assert llm_calls(instruments, name, expected) == 1


async def test_slow_provider_times_out_quickly(
    provider: tuple[str, FakeOpenAI | FakeAnthropic],
) -> None:
    name, fake = provider
    fake.reply = FakeReply(delay_s=10.0)
    instruments = Instruments()
    # The default retry stays on: the hard bound must cover attempts plus retries.
    narrator = narrator_for(name, make_settings(llm_timeout_s=0.5), instruments)
    started = time.perf_counter()
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    elapsed = time.perf_counter() - started
    assert result.error == "timeout after 0.5s"
    assert result.summary is None
    # The SDK alone (timeout, backoff, retry, timeout) takes ~1.5 s here.
    assert 0.4 <= elapsed < 1.2
    assert 400 <= result.latency_ms < 1200
    assert llm_calls(instruments, name, "timeout") == 1
    assert len(fake.requests) >= 1


async def test_non_json_reply_becomes_the_summary(
    provider: tuple[str, FakeOpenAI | FakeAnthropic],
) -> None:
    name, fake = provider
    fake.reply = FakeReply(content="  The candidate stayed focused throughout.  ")
    narrator = narrator_for(name, make_settings())
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    assert result.error is None
    assert result.summary == "The candidate stayed focused throughout."
    assert result.cultural_fit is None


async def test_empty_reply_is_an_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = FakeReply(content="", completion_tokens=0)
    instruments = Instruments()
    narrator = OpenAINarrator(make_settings(), instruments)
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    assert result.error == "empty_response"
    assert result.usage.prompt_tokens == 120  # what was billed is still reported
    assert llm_calls(instruments, "openai", "empty") == 1


async def test_unreachable_provider_is_a_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    await fake.stop()  # nothing listens on that port any more
    narrator = OpenAINarrator(make_settings(), max_retries=0)
    try:
        result = await narrator.narrate(facts_from_report(report()))
    finally:
        await narrator.close()
    assert result.error is not None and result.error.startswith("connection_error")
    assert result.summary is None


def test_parse_reply_tolerates_fences_prose_and_truncation() -> None:
    obj = {"summary": "A.", "cultural_fit": "B."}
    assert parse_reply(json.dumps(obj)) == ("A.", "B.")
    assert parse_reply("```json\n" + json.dumps(obj) + "\n```") == ("A.", "B.")
    assert parse_reply("Here it is: " + json.dumps(obj) + " Thanks.") == ("A.", "B.")
    # cut off by the token limit after a complete summary string
    assert parse_reply('{"summary": "Steady \\"focus\\".", "cultural_fit": "Goo') == (
        'Steady "focus".',
        None,
    )
    assert parse_reply('{"other": 1}') == ('{"other": 1}', None)
    assert parse_reply("   ") == (None, None)


@pytest.mark.parametrize(
    ("provider_setting", "openai_key", "anthropic_key", "expected"),
    [
        ("none", "sk-o", "sk-a", None),
        ("auto", "sk-o", "sk-a", "openai"),
        ("auto", "", "sk-a", "anthropic"),
        ("auto", "", "", None),
        ("openai", "sk-o", "sk-a", "openai"),
        ("openai", "", "sk-a", None),
        ("anthropic", "sk-o", "sk-a", "anthropic"),
        ("anthropic", "sk-o", "", None),
    ],
)
async def test_make_narrator_selection(
    provider_setting: str, openai_key: str, anthropic_key: str, expected: str | None
) -> None:
    settings = make_settings(
        llm_provider=provider_setting, openai_api_key=openai_key, anthropic_api_key=anthropic_key
    )
    narrator = make_narrator(settings)
    if expected is None:
        assert narrator is None
        return
    assert narrator is not None
    try:
        assert isinstance(narrator, Narrator)
        assert narrator.provider == expected
        assert narrator.model == ("gpt-test-mini" if expected == "openai" else "claude-test-haiku")
    finally:
        await narrator.close()


def test_facts_from_report_trims() -> None:
    full = report(n_alerts=120)
    facts = facts_from_report(full)

    assert set(facts) <= {
        "job_data",
        "summary",
        "behavioural_scores",
        "emotion_distribution",
        "alert_summary",
        "alerts",
        "alerts_total",
        "alerts_omitted",
        "body_language",
    }
    assert facts["job_data"]["jobTitle"] == "Software Engineer"
    assert len(facts["job_data"]["description"]) <= 1500
    assert facts["summary"]["frames_analysed"] == 1800
    assert facts["behavioural_scores"]["eye_contact"]["average"] == pytest.approx(71.235)
    assert len(facts["emotion_distribution"]) == 8
    assert next(iter(facts["emotion_distribution"])) == "CALM"

    alerts = facts["alerts"]
    assert len(alerts) == MAX_ALERTS
    assert facts["alerts_total"] == 120 and facts["alerts_omitted"] == 70
    # every critical episode is kept, and the kept ones stay in time order
    assert sum(a["severity"] == "critical" for a in alerts) == 12
    offsets = [a["at_s"] for a in alerts]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    for a in alerts:
        assert "frames" not in a and "snapshot" not in a and "started_at" not in a
        assert a["duration_s"] == 4.0

    _, user = build_prompt(facts)
    assert len(user) < 12_000  # bounded however long the session was
    assert len(json.dumps(full)) > 10 * len(user)


def test_narrative_to_json_shape() -> None:
    n = Narrative("openai", "m", None, None, TokenUsage(), "rate_limited", 12.345)
    assert n.to_json() == {
        "provider": "openai",
        "model": "m",
        "summary": None,
        "cultural_fit": None,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "error": "rate_limited",
        "latency_ms": 12.3,
    }
    assert not n.ok
