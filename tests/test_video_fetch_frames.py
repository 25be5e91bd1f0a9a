"""Recorded videos, below the API: the SSRF guard and download, and PyAV sampling
(codecs, intervals, keyframe seeks, rotation, variable frame rate, non-zero start)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from server.video.errors import InvalidUrl, UnreadableVideo, VideoTooLarge, VideoUnreachable
from server.video.fetch import FetchLimits, UrlGuard, fetch_to_file
from server.video.frames import FrameSampler, probe, sample_count
from tests.video_media import make_video
from tests.video_server import VideoHost


class RecordingResolver:
    """A resolver for the guard: fixed answers, and a record of what was asked."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host}: no such host")
        return self.answers[host]


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[VideoHost]:
    root = tmp_path / "served"
    root.mkdir()
    make_video(root / "clip.mp4", [(2.0, "face")])
    (root / "noise.bin").write_bytes(np.random.default_rng(1).bytes(50_000))
    served = VideoHost(root)
    await served.start()
    yield served
    await served.stop()


LIMITS = FetchLimits(max_bytes=10 << 20, timeout_s=20)


# --- the SSRF guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/v.mp4",
        "http://0.0.0.0/v.mp4",
        "http://[::1]/v.mp4",
        "http://[::ffff:127.0.0.1]/v.mp4",
        "http://10.0.0.8/v.mp4",
        "http://10.255.1.1:8080/v.mp4",
        "http://192.168.1.10/v.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/",
        "http://224.0.0.1/v.mp4",
        "http://internal.test/v.mp4",  # resolves to 10.1.2.3
        "http://mixed.test/v.mp4",  # one public and one loopback address
        "http://metadata.test/v.mp4",  # resolves to 169.254.169.254
        "ftp://example.com/v.mp4",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http:///nohost",
        "not a url",
        "http://nowhere.test/v.mp4",  # does not resolve
    ],
)
async def test_guard_refuses(url: str) -> None:
    resolver = RecordingResolver(
        {
            "internal.test": ["10.1.2.3"],
            "mixed.test": ["93.184.216.34", "127.0.0.1"],
            "metadata.test": ["169.254.169.254"],
        }
    )
    with pytest.raises(InvalidUrl) as err:
        await UrlGuard([], resolver).check(url)
    assert err.value.code == "invalid_url" and err.value.status == 400


async def test_guard_allows_public_and_allow_listed_addresses() -> None:
    resolver = RecordingResolver({"cdn.test": ["93.184.216.34"], "lab.test": ["10.9.0.4"]})
    guard = UrlGuard(["10.9.0.0/16", "videos.internal"], resolver)
    assert (await guard.check("https://cdn.test/a.mp4")).addresses == ("93.184.216.34",)
    assert (await guard.check("http://lab.test/a.mp4")).addresses == ("10.9.0.4",)
    resolver.answers["videos.internal"] = ["127.0.0.1"]
    assert (await guard.check("http://videos.internal/a.mp4")).port == 80
    with pytest.raises(InvalidUrl):
        await guard.check("http://10.8.0.1/a.mp4")  # outside the allowed network


async def test_refused_url_makes_no_connection(host: VideoHost, tmp_path: Path) -> None:
    """The served host is on loopback and not allowed: nothing reaches it."""
    resolver = RecordingResolver({"sneaky.test": ["127.0.0.1"]})
    port = host.url.rsplit(":", 1)[1]
    for url in (f"{host.url}/v/clip.mp4", f"http://sneaky.test:{port}/v/clip.mp4"):
        with pytest.raises(InvalidUrl):
            await fetch_to_file(url, tmp_path / "out", UrlGuard([], resolver), LIMITS)
    assert host.requests == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:80/x",
        "http://0.0.0.0:80/x",
        "http://internal.test/x",
    ],
)
async def test_redirect_to_a_refused_address_is_not_followed(
    host: VideoHost, tmp_path: Path, target: str
) -> None:
    resolver = RecordingResolver({"internal.test": ["10.0.0.7"]})
    guard = UrlGuard(["127.0.0.1"], resolver)
    with pytest.raises(InvalidUrl):
        await fetch_to_file(f"{host.url}/redirect?to={target}", tmp_path / "o", guard, LIMITS)
    assert len(host.requests) == 1  # only the first hop was fetched
    assert host.requests[0].startswith("/redirect?to=")


async def test_connection_goes_to_the_checked_address(host: VideoHost, tmp_path: Path) -> None:
    """`video.test` exists only in the guard's resolver: the download can only succeed if
    the connection uses the address the guard checked (no second lookup)."""
    resolver = RecordingResolver({"video.test": ["127.0.0.1"]})
    guard = UrlGuard(["127.0.0.1"], resolver)
    port = host.url.rsplit(":", 1)[1]
    out = await fetch_to_file(f"http://video.test:{port}/v/clip.mp4", tmp_path / "o", guard, LIMITS)
    assert out.read_bytes() == (host.root / "clip.mp4").read_bytes()
    assert resolver.asked == ["video.test"]
    # And through an allowed redirect hop.
    out2 = await fetch_to_file(
        f"{host.url}/redirect?to=http://video.test:{port}/v/clip.mp4",
        tmp_path / "o2",
        guard,
        LIMITS,
    )
    assert out2.stat().st_size == out.stat().st_size


