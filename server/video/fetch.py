"""Fetching a recorded video: an SSRF-guarded, streamed download to a file.

The guard resolves the host itself (through the resolver it is given, so tests can give it
one), refuses any address that is not globally routable unless `VIDEO_URL_ALLOW` names it,
and the connection is then made to exactly the checked addresses: aiohttp gets a resolver
that knows only them, so there is no second DNS lookup to rebind. Redirects are followed by
hand, each hop checked the same way. The body streams to disk with a size and a time cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from server.video.errors import InvalidUrl, UnreadableVideo, VideoTooLarge, VideoUnreachable

#: (host, port) → the addresses it resolves to.
Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services outside the link-local range (AWS IPv6, Alibaba, Oracle).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20
# Content types that are certainly not a video (an error page, an API answer).
NOT_VIDEO_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _as_ip(value: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def refused_reason(ip: IPAddress) -> str | None:
    """Why an address may not be fetched from, or None when it is a public address."""
    if ip in METADATA_ADDRESSES or ip == ipaddress.ip_address("169.254.169.254"):
        return "a cloud metadata address"
    if ip.is_unspecified or ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or not ip.is_global:
        return "a private or reserved address"
    return None


@dataclass(frozen=True)
class CheckedUrl:
    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


class UrlGuard:
    def __init__(self, allow: Sequence[str] = (), resolver: Resolver = system_resolver) -> None:
        """`allow`: hostnames, addresses or networks (CIDR) exempt from the address rules."""
        self.resolver = resolver
        self._hosts: set[str] = set()
        self._networks: list[IPNetwork] = []
        for entry in allow:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.rstrip("."))

    def _allowed(self, host: str, ip: IPAddress) -> bool:
        return host in self._hosts or any(ip in net for net in self._networks)

    async def check(self, url: str) -> CheckedUrl:
        """Syntax, scheme and every resolved address; raises `InvalidUrl`."""
        if not isinstance(url, str) or len(url) > 4096:
            raise InvalidUrl("url must be a string of at most 4096 characters")
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise InvalidUrl(f"url is malformed: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidUrl("url must be http or https")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise InvalidUrl("url has no host")
        port = port or (443 if parts.scheme == "https" else 80)
        literal = _as_ip(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await self.resolver(host, port)
            except (OSError, UnicodeError) as exc:
                raise InvalidUrl(f"host {host} does not resolve: {exc}") from None
            if not addresses:
                raise InvalidUrl(f"host {host} does not resolve")
        for address in addresses:
            ip = _as_ip(address)
            if ip is None:
                raise InvalidUrl(f"host {host} resolved to an invalid address")
            reason = refused_reason(ip)
            if reason and not self._allowed(host, ip):
                # Every address must pass: a name with one public and one private address
                # could otherwise be steered to the private one.
                raise InvalidUrl(f"{host} resolves to {ip}, {reason}; refused")
        return CheckedUrl(url.strip(), host, port, tuple(addresses))


class PinnedResolver(AbstractResolver):
    """aiohttp resolver that answers only with the guard's checked addresses."""

    def __init__(self, checked: CheckedUrl) -> None:
        self.checked = checked

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.rstrip(".").lower() != self.checked.host:
            raise OSError(f"{host} was not checked")
        out: list[ResolveResult] = []
        for address in self.checked.addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            out.append(
                {
                    "hostname": host,
                    "host": address,
                    "port": port,
                    "family": fam,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return out

    async def close(self) -> None:
        return None


@dataclass
class FetchProgress:
    bytes_done: int = 0
    bytes_total: int | None = None


@dataclass
class FetchLimits:
    max_bytes: int
    timeout_s: float


async def _write(fh: Any, data: bytes) -> None:
    await asyncio.to_thread(fh.write, data)


async def fetch_to_file(
    url: str,
    dest: Path,
    guard: UrlGuard,
    limits: FetchLimits,
    progress: FetchProgress | None = None,
) -> Path:
    """Download `url` to `dest`, never holding it in memory. Raises InvalidUrl,
    VideoTooLarge, UnreadableVideo (an HTML page, say) or VideoUnreachable; `dest` is
    removed on any failure."""
    progress = progress or FetchProgress()
    try:
        await asyncio.wait_for(_fetch(url, dest, guard, limits, progress), timeout=limits.timeout_s)
    except TimeoutError:
        await asyncio.to_thread(dest.unlink, missing_ok=True)
        raise VideoUnreachable(f"download did not finish within {limits.timeout_s:.0f} s") from None
    except BaseException:
        await asyncio.to_thread(dest.unlink, missing_ok=True)
        raise
    return dest


async def _fetch(
    url: str, dest: Path, guard: UrlGuard, limits: FetchLimits, progress: FetchProgress
) -> None:
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        checked = await guard.check(current)
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(checked), use_dns_cache=False)
        async with aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # no proxy from the environment: we connect where we checked
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30),
        ) as http:
            try:
                async with http.get(
                    checked.url, allow_redirects=False, headers={"Accept": "video/*, */*"}
                ) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        if not location:
                            raise VideoUnreachable(f"redirect {resp.status} without Location")
                        current = urljoin(checked.url, location)
                        continue
                    if resp.status != 200:
                        raise VideoUnreachable(f"the server answered HTTP {resp.status}")
                    await _stream_body(resp, dest, limits, progress)
                    return
            except aiohttp.ClientError as exc:
                raise VideoUnreachable(f"could not fetch the video: {exc}") from None
    raise VideoUnreachable(f"more than {MAX_REDIRECTS} redirects")


