// The one report renderer. The candidate page (public/index.html, when the server shows it
// the report), the Socket.IO demo, the proctor's console (/console) and the standalone HTML
// page of `proctor analyze` all draw a report with `ReportRenderer.render(section, report)`:
//   - the narrative (rule-based, and the AI summary when an LLM wrote one);
//   - summary, behavioural scores, body language, cultural fit;
//   - the metrics over time (eye contact, engagement, …) with alert episodes as bands;
//   - the apparent-expression timeline;
//   - the alert timeline (a lane per alert type, a band per episode) and the alert history
//     with the operator's reviews;
//   - token usage; and "not computed" for what the server did not compute (not_computed).
// Charts use uPlot (node_modules/uplot, served at /static/vendor or inlined; never a CDN).
// Time runs from the session's start, which for a recorded video is video time (mm:ss).
// `LiveChart` is the same metrics chart fed live (the console's session view).
// Whatever the report holds is written with textContent only: job data and alert text are
// candidate-influenced. Plain browser script, no build step: defines window.ReportRenderer.
//
// Test hooks: every chart container has data-testid="chart-…"; the charts with episode bands
// set data-bands to the number of bands they drew (one per alert episode in view).
(() => {
  "use strict";

  const SEVERITY_COLOURS = { critical: "#c62828", warning: "#ef6c00", info: "#1565c0" };
  const EMOTION_COLOURS = {
    HAPPY: "#2e7d32", CALM: "#00838f", SURPRISED: "#f9a825", CONFUSED: "#6a1b9a",
    SAD: "#1565c0", ANGRY: "#c62828", DISGUSTED: "#4e342e", FEAR: "#455a64",
  };
  // The metrics charted over time: key, label, colour, shown at first.
  const METRIC_SERIES = [
    ["eye_contact", "Eye contact", "#2f6fed", true],
    ["engagement", "Engagement", "#1f9d55", true],
    ["facial_expression", "Expression", "#c77c00", false],
    ["posture", "Posture", "#7b5ea7", false],
  ];
  const SEVERITIES = ["info", "warning", "critical"];
  const EMOTION_KEYS = ["emotions", "emotion", "emotion_timeline", "emotion_distribution"];

  // --- helpers ---------------------------------------------------------------------------------
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  // An element tests and code find by id: the id doubles as its data-testid.
  function named(tag, id, cls) {
    const node = el(tag, null, cls);
    node.id = id;
    node.dataset.testid = id;
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
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return value > 1e12 ? value / 1000 : value;
    const t = Date.parse(value);
    return Number.isNaN(t) ? null : t / 1000;
  }
  function toDate(value) {
    const t = epoch(value);
    return t === null ? null : new Date(t * 1000);
  }
  function fmtTime(value) {
    const d = toDate(value);
    return d ? d.toLocaleTimeString() : "—";
  }
  function fmtNum(value, digits = 1) {
    if (value === null || value === undefined || value === "") return "—";
    const n = Number(value);
    return Number.isFinite(n) ? n.toFixed(digits).replace(/\.0+$/, "") : String(value);
  }
  function fmtDuration(seconds) {
    const s = Number(seconds);
    if (seconds === null || seconds === undefined || !Number.isFinite(s)) return "—";
    if (s < 60) return `${s.toFixed(1)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }
  function severityOf(a) {
    return SEVERITIES.includes(a && a.severity) ? a.severity : "info";
  }
  function rgba(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }
  function chips(container, items) {
    container.replaceChildren();
    if (!items.length) { container.textContent = "—"; return; }
    for (const item of items) container.append(el("span", item));
  }
  function notComputedSet(report) {
    const list = Array.isArray(report.not_computed) ? report.not_computed : [];
    return new Set(list.map((x) => String(x)));
  }
  function emotionsOff(off) {
    return EMOTION_KEYS.some((k) => off.has(k));
  }
  function chartWidth(container, opts) {
    if (opts && opts.width) return opts.width;
    return Math.max(320, Math.min(1000, (container.clientWidth || 900) - 10));
  }
  function uplotMissing(box) {
    box.append(el("p", "Charts need uPlot (node_modules/uplot), which is not loaded.", "empty"));
  }

  // --- alert episodes as bands ----------------------------------------------------------------
  // An episode for the charts: its place in chart time, its severity, its review.
  function episodeOf(a, toX, openEnd) {
    const start = toX(a, "start");
    if (start === null) return null;
    const endRaw = toX(a, "end");
    const end = endRaw === null ? openEnd : endRaw;
    const verdict = a.review && a.review.verdict;
    return { id: a.episode_id ?? a.id ?? null, type: a.type, severity: severityOf(a),
             start, end: Math.max(start, end), open: endRaw === null, verdict };
  }

  // A uPlot plugin that draws each episode as a band behind the series and reports how many
  // it drew (`onCount`). `episodes()` is read on every redraw, so a live chart's bands follow.
  function bandsPlugin(episodes, onCount) {
    return {
      hooks: {
        drawClear: [(u) => {
          const { left, top, width, height } = u.bbox;
          const xMin = u.scales.x.min, xMax = u.scales.x.max;
          const ctx = u.ctx;
          let drawn = 0;
          ctx.save();
          for (const ep of episodes()) {
            if (ep.end < xMin || ep.start > xMax) continue;
            const a = Math.max(left, u.valToPos(Math.max(ep.start, xMin), "x", true));
            const b = Math.min(left + width, u.valToPos(Math.min(ep.end, xMax), "x", true));
            const colour = ep.verdict === "dismissed" ? "#8a94a6" : (SEVERITY_COLOURS[ep.severity] || SEVERITY_COLOURS.info);
            ctx.fillStyle = rgba(colour, ep.verdict === "dismissed" ? 0.12 : 0.2);
            ctx.fillRect(a, top, Math.max(2 * (window.devicePixelRatio || 1), b - a), height);
            ctx.fillStyle = rgba(colour, 0.85);  // its onset edge
            ctx.fillRect(a, top, Math.max(1, window.devicePixelRatio || 1), height);
            drawn++;
          }
          ctx.restore();
          onCount(drawn);
        }],
      },
    };
  }

  // Report time: seconds from the session's start (video time for a recording).
  function reportClock(report) {
    const summary = report.summary || {};
    const start = epoch(summary.started_at) ?? 0;
    const duration = Number(summary.duration_seconds) || 0;
    const toX = (a, which) => {
      if (which === "start") {
        if (a.video_time_start_s !== undefined && a.video_time_start_s !== null) return Number(a.video_time_start_s);
        const s = epoch(a.started_at);
        return s === null ? null : Math.max(0, s - start);
      }
      if (a.video_time_end_s !== undefined && a.video_time_end_s !== null) return Number(a.video_time_end_s);
      const e = epoch(a.ended_at);
      return e === null ? null : Math.max(0, e - start);
    };
    const episodes = (report.alerts || []).map((a) => episodeOf(a, toX, duration)).filter(Boolean);
    return { start, duration, episodes };
  }

  // Ticks on whole seconds (mm:ss labels would repeat on fractional ones).
  const SECOND_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];
  function timeAxis(fmt = mmss) {
    return { values: (_u, ticks) => ticks.map(fmt), incrs: SECOND_INCRS, grid: { stroke: "#eee" } };
  }
  function percentAxis() {
    return { values: (_u, ticks) => ticks.map((v) => `${v}`), grid: { stroke: "#eee" }, size: 40 };
  }

  // --- charts ------------------------------------------------------------------------------------
  function metricsChart(container, report, clock, off, opts) {
    const box = el("div", null, "report-chart");
    box.dataset.testid = "chart-metrics";
    container.append(el("h3", "Metrics over time (alert episodes as bands)"), box);
    const shown = METRIC_SERIES.filter(([key]) => !off.has(key));
    const points = (report.metrics_timeline || []).filter((p) => p && typeof p === "object");
    if (!shown.length) { box.append(el("p", "Not computed.", "empty not-computed")); return null; }
    if (!points.length) {
      box.append(el("p", "No analysed frame had a face, so no metric was measured.", "empty"));
      box.dataset.bands = "0";
      return null;
    }
    if (!window.uPlot) { uplotMissing(box); return null; }
    const x = points.map((p) => Number(p.t_offset_s) || 0);
    const data = [x];
    const series = [{ label: "Time", value: (_u, v) => (v === null ? "—" : mmss(v)) }];
    for (const [key, label, colour, show] of shown) {
      data.push(points.map((p) => (p[key] === null || p[key] === undefined ? null : Number(p[key]))));
      series.push({ label, stroke: colour, width: 2, show, spanGaps: false,
                    points: { size: 5, fill: colour },
                    value: (_u, v) => (v === null ? "—" : fmtNum(v, 0)) });
    }
    const last = x[x.length - 1] || 0;
    const u = new window.uPlot({
      width: chartWidth(container, opts), height: 220,
      plugins: [bandsPlugin(() => clock.episodes, (n) => { box.dataset.bands = String(n); })],
      scales: { x: { time: false, range: [0, Math.max(clock.duration, last, 1)] }, y: { range: [0, 100] } },
      axes: [timeAxis(), percentAxis()],
      series,
    }, data, box);
    const skipped = METRIC_SERIES.filter(([key]) => off.has(key)).map(([, label]) => label);
    if (skipped.length) box.append(el("p", `Not computed: ${skipped.join(", ")}.`, "fine not-computed"));
    return u;
  }

  function emotionTimeline(container, report, off, opts) {
    const box = el("div", null, "report-chart");
    box.dataset.testid = "chart-emotions";
    container.append(el("h3", "Apparent-expression timeline"), box);
    if (emotionsOff(off)) {
      box.append(el("p", "Not computed: expression analysis was off for this session.", "empty not-computed"));
      return null;
    }
    const points = (report.emotion_timeline || []).filter((p) => p && p.dominant_emotion);
    if (!points.length) {
      box.append(el("p", "No face was seen, so no expression was measured.", "empty"));
      return null;
    }
    if (!window.uPlot) { uplotMissing(box); return null; }
    // Where no face was seen there is no bucket: a null point keeps the line from bridging it.
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
    const emotions = [...new Set(points.map((p) => String(p.dominant_emotion)))];
    const series = [{ label: "Time", value: (_u, v) => (v === null ? "—" : mmss(v)) }];
    const data = [x];
    for (const emotion of emotions) {
      data.push(rows.map((p) => (!p.gap && String(p.dominant_emotion) === emotion ? Math.round((p.share || 0) * 100) : null)));
      const colour = EMOTION_COLOURS[emotion] || "#333";
      series.push({ label: human(emotion), stroke: colour, width: 2, spanGaps: false,
                    points: { show: true, size: 7, fill: colour },
                    value: (_u, v) => (v === null ? "" : `${v}%`) });
    }
    const last = x[x.length - 1];
    return new window.uPlot({
      width: chartWidth(container, opts), height: 200,
      scales: { x: { time: false, range: [0, Math.max(last, Number((report.summary || {}).duration_seconds) || 0, 1)] },
                y: { range: [0, 100] } },
      axes: [timeAxis(), { values: (_u, ticks) => ticks.map((v) => `${v}%`), grid: { stroke: "#eee" } }],
      series,
    }, data, box);
  }

  // One lane per alert type, one band per episode.
  function alertLanes(container, report, clock, opts) {
    const box = el("div", null, "report-chart");
    box.dataset.testid = "chart-alerts";
    container.append(el("h3", "Alert timeline"), box);
    const episodes = clock.episodes;
    const types = [...new Set(episodes.map((a) => a.type))];
    if (!types.length) {
      box.append(el("p", "No alerts were raised.", "empty"));
      box.dataset.bands = "0";
      return null;
    }
    if (!window.uPlot) { uplotMissing(box); return null; }
    const duration = clock.duration;
    // Each episode's ends, and an instant either side of them where no episode is active,
    // so a lane's line breaks between two episodes of the same type.
    const EPS = 1e-3;
    const xs = new Set([0, duration]);
    for (const a of episodes) {
      xs.add(a.start); xs.add(a.end);
      if (a.start - EPS > 0) xs.add(a.start - EPS);
      xs.add(a.end + EPS);
    }
    const x = [...xs].sort((p, q) => p - q);
    const series = [{ label: "Time", value: (_u, v) => (v === null ? "—" : mmss(v)) }];
    const data = [x];
    types.forEach((type, lane) => {
      const mine = episodes.filter((a) => a.type === type);
      data.push(x.map((t) => (mine.some((a) => a.start <= t && t <= a.end) ? lane + 1 : null)));
      const colour = SEVERITY_COLOURS[(mine[0] && mine[0].severity) || "info"];
      series.push({ label: human(type), stroke: colour, width: 14, spanGaps: false,
                    points: { show: true, size: 10, fill: colour },
                    value: (_u, v) => (v === null ? "" : "active") });
    });
    box.dataset.bands = String(episodes.length);
    return new window.uPlot({
      width: chartWidth(container, opts), height: 70 + 34 * types.length,
      cursor: { y: false },
      scales: { x: { time: false, range: [0, Math.max(duration, x[x.length - 1], 1)] },
                y: { range: [0.3, types.length + 0.7] } },
      axes: [timeAxis(), {
        values: (_u, ticks) => ticks.map((v) => (Number.isInteger(v) && types[v - 1] ? human(types[v - 1]) : "")),
        splits: () => types.map((_t, i) => i + 1), size: 150, grid: { show: false },
      }],
      series,
    }, data, box);
  }

  // --- tables -----------------------------------------------------------------------------------
  function cell(row, value, header = false) {
    const c = el(header ? "th" : "td");
    if (value !== null && typeof value === "object") {
      c.textContent = Array.isArray(value) && value.every((v) => typeof v !== "object")
        ? value.join(", ") : JSON.stringify(value);
    } else {
      c.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
      if (typeof value === "number") c.className = "num";
    }
    row.append(c);
    return c;
  }
  function headerRow(table, names) {
    const tr = el("tr");
    for (const n of names) cell(tr, n, true);
    table.append(tr);
  }
  function summaryValue(key, value) {
    if (key.endsWith("_at")) {
      const d = toDate(value);
      if (d) return d.toLocaleString();
    }
    if (key === "duration_seconds") return fmtDuration(value);
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "number") return fmtNum(value, 2);
    if (Array.isArray(value)) return value.length ? value.map((v) => (typeof v === "object" ? JSON.stringify(v) : v)).join("; ") : "—";
    if (value && typeof value === "object") {
      const parts = Object.entries(value).map(([k, v]) => `${k} ${v}`);
      return parts.length ? parts.join(", ") : "—";
    }
    return value;
  }
  function renderSummary(table, summary) {
    table.replaceChildren();
    for (const [key, value] of Object.entries(summary || {})) {
      const tr = el("tr");
      tr.dataset.key = key;
      cell(tr, human(key), true);
      cell(tr, summaryValue(key, value)).dataset.testid = `summary-${key}`;
      table.append(tr);
    }
  }
  function renderScores(table, scores, off) {
    table.replaceChildren();
    headerRow(table, ["Metric", "Average", "Min", "Max", "Trend"]);
    for (const [metric, s] of Object.entries(scores || {})) {
      const tr = el("tr");
      tr.dataset.metric = metric;
      cell(tr, human(metric), true);
      if (off.has(metric)) {
        const c = cell(tr, "not computed");
        c.colSpan = 4;
        c.className = "empty not-computed";
      } else {
        const o = s && typeof s === "object" ? s : { average: s };
        cell(tr, fmtNum(o.average));
        cell(tr, fmtNum(o.min));
        cell(tr, fmtNum(o.max));
        cell(tr, o.trend ? human(o.trend) : "—");
      }
      table.append(tr);
    }
  }
  // body_language / cultural_fit: a text assessment, an optional AI one, and signal bands.
  function renderAssessment(container, part) {
    container.replaceChildren();
    if (!part || (typeof part === "object" && !Object.keys(part).length)) {
      container.append(el("p", "Not available.", "empty"));
      return;
    }
    if (typeof part === "string") { container.append(el("p", part)); return; }
    if (part.assessment) container.append(el("p", part.assessment));
    if (part.ai_assessment) {
      const ai = typeof part.ai_assessment === "string" ? part.ai_assessment : JSON.stringify(part.ai_assessment);
      const p = el("p", ai);
      p.dataset.testid = "report-ai-assessment";
      container.append(el("div", "AI assessment", "fine"), p);
    }
    const bands = Object.entries(part.signals || part)
      .filter(([k, v]) => typeof v === "string" && !["source", "assessment", "role", "ai_assessment"].includes(k))
      .map(([k, v]) => `${human(k)}: ${v}`);
    if (bands.length) {
      const c = el("div", null, "chips");
      chips(c, bands);
      container.append(c);
    }
  }
  function reviewText(review) {
    if (!review || !review.verdict) return "not reviewed";
    const at = review.at ? ` (${fmtTime(review.at)})` : "";
    return `${human(review.verdict)}${review.note ? `: ${review.note}` : ""}${at}`;
  }
  function renderAlertHistory(table, alerts) {
    table.replaceChildren();
    headerRow(table, ["Type", "Severity", "Onset", "Ended", "Duration", "Message", "Review"]);
    const list = Array.isArray(alerts) ? alerts : [];
    if (!list.length) {
      const tr = el("tr");
      const c = cell(tr, "No alerts were raised.");
      c.colSpan = 7;
      c.className = "empty";
      table.append(tr);
      return;
    }
    for (const a of list) {
      const tr = el("tr", null, severityOf(a));
      tr.dataset.testid = "report-alert";
      tr.dataset.type = a.type || "";
      tr.dataset.episodeId = a.episode_id ?? a.id ?? "";
      cell(tr, human(a.type || "") + (a.object ? ` (${a.object})` : "") + (a.category === "technical" ? " · technical" : ""));
      cell(tr, a.severity);
      // A recorded video's alerts are placed in video time (mm:ss), the rest by the clock.
      cell(tr, a.video_time_start || fmtTime(a.started_at));
      cell(tr, a.video_time_end || (a.ended_at ? fmtTime(a.ended_at) : "—"));
      cell(tr, a.duration_s === null || a.duration_s === undefined ? "—" : fmtDuration(a.duration_s));
      cell(tr, a.message || "");
      const review = cell(tr, reviewText(a.review));
      review.dataset.testid = "report-alert-review";
      review.dataset.verdict = (a.review && a.review.verdict) || "";
      table.append(tr);
    }
  }
  function tokenText(report) {
    const tokens = report.token_usage || {};
    let text = tokens.total_tokens
      ? `${tokens.prompt_tokens} prompt + ${tokens.completion_tokens} completion = ${tokens.total_tokens} tokens`
        + (Object.keys(tokens.by_provider || {}).length ? ` (${Object.keys(tokens.by_provider).join(", ")})` : "")
      : "No LLM was used: the narrative parts are rule-based.";
    const llm = report.llm;
    if (llm && llm.error) {
      // The report is complete without the LLM; say why its narrative is missing.
      text += ` The AI summary (${llm.provider}) failed: ${llm.error}.`;
    }
    return text;
  }
  function candidateOf(job) {
    const j = job && typeof job === "object" ? job : {};
    const name = j.candidateName ?? j.candidate_name ?? j.candidate ?? j.name;
    return typeof name === "string" || typeof name === "number" ? String(name) : "";
  }
  function jobTitleOf(job) {
    const j = job && typeof job === "object" ? job : {};
    const t = j.jobTitle ?? j.job_title ?? j.title ?? j.position ?? j.role;
    return typeof t === "string" || typeof t === "number" ? String(t) : "";
  }

  // --- the report -------------------------------------------------------------------------------
  // Builds the whole report into `section` (emptied first). Options: `width` of the charts,
  // `title`. Returns {charts, bands}: the uPlot instances and the metric chart's band count.
  function render(section, report, opts = {}) {
    report = report && typeof report === "object" ? report : {};
    const off = notComputedSet(report);
    const clock = reportClock(report);
    const n = {
      text: named("div", "report-text"),
      headline: named("p", "report-headline", "headline"),
      summary: named("table", "report-summary"),
      scores: named("table", "report-scores"),
      body: named("div", "report-body-language"),
      fit: named("div", "report-cultural-fit"),
      aiBlock: named("div", "report-ai-summary-block"),
      aiProvider: named("span", "report-ai-provider", "fine"),
      ai: named("p", "report-ai-summary"),
      alerts: named("table", "report-alerts"),
      charts: named("div", "report-charts"),
      tokens: named("p", "report-tokens"),
      raw: named("pre", "report-raw"),
    };
    const heading = el("div", null, "report-heading");
    heading.append(el("h2", opts.title || "Final report"));
    const who = [candidateOf(report.job_data), jobTitleOf(report.job_data)].filter(Boolean).join(" · ");
    if (who) heading.append(named("span", "report-who", "fine"));
    if (opts.printable) {
      const print = named("button", "report-print", "secondary no-print");
      print.type = "button";
      print.textContent = "Print";
      print.addEventListener("click", () => window.print());
      heading.append(print);
    }
    n.text.append(n.headline);
    const narrative = report.narrative;
    n.headline.textContent = typeof narrative === "string" ? narrative : (narrative && narrative.summary) || "";
    const ai = report.ai_summary;
    const aiText = ai && (typeof ai === "string" ? ai : ai.text);
    n.aiBlock.hidden = !aiText;
    n.ai.textContent = aiText || "";
    n.aiProvider.textContent = ai && ai.provider ? `(${ai.provider}${ai.model ? `, ${ai.model}` : ""})` : "";
    const aiTitle = el("h3", "AI summary ");
    aiTitle.append(n.aiProvider);
    n.aiBlock.append(aiTitle, n.ai);

    renderSummary(n.summary, report.summary || {});
    renderScores(n.scores, report.behavioural_scores || {}, off);
    renderAssessment(n.body, report.body_language);
    const emotions = Object.entries(report.emotion_distribution || {}).slice(0, 5);
    if (emotionsOff(off)) {
      n.body.append(el("p", "Apparent expressions: not computed.", "fine not-computed"));
    } else if (emotions.length) {
      const c = el("div", null, "chips");
      c.dataset.testid = "report-emotions";
      chips(c, emotions.map(([name, share]) => `${human(name)} ${fmtNum(share * 100, 0)}%`));
      n.body.append(el("div", "Apparent expressions over the session", "fine"), c);
    }
    renderAssessment(n.fit, report.cultural_fit);
    renderAlertHistory(n.alerts, report.alerts);
    n.tokens.textContent = tokenText(report);
    n.raw.textContent = JSON.stringify(report, null, 2);

    const grid = el("div", null, "report-grid");
    const left = el("div");
    left.append(el("h3", "Summary"), n.summary);
    const right = el("div");
    right.append(el("h3", "Behavioural scores"), n.scores, el("h3", "Body language"), n.body,
                 el("h3", "Cultural fit"), n.fit);
    grid.append(left, right);
    const details = el("details", null, "no-print");
    details.append(el("summary", "Raw report JSON"), n.raw);
    if (report.partial) {
      n.text.append(el("p", `Partial report: ${(report.partial_reasons || []).join(", ") || "some data was missing"}.`, "fine"));
    }
    section.replaceChildren(heading, n.text, n.aiBlock, grid, n.charts, el("h3", "Alert history"), n.alerts,
                            el("h3", "Token usage"), n.tokens, details);
    if (who) section.querySelector("#report-who").textContent = who;
    section.classList.add("report");

    // Charts last: they size themselves to the section, which is now laid out.
    const charts = [];
    const metrics = metricsChart(n.charts, report, clock, off, opts);
    const expressions = emotionTimeline(n.charts, report, off, opts);
    const lanes = alertLanes(n.charts, report, clock, opts);
    for (const c of [metrics, expressions, lanes]) if (c) charts.push(c);
    const box = n.charts.querySelector("[data-testid=chart-metrics]");
    return {
      charts,
      episodes: clock.episodes.length,
      // Bands the metrics chart drew (uPlot draws on its next frame: after `ready`).
      get bands() { return Number(box && box.dataset.bands) || 0; },
      ready: new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))),
    };
  }

  // --- the same metrics chart, live (the console's session view) ---------------------------------
  // x: Unix seconds (clock time); points arrive one frame at a time; episodes are alert
  // episodes as the `alerts` events describe them (onset, then ended). Redraws at most once
  // per animation frame, and keeps the last `windowS` seconds.
  class LiveChart {
    constructor(container, opts = {}) {
      this.box = el("div", null, "report-chart live-chart");
      this.box.dataset.testid = opts.testid || "chart-live";
      this.box.dataset.bands = "0";
      container.append(this.box);
      this.windowS = opts.windowS || 600;
      this.x = [];
      this.series = METRIC_SERIES.slice(0, 2).map(() => []);
      this.episodes = new Map();  // id → {start, end|null, severity, type, verdict}
      this.pending = false;
      this.u = null;
      if (!window.uPlot) { uplotMissing(this.box); return; }
      const series = [{ label: "Time", value: (_u, v) => (v === null ? "—" : new Date(v * 1000).toLocaleTimeString()) }];
      for (const [, label, colour] of METRIC_SERIES.slice(0, 2)) {
        series.push({ label, stroke: colour, width: 2, spanGaps: false,
                      // uPlot shows the points while they are sparse (a lone one has no line).
                      points: { size: 5, fill: colour }, value: (_u, v) => (v === null ? "—" : fmtNum(v, 0)) });
      }
      this.u = new window.uPlot({
        width: chartWidth(container, opts), height: opts.height || 200,
        plugins: [bandsPlugin(() => this.bandList(), (count) => { this.box.dataset.bands = String(count); })],
        scales: { x: { time: true, range: () => this.range() }, y: { range: [0, 100] } },
        axes: [{ grid: { stroke: "#eee" } }, percentAxis()],
        series,
      }, [this.x, ...this.series], this.box);
    }

    // At least the last minute, and every episode's start in view.
    range() {
      // From the chart's own data (uPlot's min/max of an empty series are not times).
      const eps = [...this.episodes.values()];
      const ends = [...this.x.slice(-1), ...eps.map((e) => e.end ?? e.start)];
      const top = ends.length ? Math.max(...ends) : Date.now() / 1000;
      const first = Math.min(...this.x.slice(0, 1), ...eps.map((e) => e.start), top - 60);
      const lo = Math.max(first, top - this.windowS);
      this.box.dataset.spanS = String(Math.round(top + 1 - lo));  // a test hook
      return [lo, top + 1];
    }

    bandList() {
      const now = this.x.length ? this.x[this.x.length - 1] : Date.now() / 1000;
      return [...this.episodes.values()].map((e) => ({ ...e, end: e.end ?? Math.max(now, e.start) }));
    }

    // One frame_analysis result.
    push(result) {
      const t = epoch(result && (result.timestamp ?? (result.timings || {}).captured_at));
      if (t === null) return;
      const metrics = (result && result.metrics) || {};
      if (this.x.length && t < this.x[this.x.length - 1]) return;  // out of order: skip
      this.x.push(t);
      METRIC_SERIES.slice(0, 2).forEach(([key], i) => {
        const v = metrics[key];
        this.series[i].push(v === null || v === undefined ? null : Number(v));
      });
      while (this.x.length > 2 && this.x[0] < t - this.windowS) {
        this.x.shift();
        for (const s of this.series) s.shift();
      }
      this.redraw();
    }

    // An alert episode event (onset or ended), or an episode from the alerts list.
    episode(a) {
      if (!a || !a.type) return;
      const id = a.episode_id ?? a.id ?? `${a.type}@${a.started_at}`;
      const start = epoch(a.started_at);
      if (start === null) return;
      const prev = this.episodes.get(id);
      const ended = a.status === "ended" || (a.ended_at !== null && a.ended_at !== undefined);
      this.episodes.set(id, {
        id, type: a.type, severity: severityOf(a), start,
        end: ended ? (epoch(a.ended_at) ?? (prev && prev.end) ?? start) : null,
        verdict: (a.review && a.review.verdict) || (prev && prev.verdict) || null,
      });
      this.redraw();
    }

    review(id, verdict) {
      const e = this.episodes.get(id);
      if (e) { e.verdict = verdict; this.redraw(); }
    }

    redraw() {
      if (!this.u || this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.u.setData([this.x, ...this.series]);
      });
    }

    destroy() {
      if (this.u) this.u.destroy();
      this.u = null;
      this.box.remove();
    }
  }

  window.ReportRenderer = Object.freeze({
    render, LiveChart, mmss, fmtTime, fmtNum, fmtDuration, human, candidateOf, jobTitleOf,
    reviewText, METRIC_SERIES,
  });
})();
