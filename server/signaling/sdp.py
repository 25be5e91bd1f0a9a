"""SDP and codec helpers for the WebRTC offer/answer: what an offer contains, which video
codecs we prefer, which remote ICE candidates we accept, and which RTP header extensions
we leave out (abs-send-time: no REMB).

H.264 is preferred when the browser offers it: on this kind of machine its decode costs
about a third of VP8's (0.31 vs 0.84 ms per 640×480 frame). The browser sends with the
first codec of our answer, so the answer lists them in `prefer` order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from aiortc import RTCRtpReceiver
from aiortc.codecs import CODECS
from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS
from aiortc.rtcpeerconnection import find_common_codecs
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import SessionDescription

from server.errors import BadRequest

MAX_SDP_CHARS = 100_000  # a browser offer is a few kB; refuse anything absurd early
MAX_MEDIA_SECTIONS = 16  # a camera, a microphone, a data channel and some room
#: Bytes of each fingerprint algorithm's digest (the value is their hex, colon-separated).
DIGEST_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


class MalformedSdp(BadRequest):
    code = "malformed_sdp"


class NoVideoTrack(BadRequest):
    code = "no_video_track"


class UnsupportedCodec(BadRequest):
    code = "unsupported_codec"


class NoDataChannel(BadRequest):
    code = "no_data_channel"


@dataclass
class OfferInfo:
    kinds: list[str] = field(default_factory=list)  # m-line kinds in order
    video_index: int = -1  # m-line index of the video we receive
    video_codecs: list[str] = field(default_factory=list)  # offered, e.g. ["VP8", "H264"]
    decodable: list[str] = field(default_factory=list)  # offered and decodable here
    has_data_channel: bool = False
    candidates: int = 0


def inspect_offer(sdp: str) -> OfferInfo:
    """Parse and check an SDP offer before any peer is built; raises a 400 error naming
    exactly what is wrong."""
    if not sdp.strip():
        raise MalformedSdp("sdp is empty")
    if len(sdp) > MAX_SDP_CHARS:
        raise MalformedSdp(f"sdp exceeds {MAX_SDP_CHARS} characters")
    if not sdp.lstrip().startswith("v=0"):
        raise MalformedSdp("sdp must start with 'v=0'")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the bad line provokes
        raise MalformedSdp(f"sdp cannot be parsed: {type(exc).__name__}: {exc}") from None
    info = OfferInfo()
    if len(desc.media) > MAX_MEDIA_SECTIONS:
        raise MalformedSdp(f"sdp has more than {MAX_MEDIA_SECTIONS} media sections")
    mids: set[str] = set()
    for i, media in enumerate(desc.media):
        info.kinds.append(media.kind)
        # aiortc accepts these missing and then fails inside a background task, leaving a
        # peer that can never connect: refuse them here.
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise MalformedSdp(f"m-line {i} ({media.kind}) has no ICE ufrag/pwd")
        if media.dtls is None or not media.dtls.fingerprints:
            raise MalformedSdp(f"m-line {i} ({media.kind}) has no DTLS fingerprint")
        unknown = [f.algorithm for f in media.dtls.fingerprints
                   if f.algorithm.lower() not in X509_DIGEST_ALGORITHMS]
        if unknown:
            raise MalformedSdp(f"unsupported DTLS fingerprint algorithm {unknown[0]!r}")
        for f in media.dtls.fingerprints:
            # Else the DTLS handshake fails later and leaves a peer that never connects.
            if not _fingerprint_ok(f.algorithm.lower(), f.value):
                raise MalformedSdp(f"m-line {i} has a malformed {f.algorithm} fingerprint")
        if media.rtp.muxId:
            if media.rtp.muxId in mids:
                raise MalformedSdp(f"m-line {i} repeats mid {media.rtp.muxId!r}")
            mids.add(media.rtp.muxId)
        info.candidates += len(media.ice_candidates)
        if media.kind == "application":
            info.has_data_channel = True
            continue
        if media.kind != "video" or info.video_index >= 0:
            continue
        if media.direction not in (None, "sendonly", "sendrecv"):
            continue  # the browser is not sending on this one
        if media.port == 0:
            continue  # rejected / disabled m-line
        info.video_index = i
        info.video_codecs = [c.name for c in media.rtp.codecs if c.name.lower() != "rtx"]
        common = find_common_codecs(CODECS["video"], media.rtp.codecs)
        info.decodable = [c.name for c in common if c.name.lower() != "rtx"]
    if not desc.media:
        raise MalformedSdp("sdp has no media sections")
    if info.video_index < 0:
        raise NoVideoTrack("the offer sends no video track (add the camera track, sendonly)")
    if not info.decodable:
        offered = ", ".join(dict.fromkeys(info.video_codecs)) or "none"
        raise UnsupportedCodec(
            f"no video codec in the offer can be decoded here (offered: {offered}; "
            "supported: H264 constrained baseline with packetization-mode=1, VP8)"
        )
    if not info.has_data_channel:
        raise NoDataChannel(
            "the offer has no data channel: create the 'proctoring' RTCDataChannel "
            "before createOffer()"
        )
    return info


def _fingerprint_ok(algorithm: str, value: str) -> bool:
    parts = value.split(":")
    return len(parts) == DIGEST_BYTES.get(algorithm, -1) and all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    )


def video_codec_preferences(prefer: list[str]) -> list[RTCRtpCodecCapability]:
    """aiortc's video capabilities ordered by `prefer` (codec names, e.g. ["H264", "VP8"]);
    codecs not named keep their order after them, RTX stays enabled."""
    caps = RTCRtpReceiver.getCapabilities("video")
    assert caps is not None
    rank = {name.lower(): i for i, name in enumerate(prefer)}

    def key(item: tuple[int, RTCRtpCodecCapability]) -> tuple[int, int]:
        index, cap = item
        name = cap.mimeType.split("/")[-1].lower()
        return (rank.get(name, len(rank) + (1 if name == "rtx" else 0)), index)

    return [cap for _, cap in sorted(enumerate(caps.codecs), key=key)]


def answer_video_codec(sdp: str) -> str | None:
    """The codec the browser will send with: the first one of the video m-line of our
    answer."""
    try:
        desc = SessionDescription.parse(sdp)
    except Exception:
        return None
    for media in desc.media:
        if media.kind == "video" and media.rtp.codecs:
            return media.rtp.codecs[0].name
    return None


def filter_candidates(sdp: str, keep: Callable[[str, str], bool]) -> tuple[str, int]:
    """Drop the `a=candidate` lines for which `keep(address, transport)` is false (and any
    line too short to be a candidate); returns the SDP and how many were dropped."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    kept, dropped = [], 0
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ …
            if len(parts) < 8 or not keep(parts[4], parts[2].lower()):
                dropped += 1
                continue
        kept.append(line)
    return newline.join(kept) + newline, dropped


