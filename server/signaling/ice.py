"""ICE settings: which host candidates aioice offers, which remote candidates the server
may send connectivity checks to, and which ICE servers peers use.

aioice gathers host candidates from `aioice.ice.get_host_addresses`, which lists every
interface address except 127.0.0.1 and has no option. When `rtc_host_addresses` is set we
replace that one function (process-wide, looked up at gather time) with one that returns
the configured addresses; unpinning restores aioice's own when no server in the process
still pins.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aioice.ice
from aiortc import RTCIceServer

from server.config import Settings

_aioice_get_host_addresses = aioice.ice.get_host_addresses
_pins: list[list[str]] = []


def _pinned_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if not _pins:
        return _aioice_get_host_addresses(use_ipv4, use_ipv6)
    out = []
    for address in _pins[-1]:
        version = ipaddress.ip_address(address).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(address)
    return out


def pin_host_addresses(addresses: list[str]) -> Callable[[], None]:
    """Make aioice offer exactly `addresses` as host candidates; returns the undo."""
    pinned = [str(ipaddress.ip_address(a)) for a in addresses]
    _pins.append(pinned)
    aioice.ice.get_host_addresses = _pinned_host_addresses

    def unpin() -> None:
        with contextlib.suppress(ValueError):
            _pins.remove(pinned)
        if not _pins:
            aioice.ice.get_host_addresses = _aioice_get_host_addresses

    return unpin


def ice_servers(settings: Settings) -> list[RTCIceServer]:
    """RTC_ICE_SERVERS as aiortc objects; a malformed entry fails at startup, not on the
    first offer."""
    servers = []
    for i, entry in enumerate(settings.rtc_ice_servers):
        urls = entry.get("urls")
        if not urls or not isinstance(urls, str | list):
            raise ValueError(f"RTC_ICE_SERVERS[{i}] needs 'urls' (a string or a list of them)")
        servers.append(
            RTCIceServer(
                urls=urls, username=entry.get("username"), credential=entry.get("credential")
            )
        )
    return servers


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _kind(address: IpAddress) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link_local"
    if address.is_private or not address.is_global:  # RFC 1918, CGNAT, ULA, …
        return "private"
    return "global"


@dataclass(frozen=True)
class CandidatePolicy:
    """Which remote ICE candidates the server may send connectivity checks to.

    An offer is written by the candidate's page, so its candidates may name any address:
    left alone, the server would probe whatever internal network it sits on. By default a
    remote candidate is kept when it is a global (public) address, or loopback /
    link-local / private only when the server itself has an address of that kind (a
    server on a LAN talks to LAN peers; one pinned to 127.0.0.1 in tests, to loopback).
    Unspecified, multicast and reserved addresses, and names (mDNS `.local`) are always
    dropped: names are never resolved for a page. `allowed` (RTC_REMOTE_CANDIDATE_ADDRESSES,
    addresses or networks) admits more. Dropped candidates cost nothing: a peer whose
    checks reach the server is still learnt as peer-reflexive."""

    server_kinds: frozenset[str]
    allowed: tuple[IpNetwork, ...] = ()

    @classmethod
    def for_server(cls, server_addresses: Iterable[str], allowed: Iterable[str]) -> CandidatePolicy:
        kinds = set()
        for a in server_addresses:
            try:
                kinds.add(_kind(ipaddress.ip_address(a)))
            except ValueError:
                continue
        networks = tuple(ipaddress.ip_network(a, strict=False) for a in allowed)
        return cls(frozenset(kinds), networks)

    def allows(self, address: str, transport: str = "udp") -> bool:
        if transport not in ("udp", "tcp"):
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if any(ip in net for net in self.allowed if net.version == ip.version):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return self.allows(str(ip.ipv4_mapped), transport)
        if ip.is_unspecified or ip.is_multicast:
            return False
        if ip.is_reserved and not ip.is_loopback:  # (::1 sits inside reserved ::/8)
            return False
        kind = _kind(ip)
        return kind == "global" or kind in self.server_kinds


def server_host_addresses(settings: Settings) -> list[str]:
    """The addresses this server offers as host candidates."""
    if settings.rtc_host_addresses:
        return list(settings.rtc_host_addresses)
    return list(_aioice_get_host_addresses(True, True))
