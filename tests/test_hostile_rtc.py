"""A battery of crafted offers and data-channel messages against one real server while an
honest candidate streams: no case is ever answered with a 5xx; a refused offer is a 4xx
with a JSON error code; an offer that is still negotiable (a junk candidate line among
good ones, say) gets a real answer; truly broken offers (`MUST_REFUSE`) are refused; every
crafted data-channel message gets an `error` message. Through it all the server stays
healthy, the honest session and the hostile page's own session keep being analysed, and
the hostile peer stays connected."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer
from tests.rtc_client import RtcTestClient, SyntheticCamera, face_blank_scenes

pytestmark = [pytest.mark.netns, pytest.mark.slow]

Mutation = Callable[[str], str]


def _sub(pattern: str, repl: str, count: int = 0) -> Mutation:
    return lambda sdp: re.sub(pattern, repl, sdp, count=count, flags=re.M)


def _drop(prefix: str) -> Mutation:
    return lambda sdp: "\r\n".join(ln for ln in sdp.split("\r\n") if not ln.startswith(prefix))


def _append(lines: str) -> Mutation:
    return lambda sdp: sdp.rstrip("\r\n") + "\r\n" + lines + "\r\n"


SDP_MUTATIONS: dict[str, Mutation] = {
    "empty": lambda sdp: "",
    "whitespace": lambda sdp: " \r\n\t ",
    "no v=0": lambda sdp: sdp.replace("v=0", "v=1", 1),
    "garbage": lambda sdp: "this is not sdp at all",
    "binary-ish": lambda sdp: "v=0\r\n\x00\x01\x02\xff",
    "only v=0": lambda sdp: "v=0\r\n",
    "no media": lambda sdp: sdp.split("m=")[0],
    "truncated half": lambda sdp: sdp[: len(sdp) // 2],
    "truncated m-line": lambda sdp: sdp[: sdp.index("m=video") + 9],
    "no ice-ufrag": _drop("a=ice-ufrag"),
    "no ice-pwd": _drop("a=ice-pwd"),
    "no fingerprint": _drop("a=fingerprint"),
    "unknown fingerprint alg": _sub(r"^a=fingerprint:\S+", "a=fingerprint:md2"),
    "bad fingerprint value": _sub(r"^(a=fingerprint:\S+) .*$", r"\1 zz:zz"),
    "no video m-line": _sub(r"^m=video", "m=text"),
    "video port 0": _sub(r"^m=video \d+", "m=video 0"),
    "video recvonly": _sub(r"^a=sendonly", "a=recvonly"),
    "video inactive": _sub(r"^a=sendonly", "a=inactive"),
    "no codecs": _sub(r"^(m=video \d+ \S+)( \d+)+", r"\1"),
    "unknown codec only": lambda sdp: re.sub(
        r"^a=rtpmap:(\d+) (VP8|H264|rtx)/", r"a=rtpmap:\1 FOO9/", sdp, flags=re.M),
    "no data channel": lambda sdp: sdp[: sdp.index("m=application")],
    "rtpmap garbage": _sub(r"^a=rtpmap:(\d+) ", r"a=rtpmap:\1 ////"),
    "rtpmap huge pt": _sub(r"^a=rtpmap:(\d+) ", "a=rtpmap:99999999999999999999 "),
    "fmtp garbage": _append("a=fmtp:96 \x7f\x7f=;;;;=="),
    "bad candidate": _append("a=candidate:x"),
    "candidate huge port": _append("a=candidate:1 1 udp 1 127.0.0.1 999999 typ host"),
    "candidate bad typ": _append("a=candidate:1 1 udp 1 127.0.0.1 9 typ nonsense"),
    "candidate ipv6 garbage": _append("a=candidate:1 1 udp 1 ::gg 9 typ host"),
    "bad extmap": _append("a=extmap:notanumber urn:x"),
    "bad ssrc": _append("a=ssrc:abc cname:x"),
    "bad rtcp-fb": _append("a=rtcp-fb:* \x00"),
    "bad mid": _sub(r"^a=mid:.*$", "a=mid:"),
    "bundle nonsense": _sub(r"^a=group:BUNDLE.*$", "a=group:BUNDLE 9 9 9 9"),
    "sctp-port garbage": _sub(r"^a=sctp-port:.*$", "a=sctp-port:banana"),
    "max-message-size garbage": _sub(r"^a=max-message-size:.*$", "a=max-message-size:-1"),
    "setup nonsense": _sub(r"^a=setup:.*$", "a=setup:sideways"),
    "duplicate video": lambda sdp: sdp + sdp[sdp.index("m=video"): sdp.index("m=application")],
    "many media": lambda sdp: sdp + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n" * 500,
    "oversized": lambda sdp: sdp + ("a=x-filler:" + "y" * 1000 + "\r\n") * 120,
    "lf only": lambda sdp: sdp.replace("\r\n", "\n").replace("a=ice-ufrag", "a=ice-ufragX"),
}

#: Mutations that leave no negotiable offer: they must be refused (400).
MUST_REFUSE = frozenset(SDP_MUTATIONS) - {
    "candidate huge port", "candidate bad typ", "candidate ipv6 garbage", "bad rtcp-fb",
    "bad mid", "bundle nonsense", "max-message-size garbage", "bad candidate", "bad ssrc",
    "fmtp garbage", "bad extmap", "rtpmap garbage", "setup nonsense", "lf only",
    "sctp-port garbage", "rtpmap huge pt",
}


def _answered_well(status: int, body: Any, must_refuse: bool) -> bool:
    if 400 <= status < 500:
        return isinstance(body, dict) and bool((body.get("error") or {}).get("code"))
    if status == 200 and not must_refuse:
        return isinstance(body, dict) and body.get("type") == "answer" and bool(body.get("sdp"))
    return False


BODY_CASES: dict[str, tuple[str | bytes, dict[str, str]]] = {
    "not json": ("{sdp:", {}),
    "json array": ("[1, 2]", {}),
    "json string": ('"offer"', {}),
    "json null": ("null", {}),
    "deeply nested": ("[" * 50_000 + "]" * 50_000, {}),
    "NaN": ('{"sdp": "v=0", "type": "offer", "n": NaN}', {}),
    "Infinity": ('{"sdp": "v=0", "type": "offer", "n": Infinity}', {}),
    "5000 digits": ('{"sdp": "v=0", "type": "offer", "n": ' + "7" * 5000 + "}", {}),
    "sdp not a string": ('{"sdp": 12, "type": "offer"}', {}),
    "sdp an object": ('{"sdp": {"v": 0}, "type": "offer"}', {}),
    "type answer": ('{"sdp": "v=0", "type": "answer"}', {}),
    "type missing sdp": ('{"type": "offer"}', {}),
    "session_id number": ('{"sdp": "v=0", "type": "offer", "session_id": 5}', {}),
    "session_id huge": (json.dumps({"sdp": "v=0", "type": "offer", "session_id": "s" * 100_000}),
                        {}),
    "job_data list": ('{"sdp": "v=0", "type": "offer", "job_data": [1]}', {}),
    "invalid utf-8": (b'{"sdp": "\xff\xfe", "type": "offer"}', {}),
    "empty body": ("", {}),
    "bom": ("\ufeff{}", {}),
}

CHANNEL_CASES: list[str | bytes] = [
    b"\x00\x01binary",
    b"",
    "",
    " ",
    "x" * 20_000,
    "[" * 8000 + "]" * 8000,
    '{"type": "ping", "t": NaN}',
    '{"type": "ping", "t": Infinity}',
    '{"type": "ping", "t": ' + "9" * 5000 + "}",
    '{"type": "ping", "t": 1e999}',
    "{broken",
    "null",
    "42",
    '"ping"',
    '["ping"]',
    "{}",
    '{"type": null}',
    '{"type": 1}',
    '{"type": ["end_session"]}',
    '{"type": {"x": 1}}',
    '{"type": "start_session"}',
    '{"type": "analyze_frame", "frame": "data:image/jpeg;base64,AAAA"}',
    '{"type": "' + "z" * 5000 + '"}',
    '{"type": "get_live_metrics", "x": ' + "[" * 20 + "]" * 20 + "}",
    '{"type": "\\u0000"}',
    '{"type": "\\ud800"}',
    '{"type": "pong"}',
    '{"type": "error", "code": "x"}',
    '{"type": "session_ended"}',
    '{"type": "adjust_video", "max_width": 1}',
    "\ufeff" + '{"type": "ping"}',
    '{"type": "ping"}' * 3,
    '{"type": "get_live_metrics"' + ', "pad": "' + "p" * 16_400 + '"}',
]


async def _post(http: aiohttp.ClientSession, url: str, body: str | bytes,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.post(url, data=body, headers={"Content-Type": "application/json",
                                                  **(headers or {})}) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def test_hostile_offers_and_messages_never_break_a_session(
    rtc_server: RunningServer,
) -> None:
    honest = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    hostile = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    failures: list[str] = []
    cases = 0
    accepted = 0
    try:
        await honest.connect(job_data={"jobTitle": "honest"})
        await honest.wait_for("frame_analysis")
        await hostile.connect(job_data={"jobTitle": "hostile"})
        await hostile.opened()
        await hostile.wait_for("frame_analysis")
        probe = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
        real_sdp = await probe.make_offer()
        await probe.close()
        offer_url = f"{rtc_server.url}/api/rtc/offer"
        async with aiohttp.ClientSession() as http:
            for name, mutate in SDP_MUTATIONS.items():
                cases += 1
                try:
                    sdp = mutate(real_sdp)
                except ValueError:
                    sdp = real_sdp + "\x00"
                status, body = await _post(http, offer_url,
                                           json.dumps({"sdp": sdp, "type": "offer"}))
                if not _answered_well(status, body, name in MUST_REFUSE):
                    failures.append(f"sdp {name}: {status} {str(body)[:200]}")
                elif status == 200:
                    accepted += 1
            for name, (raw, headers) in BODY_CASES.items():
                cases += 1
                status, body = await _post(http, offer_url, raw, headers)
                if not _answered_well(status, body, must_refuse=True):
                    failures.append(f"body {name}: {status} {str(body)[:200]}")
            # A reconnect offer naming the hostile page's session with a broken SDP must
            # leave its live peer alone.
            cases += 1
            status, _ = await _post(http, offer_url, json.dumps(
                {"sdp": "v=0\r\nbroken", "type": "offer", "session_id": hostile.session_id}))
            if status != 400:
                failures.append(f"broken reconnect: {status}")

            errors_before = len(hostile.of_type("error"))
            for i, message in enumerate(CHANNEL_CASES):
                cases += 1
                mark = len(hostile.messages)
                hostile.send(message)
                try:
                    await hostile.wait_for("error", start=mark, within=3)
                except TimeoutError:
                    failures.append(f"channel case {i} {str(message)[:60]!r}: no error message")
            assert len(hostile.of_type("error")) - errors_before >= len(CHANNEL_CASES) - len(
                [f for f in failures if f.startswith("channel")])

            async with http.get(f"{rtc_server.url}/health") as resp:
                assert resp.status == 200
        # Both sessions still analyse, the hostile peer is still connected.
        for client in (honest, hostile):
            mark = len(client.messages)
            await client.wait_for("frame_analysis", start=mark, within=15)
        assert hostile.pc is not None and hostile.pc.connectionState == "connected"
        mark = len(hostile.messages)
        hostile.send({"type": "ping", "t": 1})
        pong = await hostile.wait_for("pong", start=mark)
        assert pong["t"] == 1
        # Sessions only for the offers that were answered (no peer connects to them: they
        # end after the media timeout and the reconnect grace).
        assert rtc_server.manager.live_count == 2 + accepted
    finally:
        await honest.close()
        await hostile.close()
    assert cases >= 90, cases
    assert not failures, "\n".join(failures)
