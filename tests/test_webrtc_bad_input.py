"""Bad offers and bad data-channel messages get a clear error — never a crash, a stuck
peer, a leftover session or a leaked task."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from aiortc import AudioStreamTrack

from server.app import RTC
from tests.conftest import RunningServer
from tests.rtc_client import (
    OfferRefused,
    RtcTestClient,
    SyntheticCamera,
    face_blank_scenes,
    until,
)

pytestmark = pytest.mark.netns


def _live_tasks() -> int:
    return len([t for t in asyncio.all_tasks() if not t.done()])


async def _refused(server: RunningServer, client: RtcTestClient, **kwargs: Any) -> OfferRefused:
    before = _live_tasks()
    with pytest.raises(OfferRefused) as info:
        await client.connect(**kwargs)
    gateway = server.app[RTC]
    assert gateway.peer_count == 0
    assert server.manager.live_count == 0
    # Whatever the server built for the offer is gone again.
    assert await until(lambda: _live_tasks() <= before), (before, _live_tasks())
    return info.value


async def _post(server: RunningServer, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        kwargs = {"data": body} if isinstance(body, str | bytes) else {"json": body}
        async with http.post(f"{server.url}/api/rtc/offer", **kwargs) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize(
    "sdp",
    [
        "",
        "hello",
        "v=0\r\nthis is not sdp at all\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=video notaport UDP/TLS/RTP/SAVPF 96\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",  # no media at all
    ],
)
async def test_malformed_sdp_is_400(rtc_server: RunningServer, sdp: str) -> None:
    status, body = await _post(rtc_server, {"sdp": sdp, "type": "offer"})
    assert status == 400
    assert body["error"]["code"] == "malformed_sdp"
    assert rtc_server.manager.live_count == 0


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        (r"a=fingerprint:[^\r\n]*\r\n", "DTLS fingerprint"),
        (r"a=ice-pwd:[^\r\n]*\r\n", "ICE ufrag/pwd"),
        (r"a=rtcp-mux\r\n", "refused"),
    ],
)
async def test_offer_missing_transport_attributes_is_400(
    rtc_server: RunningServer, pattern: str, what: str
) -> None:
    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    refused = await _refused(rtc_server, client, munge=lambda sdp: re.sub(pattern, "", sdp))
    assert refused.status == 400
    assert refused.body["error"]["code"] == "malformed_sdp"
    assert what in refused.body["error"]["message"]


async def test_body_that_is_not_json_or_not_an_offer_is_400(rtc_server: RunningServer) -> None:
    status, body = await _post(rtc_server, "{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = await _post(rtc_server, {"type": "offer"})
    assert (status, body["error"]["code"]) == (400, "missing_field")
    status, body = await _post(rtc_server, {"sdp": "v=0", "type": "answer"})
    assert (status, body["error"]["code"]) == (400, "invalid_field")


async def test_offer_without_video_is_400(rtc_server: RunningServer) -> None:
    data_only = RtcTestClient(rtc_server.url, None)
    refused = await _refused(rtc_server, data_only)
    assert (refused.status, refused.body["error"]["code"]) == (400, "no_video_track")

    audio_only = RtcTestClient(rtc_server.url, AudioStreamTrack())
    refused = await _refused(rtc_server, audio_only)
    assert (refused.status, refused.body["error"]["code"]) == (400, "no_video_track")


async def test_offer_with_no_decodable_codec_is_400(rtc_server: RunningServer) -> None:
    def only_undecodable(sdp: str) -> str:
        return sdp.replace("VP8/90000", "VP9/90000").replace("H264/90000", "AV1/90000")

    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    refused = await _refused(rtc_server, client, munge=only_undecodable)
    assert refused.status == 400
    assert refused.body["error"]["code"] == "unsupported_codec"
    assert "VP9" in refused.body["error"]["message"]


async def test_offer_without_data_channel_is_400(rtc_server: RunningServer) -> None:
    client = RtcTestClient(
        rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"), data_channel=False
    )
    refused = await _refused(rtc_server, client)
    assert (refused.status, refused.body["error"]["code"]) == (400, "no_data_channel")


async def test_unknown_session_is_404(rtc_server: RunningServer) -> None:
    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    refused = await _refused(rtc_server, client, session_id="no-such-session")
    assert (refused.status, refused.body["error"]["code"]) == (404, "session_not_found")


async def test_ended_session_is_409(rtc_server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{rtc_server.url}/api/sessions/start", json={}) as resp:
            sid = (await resp.json())["session_id"]
        async with http.post(f"{rtc_server.url}/api/sessions/{sid}/end") as resp:
            assert resp.status == 200
    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    refused = await _refused(rtc_server, client, session_id=sid)
    assert (refused.status, refused.body["error"]["code"]) == (409, "session_ended")


@pytest.mark.parametrize("settings_overrides", [{"rtc_max_peers": 1}])
async def test_offers_beyond_the_peer_limit_are_429(rtc_server: RunningServer) -> None:
    first = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    second = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    try:
        await first.connect()
        with pytest.raises(OfferRefused) as info:
            await second.connect()
        assert info.value.status == 429
        assert info.value.body["error"]["code"] == "too_many_peers"
        assert "Retry-After" in info.value.headers
        assert rtc_server.manager.live_count == 1
    finally:
        await first.close()
        await second.close()


async def test_bad_channel_messages_get_error_messages_and_the_peer_survives(
    rtc_server: RunningServer,
) -> None:
    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    try:
        await client.connect()
        await client.wait_for("session_started")
        await client.opened()
        cases: list[tuple[str | bytes | dict[str, Any], str]] = [
            ("this is not json", "invalid_json"),
            ("[1, 2, 3]", "invalid_message"),
            ({"no_type": True}, "invalid_message"),
            ({"type": 42}, "invalid_message"),
            ({"type": "start_dancing"}, "unknown_type"),
            (b"\x00\x01binary", "binary_not_supported"),
            ("x" * 20_000, "message_too_large"),
        ]
        for message, code in cases:
            mark = len(client.messages)
            client.send(message)
            error = await client.wait_for("error", start=mark, within=3)
            assert error["code"] == code, (message, error)
            assert error["message"]
        # The channel, the peer and the session all carry on.
        mark = len(client.messages)
        client.send({"type": "ping", "t": 123})
        pong = await client.wait_for("pong", start=mark)
        assert pong["t"] == 123
        await client.wait_for("frame_analysis")
        assert rtc_server.app[RTC].peer_count == 1
        assert rtc_server.manager.live_count == 1
    finally:
        await client.close()
