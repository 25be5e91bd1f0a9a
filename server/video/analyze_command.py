"""`proctor analyze VIDEO_OR_URL`: the recorded-video pipeline without a server.

The same job runner, session manager, analyser, rules and report as `POST /api/videos`,
on a store in a temporary directory (or `--db`, or `DATABASE_URL` when set), with a
progress bar on stderr; the report is written as JSON (`--out`, else stdout) and as a
self-contained HTML page (`--html`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from server.config import Settings
from server.errors import ProctorError
from server.video.jobs import FINISHED, Job, VideoJobs
from server.video.report import mmss

BAR_WIDTH = 28


def register(sub: Any) -> None:
    add_parser(sub)


def main(args: Any) -> int:
    """`proctor analyze`: settings from the environment / `.env`, quiet logs, then run."""
    from dotenv import load_dotenv

    from server.config import Settings
    from server.observability import configure_logging

    load_dotenv(override=False)  # boto3 and the LLM SDKs read the process environment
    overrides = {"analyser_backend": args.backend} if args.backend else {}
    settings = Settings(**overrides)
    configure_logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
    return run(args, settings)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("analyze", help="analyse a recorded video file or URL and write a report")
    p.add_argument("video", help="a video file or an http(s) URL")
    p.add_argument(
        "--interval", type=float, default=None, help="seconds of video between frames (2)"
    )
    p.add_argument(
        "--job-data", default="{}", help='JSON job description, e.g. {"jobTitle": "SRE"}'
    )
    p.add_argument("--out", type=Path, help="write the report JSON here (default: stdout)")
    p.add_argument("--html", type=Path, help="also write a self-contained HTML report here")
    p.add_argument(
        "--db", type=Path, help="keep the session in this SQLite file (default: DATABASE_URL "
        "when set, else a temporary file)"
    )
    p.add_argument("--backend", choices=["auto", "rekognition", "local"], help="analyser backend")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=main)


class ProgressBar:
    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._last = 0.0
        self._shown = False

    def update(self, job: Job, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        p = job.progress
        if job.state == "downloading":
            total = f"/{p.bytes_total / 1e6:.1f}" if p.bytes_total else ""
            line = f"downloading {p.bytes_done / 1e6:.1f}{total} MB"
        else:
            share = p.frames_done / p.frames_total if p.frames_total else 0.0
            filled = int(BAR_WIDTH * share)
            eta = "" if p.eta_s is None else f"  ETA {mmss(p.eta_s)}"
            line = (
                f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {p.frames_done}/{p.frames_total} "
                f"frames  {mmss(p.video_seconds_done)}/{mmss(p.video_seconds_total)}{eta}"
            )
        self.stream.write("\r" + line.ljust(78))
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


async def analyse(
    settings: Settings,
    video: str | Path,
    interval: float | None,
    job_data: dict[str, Any],
    bar: ProgressBar,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run one job to its end; returns (job record, report or None when it failed)."""
    from server.analysis.backends import make_analyser, pose_calibration_factory
    from server.observability import Instruments
    from server.session.database import make_database
    from server.session.manager import SessionManager
    from server.session.narrative import make_narrator
    from server.session.store import Store

    instruments = Instruments()
    analyser = make_analyser(settings, instruments)
    manager = SessionManager(
        settings,
        analyser,
        Store(make_database(settings)),
        instruments,
        narrator=make_narrator(settings, instruments),
        pose_calibration_factory=pose_calibration_factory(analyser),
    )
    finished = asyncio.Event()
    mine: list[str] = []  # the id of this run's job (a reused --db may hold others)

    def on_progress(job: Job) -> None:
        if mine and job.id != mine[0]:
            return
        bar.update(job, force=job.state in FINISHED)
        if job.state in FINISHED or job.state == "interrupted":
            finished.set()

    jobs = VideoJobs(manager, settings, on_progress=on_progress)
    await manager.start()
    try:
        await jobs.start()
        if isinstance(video, Path):
            record = await jobs.submit_local(video, interval, job_data)
        else:
            record = await jobs.submit_url(video, interval, job_data)
        mine.append(record["id"])
        finished.clear()  # another job's end may have set it before the id was known
        if (await jobs.get(record["id"]))["state"] not in FINISHED:
            await finished.wait()
        record = await jobs.get(record["id"])
        report = await jobs.report(record["id"]) if record["state"] == "done" else None
        return record, report
    finally:
        await jobs.stop()
        await manager.stop()
        bar.finish()


def run(args: argparse.Namespace, settings: Settings) -> int:
    from server.safe_json import JsonRejected, loads

    try:
        job_data = loads(args.job_data)
    except JsonRejected as exc:
        print(f"proctor analyze: --job-data: {exc}", file=sys.stderr)
        return 2
    if not isinstance(job_data, dict):
        print("proctor analyze: --job-data must be a JSON object", file=sys.stderr)
        return 2
    source: str | Path = args.video
    if not args.video.startswith(("http://", "https://")):
        source = Path(args.video).expanduser()
        if not source.is_file():
            print(f"proctor analyze: no such file: {args.video}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="proctor-analyze-") as tmp:
        overrides: dict[str, Any] = {"video_work_dir": Path(tmp) / "work"}
        # A store of its own in the temporary directory, unless told where: `--db` (a
        # SQLite file), else DATABASE_URL (e.g. the PostgreSQL the servers share).
        if args.db or not settings.database_url:
            overrides["database_path"] = args.db or Path(tmp) / "analyze.sqlite3"
            overrides["database_url"] = ""
        settings = settings.model_copy(update=overrides)
        bar = ProgressBar(sys.stderr, enabled=not args.quiet)
        try:
            record, report = asyncio.run(analyse(settings, source, args.interval, job_data, bar))
        except ProctorError as exc:
            print(f"proctor analyze: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    if report is None:
        error = record.get("error") or {"code": record["state"], "message": "no report"}
        print(f"proctor analyze: {error['code']}: {error['message']}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    elif not args.html:
        print(text)
    if args.html:
        from server.video.html_report import RendererMissing, render_html

        try:
            args.html.write_text(render_html(report, settings), encoding="utf-8")
        except RendererMissing as exc:
            print(f"proctor analyze: {exc}", file=sys.stderr)
            return 1
    summary = report["summary"]
    print(
        f"analysed {summary['frames_analysed']} frames of {report['video']['duration']}: "
        f"{len(report['alerts'])} alert episode(s)"
        + (f"; JSON {args.out}" if args.out else "")
        + (f"; HTML {args.html}" if args.html else ""),
        file=sys.stderr,
    )
    return 0
