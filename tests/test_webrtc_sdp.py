"""SDP helpers, ICE configuration, host-address pinning and the data-channel sender
(no packets are sent)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.sdp import SessionDescription

from server.config import Settings
from server.signaling.datachannel import (
    MAX_INBOUND_MESSAGE,
    REPORT_MAX_BYTES,
    ChannelMessageError,
    ChannelSender,
    fit_report,
    parse_inbound,
)
from server.signaling.ice import ice_servers, pin_host_addresses
from server.signaling.sdp import (
    NoDataChannel,
    NoVideoTrack,
    UnsupportedCodec,
    inspect_offer,
    restrict_candidates,
    strip_abs_send_time,
    video_codec_preferences,
)


@pytest.fixture
async def offer() -> AsyncIterator[str]:
    unpin = pin_host_addresses(["127.0.0.1"])
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("proctoring")
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    yield pc.localDescription.sdp
    await pc.close()
    unpin()


async def test_inspect_offer_reads_what_the_browser_sends(offer: str) -> None:
    info = inspect_offer(offer)
    assert info.kinds == ["application", "video"] or info.kinds == ["video", "application"]
    assert info.has_data_channel
    assert {"VP8", "H264"} <= set(info.decodable)
    assert info.candidates >= 1


async def test_inspect_offer_names_each_problem(offer: str) -> None:
    with pytest.raises(UnsupportedCodec):
        inspect_offer(offer.replace("VP8/90000", "VP9/90000").replace("H264/90000", "AV1/90000"))
    with pytest.raises(NoVideoTrack):
        inspect_offer(offer.replace("a=sendonly", "a=inactive"))
    lines = offer.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("m=application"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    without_channel = "\r\n".join(lines[:start] + lines[end:])
    without_channel = without_channel.replace("BUNDLE 0 1", "BUNDLE 0").replace("BUNDLE 1 0", "BUNDLE 1")
    with pytest.raises(NoDataChannel):
        inspect_offer(without_channel)


def test_h264_is_preferred_and_rtx_kept() -> None:
    names = [c.mimeType for c in video_codec_preferences(["H264", "VP8"])]
    assert names[0] == "video/H264"
    assert names.index("video/VP8") > max(i for i, n in enumerate(names) if n == "video/H264")
    assert "video/rtx" in names
    assert video_codec_preferences(["VP8"])[0].mimeType == "video/VP8"


def test_restrict_candidates_keeps_only_udp_on_allowed_addresses() -> None:
    sdp = "\r\n".join([
        "v=0",
        "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host",
        "a=candidate:2 1 udp 2122260223 192.168.1.20 50001 typ host",
        "a=candidate:3 1 tcp 1518280447 127.0.0.1 9 typ host tcptype active",
        "a=candidate:4 1 udp 2122260223 3f2a-uuid.local 50002 typ host",
        "a=candidate:5 1 udp 2122260223 ::1 50003 typ host",
        "a=end-of-candidates",
        "",
    ])
    kept = restrict_candidates(sdp, ["127.0.0.1"])
    assert "127.0.0.1 50000" in kept
    for gone in ("192.168.1.20", "tcp", ".local", "::1"):
        assert gone not in kept
    assert "a=end-of-candidates" in kept
    assert restrict_candidates(sdp, []) == sdp


ABS = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def test_strip_abs_send_time_from_every_section_keeping_other_extmaps() -> None:
    sdp = "\r\n".join([
        "v=0",
        "a=extmap-allow-mixed",
        f"a=extmap:14 {ABS}",  # session level
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        f"a=extmap:2 {ABS}",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        f"a=extmap:2/sendonly {ABS}",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        f"a=extmap:5 {ABS}-not-quite",
        "a=rtcp-fb:96 goog-remb",
        "",
    ])
    out = strip_abs_send_time(sdp)
    lines = out.split("\r\n")
    assert not [line for line in lines if line.split()[1:2] == [ABS]]
    assert len(lines) == len(sdp.split("\r\n")) - 3
    for kept in ("a=extmap-allow-mixed", "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
                 "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc",
                 f"a=extmap:5 {ABS}-not-quite", "a=rtcp-fb:96 goog-remb"):
        assert kept in out, kept
    assert out.count("urn:ietf:params:rtp-hdrext:sdes:mid") == 2
    assert out.endswith("goog-remb\r\n") and "\n\n" not in out
    assert strip_abs_send_time(out) == out
    unix = strip_abs_send_time(sdp.replace("\r\n", "\n"))
    assert unix == out.replace("\r\n", "\n")


async def test_an_aiortc_offer_without_abs_send_time_is_answered_without_it(offer: str) -> None:
    """aiortc offers abs-send-time on video; once stripped, the answer leaves it out too,
    so the sender never adds it and our receiver never sends REMB."""
    video = next(m for m in SessionDescription.parse(offer).media if m.kind == "video")
    assert ABS in [e.uri for e in video.rtp.headerExtensions]
    stripped = strip_abs_send_time(offer)
    info = inspect_offer(stripped)
    assert "H264" in info.decodable and info.has_data_channel
    video = next(m for m in SessionDescription.parse(stripped).media if m.kind == "video")
    assert [e.uri for e in video.rtp.headerExtensions] == ["urn:ietf:params:rtp-hdrext:sdes:mid"]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=stripped, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
    finally:
        await pc.close()
    assert "abs-send-time" not in answer
    assert "urn:ietf:params:rtp-hdrext:sdes:mid" in answer


def test_pinning_host_addresses_is_undone() -> None:
    original = aioice.ice.get_host_addresses
    unpin = pin_host_addresses(["127.0.0.1", "::1"])
    assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1", "::1"]
    inner = pin_host_addresses(["127.0.0.2"])
    assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.2"]
    inner()
    assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
    unpin()
    assert aioice.ice.get_host_addresses is original


def test_ice_servers_default_to_none_and_bad_entries_fail_early() -> None:
    assert ice_servers(Settings(_env_file=None)) == []  # type: ignore[call-arg]
    good = Settings(_env_file=None, rtc_ice_servers=[  # type: ignore[call-arg]
        {"urls": ["turn:turn.example.com:3478"], "username": "u", "credential": "p"}])
    (server,) = ice_servers(good)
    assert server.urls == ["turn:turn.example.com:3478"] and server.username == "u"
    bad = Settings(_env_file=None, rtc_ice_servers=[{"url": "stun:x"}])  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="urls"):
        ice_servers(bad)


# --- the data-channel sender (a stand-in channel: only its buffer matters here) -----------


class _Channel:
    def __init__(self) -> None:
        self.readyState = "connecting"
        self.bufferedAmount = 0
        self.bufferedAmountLowThreshold = 0
        self.sent: list[dict[str, Any]] = []
        self.handlers: dict[str, Any] = {}

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


def test_sender_holds_messages_until_the_channel_opens() -> None:
    sender = ChannelSender(high_water=1000)
    sender.send({"type": "session_started", "n": 0})
    for i in range(5):
        sender.send({"type": "frame_analysis", "n": i})
    sender.send({"type": "alerts", "n": 1})
    channel = _Channel()
    channel.readyState = "open"
    sender.attach(channel)
    assert [(m["type"], m["n"]) for m in channel.sent] == [
        ("session_started", 0), ("alerts", 1), ("frame_analysis", 4)]


def test_sender_coalesces_metric_updates_but_never_alerts_when_backed_up() -> None:
    channel = _Channel()
    channel.readyState = "open"
    sender = ChannelSender(high_water=1000)
    sender.attach(channel)
    channel.bufferedAmount = 5000  # the page is not reading fast enough
    for i in range(10):
        sender.send({"type": "frame_analysis", "n": i})
        sender.send({"type": "live_metrics", "n": i})
        sender.send({"type": "alerts", "n": i})
    assert [m["n"] for m in channel.sent if m["type"] == "alerts"] == list(range(10))
    assert not [m for m in channel.sent if m["type"] != "alerts"]
    channel.bufferedAmount = 0
    channel.handlers["bufferedamountlow"]()
    rest = [(m["type"], m["n"]) for m in channel.sent if m["type"] != "alerts"]
    assert rest == [("frame_analysis", 9), ("live_metrics", 9)]
    assert sender.coalesced == 18


def test_a_report_too_large_for_the_channel_goes_without_its_detail() -> None:
    alerts = [{"type": "no_face_detected", "message": "x" * 500}] * 200
    big = {"type": "session_ended", "report": {"alerts": alerts, "emotion_timeline": [1] * 9,
                                               "summary": {"frames_analysed": 3}}}
    fitted = fit_report(big)
    assert len(json.dumps(fitted).encode()) <= REPORT_MAX_BYTES
    assert fitted["report"]["truncated"] is True
    assert fitted["report"]["alerts_count"] == 200
    assert fitted["report"]["summary"] == {"frames_analysed": 3}
    small = {"type": "session_ended", "report": {"alerts": alerts[:2]}}
    assert fit_report(small) is small


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00binary", "binary_not_supported"),
        ("x" * (MAX_INBOUND_MESSAGE + 1), "message_too_large"),
        ("[" * 8000 + "]" * 8000, "invalid_json"),
        ('{"type": "ping", "t": NaN}', "invalid_json"),
        ('{"type": "ping", "t": ' + "9" * 5000 + "}", "invalid_json"),
        ("{not json", "invalid_json"),
        ('["ping"]', "invalid_message"),
        ('{"type": 7}', "invalid_message"),
        ('{"type": "start_camera"}', "unknown_type"),
        ('{"type": "ping", "x": ' + "[" * 20 + "]" * 20 + "}", "invalid_json"),
    ],
)
def test_hostile_channel_messages_get_one_error_code(data: object, code: str) -> None:
    with pytest.raises(ChannelMessageError) as info:
        parse_inbound(data)
    assert info.value.code == code


def test_known_channel_messages_parse() -> None:
    assert parse_inbound('{"type": "ping", "t": 12.5}') == {"type": "ping", "t": 12.5}
    assert parse_inbound('{"type": "end_session"}')["type"] == "end_session"