def restrict_candidates(sdp: str, allowed_addresses: list[str]) -> str:
    """Keep only `a=candidate` lines that are UDP on one of `allowed_addresses` (a test
    client keeps every check on 127.0.0.1 this way). An empty list keeps every candidate."""
    if not allowed_addresses:
        return sdp
    allowed = {str(ipaddress.ip_address(a)) for a in allowed_addresses}

    def keep(address: str, transport: str) -> bool:
        try:
            return transport == "udp" and str(ipaddress.ip_address(address)) in allowed
        except ValueError:
            return False  # mDNS `.local` names and anything else that is not an address

    return filter_candidates(sdp, keep)[0]


def strip_abs_send_time(sdp: str) -> str:
    """Drop the abs-send-time header extension (`a=extmap:<id> …/abs-send-time`) from an
    offer, keeping every other extmap. When it is negotiated, aiortc's receiver feeds its
    REMB estimator and sends REMB: on a still scene the estimate sinks, Chromium's target
    bitrate falls to its 30 kbps floor, and the next scene change (the frame an alert
    hangs on) reaches us 2.6-4.5 s late. Without it the browser keeps its own rate."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=extmap:"):
            # a=extmap:<id>[/<direction>] <uri> [<attributes>]
            parts = line.split()
            if len(parts) >= 2 and parts[1] == ABS_SEND_TIME_URI:
                continue
        kept.append(line)
    return newline.join(kept) + newline
