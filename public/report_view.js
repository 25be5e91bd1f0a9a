// Report charts, drawn with uPlot (node_modules/uplot, served or inlined; no CDN):
//   - the alert timeline as a band chart: one lane per alert type, a band per episode;
//   - the emotion timeline: the dominant apparent expression's share per time bucket.
// Time runs from the session's start, which for a recorded video is video time (mm:ss).
// ProctorUI.ReportView calls ReportCharts.render(container, report) when this script and
// uPlot are on the page, so the live pages, the proctor's console and the standalone
// HTML report of `proctor analyze` share one renderer.
(() => {
  "use strict";

  const SEVERITY_COLOURS = { critical: "#c62828", warning: "#ef6c00", info: "#1565c0" };
  const EMOTION_COLOURS = {
    HAPPY: "#2e7d32", CALM: "#00838f", SURPRISED: "#f9a825", CONFUSED: "#6a1b9a",
    SAD: "#1565c0", ANGRY: "#c62828", DISGUSTED: "#4e342e", FEAR: "#455a64",
  };

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function human(key) {
    return String(key).replace(/_/g, " ").toLowerCase().replace(/^./, (c) => c.toUpperCase());
  }
  function mmss(seconds) {
    const s = Math.max(0, Math.floor(Number(seconds) + 1e-6));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(r)}` : `${two(m)}:${two(r)}`;
  }
  function epoch(value) {
    if (value === null || value === undefined) return null;
    if (typeof value === "number") return value;
    const t = Date.parse(value);
    return Number.isNaN(t) ? null : t / 1000;
  }

  // Seconds from the session's start (video time for a recording).
  function offsets(report) {
    const summary = report.summary || {};
    const start = epoch(summary.started_at) ?? 0;
    const duration = Number(summary.duration_seconds) || 0;
    const alerts = (report.alerts || []).map((a) => {
      const s = a.video_time_start_s ?? ((epoch(a.started_at) ?? start) - start);
      const endAt = a.ended_at === null || a.ended_at === undefined ? null : epoch(a.ended_at);
      const e = a.video_time_end_s ?? (endAt === null ? duration : endAt - start);
      return { type: a.type, severity: a.severity, start: Math.max(0, s), end: Math.max(s, e) };
    });
    return { duration, alerts };
  }

  function timeAxis() {
    return { values: (_u, ticks) => ticks.map(mmss), grid: { stroke: "#eee" } };
  }

  function alertBands(container, report, width) {
    const { duration, alerts } = offsets(report);
    const types = [...new Set(alerts.map((a) => a.type))];
    const box = el("div", null, "report-chart");
    box.dataset.testid = "chart-alerts";
    container.append(el("h3", "Alert timeline"), box);
    if (!types.length) {
      box.append(el("p", "No alerts were raised.", "empty"));
      return null;
    }
    const xs = new Set([0, duration]);
    for (const a of alerts) { xs.add(a.start); xs.add(a.end); }
    const x = [...xs].sort((p, q) => p - q);
    const series = [{ label: "Video time", value: (_u, v) => (v === null ? "—" : mmss(v)) }];
    const data = [x];
    types.forEach((type, lane) => {
      const mine = alerts.filter((a) => a.type === type);
      data.push(x.map((t) => (mine.some((a) => a.start <= t && t <= a.end) ? lane + 1 : null)));
      const severity = (mine[0] && mine[0].severity) || "info";
      series.push({
        label: human(type),
        stroke: SEVERITY_COLOURS[severity] || SEVERITY_COLOURS.info,
        width: 14,
        spanGaps: false,
        points: { show: true, size: 10, fill: SEVERITY_COLOURS[severity] || SEVERITY_COLOURS.info },
        value: (_u, v) => (v === null ? "" : "active"),
      });
    });
    const opts = {
      width, height: 70 + 34 * types.length,
      cursor: { y: false },
      scales: { x: { time: false, range: [0, Math.max(duration, x[x.length - 1], 1)] },
                y: { range: [0.3, types.length + 0.7] } },
      axes: [timeAxis(), {
        values: (_u, ticks) => ticks.map((v) => (Number.isInteger(v) && types[v - 1] ? human(types[v - 1]) : "")),
        splits: () => types.map((_t, i) => i + 1), size: 150, grid: { show: false },
      }],
      series,
    };
    return new window.uPlot(opts, data, box);
  }

  function emotionTimeline(container, report, width) {
    const points = (report.emotion_timeline || []).filter((p) => p && p.dominant_emotion);
    const box = el("div", null, "report-chart");
    box.dataset.testid = "chart-emotions";
    container.append(el("h3", "Emotion timeline (apparent expressions)"), box);
    if (!points.length) {
      box.append(el("p", "No face was seen, so no expression was measured.", "empty"));
      return null;
    }
    // Where no face was seen there is no bucket: a null point keeps the line from
    // bridging that stretch.
    const steps = points.slice(1).map((p, i) => p.t_offset_s - points[i].t_offset_s).sort((a, b) => a - b);
    const step = steps.length ? steps[Math.floor(steps.length / 2)] : 1;
    const rows = [];
    points.forEach((p, i) => {
      if (i && p.t_offset_s - points[i - 1].t_offset_s > 1.5 * step) {
        rows.push({ t_offset_s: points[i - 1].t_offset_s + step, gap: true });
      }
      rows.push(p);
    });
    const x = rows.map((p) => Number(p.t_offset_s) || 0);
    const emotions = [...new Set(points.map((p) => p.dominant_emotion))];
    const series = [{ label: "Video time", value: (_u, v) => (v === null ? "—" : mmss(v)) }];
    const data = [x];
    for (const emotion of emotions) {
      data.push(rows.map((p) => (!p.gap && p.dominant_emotion === emotion ? Math.round((p.share || 0) * 100) : null)));
      series.push({
        label: human(emotion),
        stroke: EMOTION_COLOURS[emotion] || "#333",
        width: 2,
        spanGaps: false,
        points: { show: true, size: 7, fill: EMOTION_COLOURS[emotion] || "#333" },
        value: (_u, v) => (v === null ? "" : `${v}%`),
      });
    }
    const last = x[x.length - 1];
    const opts = {
      width, height: 220,
      scales: { x: { time: false, range: [0, Math.max(last, Number((report.summary || {}).duration_seconds) || 0, 1)] },
                y: { range: [0, 100] } },
      axes: [timeAxis(), { values: (_u, ticks) => ticks.map((v) => `${v}%`), grid: { stroke: "#eee" } }],
      series,
    };
    return new window.uPlot(opts, data, box);
  }

  // Draws both charts into `container` (emptied first); returns the uPlot instances.
  function render(container, report, opts = {}) {
    container.replaceChildren();
    if (!window.uPlot) {
      container.append(el("p", "Charts need uPlot (node_modules/uplot), which is not loaded.", "empty"));
      return [];
    }
    const width = opts.width || Math.max(320, Math.min(1000, (container.clientWidth || 900) - 10));
    return [alertBands(container, report || {}, width), emotionTimeline(container, report || {}, width)]
      .filter(Boolean);
  }

  window.ReportCharts = Object.freeze({ render, mmss });
})();
