"""ICE settings: which host candidates aioice offers and which ICE servers peers use.

aioice gathers host candidates from `aioice.ice.get_host_addresses`, which lists every
interface address except 127.0.0.1 and has no option. When `rtc_host_addresses` is set we
replace that one function (process-wide, looked up at gather time) with one that returns
the configured addresses; unpinning restores aioice's own when no server in the process
still pins.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable

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