async def test_download_failures(host: VideoHost, tmp_path: Path) -> None:
    guard = UrlGuard(["127.0.0.1"])
    dest = tmp_path / "o"
    with pytest.raises(VideoTooLarge):
        await fetch_to_file(f"{host.url}/v/clip.mp4", dest, guard, FetchLimits(1000, 10))
    with pytest.raises(UnreadableVideo):
        await fetch_to_file(f"{host.url}/page", dest, guard, LIMITS)
    with pytest.raises(UnreadableVideo):
        await fetch_to_file(f"{host.url}/truncated/clip.mp4", dest, guard, LIMITS)
    with pytest.raises(VideoUnreachable):
        await fetch_to_file(f"{host.url}/missing", dest, guard, LIMITS)
    assert not dest.exists()


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["h264", "vp9", "vp8"])
@pytest.mark.parametrize(("interval", "expected"), [(2.0, 3), (0.5, 12), (1.5, 4)])
def test_frame_counts(tmp_path: Path, codec: str, interval: float, expected: int) -> None:
    path = make_video(tmp_path / f"v.{codec}", [(3.0, "face"), (3.0, "blank")], codec=codec)
    info = probe(path)
    assert info.duration_s == pytest.approx(6.0, abs=0.01)
    assert sample_count(info.duration_s, interval) == expected
    for gap in (math.inf, 0.5):  # decode everything / seek before every sample
        samples = list(FrameSampler(path, info, interval, seek_min_gap_s=gap))
        assert [s.index for s in samples] == list(range(expected))
        assert [s.video_time_s for s in samples] == pytest.approx(
            [k * interval for k in range(expected)], abs=0.051
        )
        # The picture at each time is the right one: textured face before 3 s, grey after.
        for s in samples:
            assert (s.image.std() > 20) == (s.video_time_s < 3.0)


def test_long_interval_seeks_instead_of_decoding_everything(tmp_path: Path) -> None:
    path = make_video(tmp_path / "long.mp4", [(20.0, "face")], gop=10)
    info = probe(path)
    everything = FrameSampler(path, info, 5.0, seek_min_gap_s=math.inf)
    seeking = FrameSampler(path, info, 5.0, seek_min_gap_s=2.0)
    times_all = [s.video_time_s for s in everything]
    times_seek = [s.video_time_s for s in seeking]
    assert times_all == times_seek == pytest.approx([0.0, 5.0, 10.0, 15.0])
    assert seeking.seeks == 3
    assert seeking.frames_decoded < everything.frames_decoded / 2


def test_resume_from_a_sample_index(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", [(6.0, "face")])
    samples = list(FrameSampler(path, probe(path), 1.0, start_index=4))
    assert [(s.index, round(s.video_time_s, 2)) for s in samples] == [(4, 4.0), (5, 5.0)]


def test_rotation_metadata_is_applied(tmp_path: Path) -> None:
    path = make_video(tmp_path / "phone.mp4", [(2.0, "marker")], size=(320, 240), rotation=90)
    info = probe(path)
    assert info.rotation == 90 and (info.width, info.height) == (240, 320)
    image = next(iter(FrameSampler(path, info, 1.0))).image
    assert image.shape == (320, 240, 3)
    # Stored bright top-left quadrant, turned 90° counter-clockwise for display: bottom-left.
    h, w = image.shape[:2]
    quadrants = {
        "top_left": image[: h // 2, : w // 2].mean(),
        "bottom_left": image[h // 2 :, : w // 2].mean(),
        "top_right": image[: h // 2, w // 2 :].mean(),
        "bottom_right": image[h // 2 :, w // 2 :].mean(),
    }
    assert max(quadrants, key=lambda k: quadrants[k]) == "bottom_left"


def test_variable_frame_rate_uses_frame_timestamps(tmp_path: Path) -> None:
    path = make_video(tmp_path / "vfr.mp4", [(3.0, "face"), (3.0, "blank")], vfr=True)
    info = probe(path)
    samples = list(FrameSampler(path, info, 0.5))
    assert len(samples) == sample_count(info.duration_s, 0.5)
    for s in samples:
        target = s.index * 0.5
        # The frame on screen at the target: at or before it, within the longest gap.
        assert target - 0.151 <= s.video_time_s <= target + 0.001


def test_non_zero_start_time_counts_from_the_first_frame(tmp_path: Path) -> None:
    path = make_video(
        tmp_path / "late.webm", [(3.0, "face"), (3.0, "blank")], codec="vp9", start_s=7.3
    )
    info = probe(path)
    assert info.first_pts_s == pytest.approx(7.3, abs=0.01)
    assert info.duration_s == pytest.approx(6.0, abs=0.01)
    samples = list(FrameSampler(path, info, 2.0))
    assert [round(s.video_time_s, 2) for s in samples] == [0.0, 2.0, 4.0]
    assert [bool(s.image.std() > 20) for s in samples] == [True, True, False]


@pytest.mark.parametrize(
    "content", [b"", b"hello, not a video", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500]
)
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(UnreadableVideo):
        probe(path)


def test_truncated_file_is_unreadable_or_shorter(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", [(4.0, "face")])
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])  # mp4: the index (moov) is at the end
    with pytest.raises(UnreadableVideo):
        probe(cut)