async def _stream_body(
    resp: aiohttp.ClientResponse, dest: Path, limits: FetchLimits, progress: FetchProgress
) -> None:
    ctype = resp.headers.get("Content-Type", "").lower()
    if ctype.startswith(NOT_VIDEO_TYPES):
        raise UnreadableVideo(f"the URL serves {ctype.split(';')[0]}, not a video")
    length = resp.content_length
    if length is not None and length > limits.max_bytes:
        raise VideoTooLarge(f"the video is {length} bytes; the limit is {limits.max_bytes}")
    progress.bytes_total = length
    fh = await asyncio.to_thread(dest.open, "wb")
    try:
        buffer = bytearray()
        try:
            async for chunk in resp.content.iter_chunked(256 * 1024):
                progress.bytes_done += len(chunk)
                if progress.bytes_done > limits.max_bytes:
                    raise VideoTooLarge(f"the video exceeds the limit of {limits.max_bytes} bytes")
                buffer += chunk
                if len(buffer) >= CHUNK_BYTES:
                    await _write(fh, bytes(buffer))
                    buffer.clear()
        except aiohttp.ClientPayloadError as exc:
            raise UnreadableVideo(
                f"the download was truncated after {progress.bytes_done} bytes: {exc}"
            ) from None
        if buffer:
            await _write(fh, bytes(buffer))
    finally:
        await asyncio.to_thread(fh.close)
    if length is not None and progress.bytes_done < length:
        raise UnreadableVideo(
            f"the download was truncated ({progress.bytes_done} of {length} bytes)"
        )


async def save_stream(
    chunks: Any, dest: Path, max_bytes: int, progress: FetchProgress | None = None
) -> int:
    """Write an async iterator of byte chunks (an upload) to `dest` under the size cap."""
    progress = progress or FetchProgress()
    fh = await asyncio.to_thread(dest.open, "wb")
    try:
        buffer = bytearray()
        async for chunk in chunks:
            progress.bytes_done += len(chunk)
            if progress.bytes_done > max_bytes:
                raise VideoTooLarge(f"the upload exceeds the limit of {max_bytes} bytes")
            buffer += chunk
            if len(buffer) >= CHUNK_BYTES:
                await _write(fh, bytes(buffer))
                buffer.clear()
        if buffer:
            await _write(fh, bytes(buffer))
    except BaseException:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(fh.close)
        await asyncio.to_thread(dest.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(fh.close)
    return progress.bytes_done
