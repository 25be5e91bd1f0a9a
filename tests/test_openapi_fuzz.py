"""The REST API fuzzed from its own OpenAPI document (hypothesis, a bounded number of
examples): whatever a client sends — bodies drawn from each request
schema, arbitrary JSON, odd path ids and query strings — the answer is never a 5xx, and
every 4xx carries a stable error code."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer
from tests.hostile_inputs import FRAMES, TIMESTAMPS
from tests.media import face_data_url

OPERATOR = "fuzz-operator-token"
MAX_EXAMPLES = 150
# The offer's SDP is fuzzed with the WebRTC battery (it starts real peer connections).
SKIP = {("/api/rtc/offer", "post")}

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


def from_schema(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for the JSON-schema subset pydantic writes for our request models
    ($ref, anyOf, const/enum, typed scalars, objects, arrays)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return from_schema(root["components"]["schemas"][name], root)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return st.text(max_size=60)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "integer":
        return st.integers(min_value=-(10**12), max_value=10**12)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root), max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fixed = {k: from_schema(v, root) for k, v in props.items() if k in required}
        optional = {k: from_schema(v, root) for k, v in props.items() if k not in required}
        extra = schema.get("additionalProperties")
        if not props and extra not in (None, False):
            return st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=5)
        return st.fixed_dictionaries(fixed, optional=optional)
    return JSON_VALUES


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_token": OPERATOR, "max_live_sessions": 1000}


def send(url: str, method: str, body: bytes | None, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method=method.upper())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if ctype.startswith("application/json") else raw


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if (path, method) in SKIP:
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            schema = body["schema"] if body is not None else None
            ops.append((path, method, schema))
    return ops


async def test_rest_api_fuzzed_from_openapi(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    async with http.get(f"{server.url}/api/openapi.json") as r:
        doc = await r.json()
    sessions = []
    for _ in range(3):
        async with http.post(f"{server.url}/api/sessions/start", json={}, headers=headers) as r:
            sessions.append((await r.json())["session_id"])
    ops = operations(doc)
    assert {"/api/sessions/start", "/api/sessions/{session_id}/frame"} <= {p for p, _, _ in ops}

    frames = st.sampled_from([face_data_url()] + [v for _, v, _ in FRAMES])
    stamps = st.sampled_from([None] + [v for _, v in TIMESTAMPS])
    ids = st.sampled_from(sessions) | st.sampled_from(["unknown", "%00", "x" * 300]) | st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
        min_size=1,
        max_size=30,
    )
    queries = st.dictionaries(
        st.sampled_from(["status", "limit", "offset", "x"]), st.text(max_size=12), max_size=3
    )
    tokens = st.sampled_from([OPERATOR, OPERATOR, OPERATOR, None, "junk"])
    seen: list[tuple[str, int]] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        path, method, schema = data.draw(st.sampled_from(ops), label="operation")
        url = server.url + path.replace("{session_id}", urllib.request.quote(data.draw(ids), safe=""))
        if method == "get":
            query = data.draw(queries)
            if query:
                url += "?" + "&".join(f"{k}={urllib.request.quote(v)}" for k, v in query.items())
        body: bytes | None = None
        if method == "post":
            kind = data.draw(st.sampled_from(["schema", "json", "frame", "empty"]))
            if kind == "schema" and schema is not None:
                value: Any = data.draw(from_schema(schema, doc), label="body")
            elif kind == "frame":
                value = {"frame": data.draw(frames), "timestamp": data.draw(stamps)}
            elif kind == "json":
                value = data.draw(JSON_VALUES, label="json")
            else:
                value = None
            body = b"" if value is None else json.dumps(value).encode()
        status, answer = send(url, method, body, data.draw(tokens))
        seen.append((path, status))
        assert status < 500, (method, url[:120], status, answer)
        if status >= 400:
            assert isinstance(answer, dict) and isinstance(answer["error"]["code"], str)

    await asyncio.to_thread(check)
    assert len(seen) >= MAX_EXAMPLES
    statuses = {s for _, s in seen}
    assert 200 in statuses and statuses & {400, 404, 413}  # both sides were reached
    async with http.get(f"{server.url}/health") as r:
        assert r.status == 200
