"""A page's offer cannot make the server probe addresses it should not reach."""

from __future__ import annotations

import pytest

from server.signaling.ice import CandidatePolicy
from server.signaling.sdp import filter_candidates
from tests.conftest import RunningServer

PUBLIC_SERVER = CandidatePolicy.for_server(["8.8.4.4"], [])  # a server on a public address
LAN_SERVER = CandidatePolicy.for_server(["10.0.0.5"], [])
LOOPBACK_SERVER = CandidatePolicy.for_server(["127.0.0.1"], [])


@pytest.mark.parametrize(
    ("address", "public", "lan", "loopback"),
    [
        ("1.1.1.1", True, True, True),
        ("2606:4700::1111", True, True, True),
        ("10.1.2.3", False, True, False),
        ("192.168.1.20", False, True, False),
        ("172.16.0.1", False, True, False),
        ("100.64.0.1", False, True, False),  # carrier-grade NAT is not public
        ("fd00::1", False, True, False),
        ("127.0.0.1", False, False, True),
        ("::1", False, False, True),
        ("169.254.169.254", False, False, False),  # cloud metadata (link-local)
        ("fe80::1", False, False, False),
        ("0.0.0.0", False, False, False),
        ("::", False, False, False),
        ("224.0.0.1", False, False, False),
        ("240.0.0.1", False, False, False),
        ("::ffff:10.1.2.3", False, True, False),
        ("::ffff:127.0.0.1", False, False, True),
        ("3f0b1c2a-1111-2222-3333-444455556666.local", False, False, False),
        ("metadata.google.internal", False, False, False),
    ],
)
def test_default_policy(address: str, public: bool, lan: bool, loopback: bool) -> None:
    assert PUBLIC_SERVER.allows(address) is public
    assert LAN_SERVER.allows(address) is lan
    assert LOOPBACK_SERVER.allows(address) is loopback


def test_allow_list_admits_addresses_and_networks() -> None:
    policy = CandidatePolicy.for_server(["8.8.4.4"], ["10.20.0.0/16", "192.168.7.7"])
    assert policy.allows("10.20.3.4") and policy.allows("192.168.7.7")
    assert not policy.allows("10.21.0.1") and not policy.allows("192.168.7.8")
    assert not policy.allows("10.20.3.4", "sctp")


def test_filter_drops_what_the_policy_refuses() -> None:
    sdp = "\r\n".join([
        "v=0",
        "a=candidate:1 1 udp 2122260223 1.1.1.1 50000 typ host",
        "a=candidate:2 1 udp 2122260223 10.0.0.9 50001 typ host",
        "a=candidate:3 1 udp 2122260223 abc.local 50002 typ host",
        "a=candidate:4 1 udp 2122260223 169.254.169.254 80 typ host",
        "a=candidate:5 short",
        "a=end-of-candidates",
    ]) + "\r\n"
    out, dropped = filter_candidates(sdp, PUBLIC_SERVER.allows)
    assert dropped == 4
    assert "1.1.1.1" in out and "10.0.0.9" not in out and "abc.local" not in out
    assert "a=end-of-candidates" in out and out.endswith("\r\n")


@pytest.mark.netns
async def test_an_offer_naming_internal_addresses_gets_no_checks_there(
    rtc_server: RunningServer,
) -> None:
    from server.app import RTC
    from tests.rtc_client import RtcTestClient, SyntheticCamera, face_blank_scenes

    extra = "\r\n".join(
        f"a=candidate:9{i} 1 udp 2122260223 {addr} 9 typ host"
        for i, addr in enumerate(("10.9.9.9", "169.254.169.254", "192.168.0.1", "x.local"))
    )

    def munge(sdp: str) -> str:
        # Hostile candidates beside the real loopback ones, in every m-section.
        return sdp.replace("a=end-of-candidates", extra + "\r\na=end-of-candidates")

    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face"))
    try:
        await client.connect(munge=munge)
        await client.wait_for("frame_analysis")  # the real candidates still connect
        gateway = rtc_server.app[RTC]
        peer = gateway.peers()[0]
        ice = [peer.pc.getTransceivers()[0].receiver.transport.transport]
        if peer.pc.sctp is not None:
            ice.append(peer.pc.sctp.transport.transport)
        remote = {c.ip for t in ice for c in t.getRemoteCandidates()}
        assert remote and remote <= {"127.0.0.1"}, remote
        assert gateway.candidates_dropped._value.get() >= 4
    finally:
        await client.close()
