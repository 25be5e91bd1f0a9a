"""The self-contained HTML report of `proctor analyze`: the one report renderer of every
page (public/report_view.js, reached through public/proctor_ui.js) and uPlot from
node_modules, inlined with the report's JSON into one file that needs no server and no
network; printable (the print stylesheet of proctor_ui.css)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from server.config import Settings

UPLOT_JS = Path("uplot/dist/uPlot.iife.min.js")
UPLOT_CSS = Path("uplot/dist/uPlot.min.css")


class RendererMissing(RuntimeError):
    """A file the page is built from is not installed (run `npm ci`)."""


def _read(path: Path) -> str:
    if not path.is_file():
        raise RendererMissing(f"{path} is missing (install the web dependencies: npm ci)")
    return path.read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    # Inside <script>, only "</" can end the element early.
    return text.replace("</", "<\\/")


def render_html(report: dict[str, Any], settings: Settings) -> str:
    public, modules = settings.public_dir, settings.node_modules_dir
    styles = "\n".join([_read(modules / UPLOT_CSS), _read(public / "proctor_ui.css"), PAGE_CSS])
    scripts = [
        _read(modules / UPLOT_JS),
        _read(public / "proctor_ui.js"),
        _read(public / "report_view.js"),
    ]
    video = report.get("video") or {}
    title = "Interview report" + (
        f" — {video.get('filename') or video.get('url')}" if video else ""
    )
    data = _script_safe(json.dumps(report, default=str))
    inline = "\n".join(f"<script>{_script_safe(s)}</script>" for s in scripts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{styles}</style>
</head>
<body>
<main>
<h1>{html.escape(title)}</h1>
<p class="fine" id="video-facts"></p>
<section id="report" data-testid="report" class="card report" hidden></section>
</main>
<script type="application/json" id="report-data">{data}</script>
{inline}
<script>
(() => {{
  const report = JSON.parse(document.getElementById("report-data").textContent);
  const v = report.video;
  if (v) {{
    document.getElementById("video-facts").textContent =
      `${{v.duration || ""}} of video (${{v.codec || "?"}}, ${{v.width}}×${{v.height}}), ` +
      `a frame every ${{v.interval_seconds}} s: ${{v.frames_sampled}} frames analysed.`;
  }}
  new ProctorUI.ReportView(document).render(report, {{ printable: true }});
  document.body.dataset.rendered = "true";
}})();
</script>
</body>
</html>
"""


PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #fafafa; color: #222; }
main { display: block; max-width: 1040px; margin: 0 auto; padding: 1.5rem; }
.report-chart { margin: 0.5rem 0 1.5rem; }
"""
