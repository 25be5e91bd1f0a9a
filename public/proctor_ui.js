// Rendering shared by the two browser pages: public/index.html (WebRTC, app.js) and
// client_example.html (the Socket.IO demo); the report itself is drawn by report_view.js,
// the renderer every page shares (the console and `proctor analyze --html` too). It knows the server's JSON (analysis results,
// alert episodes, live metrics, the final report), which is the same on every transport,
// and nothing about how it arrives. Plain browser script, no build step: it defines
// window.ProctorUI. Whatever the server sends is written with textContent only.
//
// Markup contract: the page provides these ids; the module fills them.
//   LiveView   #metrics (bars are built inside), #faces-count, #dominant-emotion, #emotions,
//              #labels, #text-seen, #frame-notes
//   AlertList  #alerts-list, #alerts-empty, #active-alerts
//   ReportView #report (an empty section; report_view.js builds its contents)
(() => {
  "use strict";

  const METRICS = [
    ["eye_contact", "Eye contact"],
    ["engagement", "Engagement"],
    ["facial_expression", "Expression"],
    ["posture", "Posture"],
    ["confidence", "Confidence"],
  ];
  const SEVERITIES = ["info", "warning", "critical"];

  // --- helpers -------------------------------------------------------------------------------
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
  function need(root, id) {
    const node = root.getElementById ? root.getElementById(id) : root.querySelector(`#${id}`);
    if (!node) throw new Error(`proctor_ui: the page has no #${id}`);
    return node;
  }
  function toDate(value) {
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return new Date(value > 1e12 ? value : value * 1000);
    const d = new Date(value);
    return Number.isNaN(d.getTime()) ? null : d;
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
    if (!Number.isFinite(s)) return "—";
    if (s < 60) return `${s.toFixed(1)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }
  function human(key) {
    return String(key).replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
  }
  function errText(err) {
    return err && err.message ? err.message : String(err);
  }
  function chips(container, items) {
    container.replaceChildren();
    if (!items.length) { container.textContent = "—"; return; }
    for (const item of items) container.append(el("span", item));
  }

  // --- live result: metric bars, faces, emotions, labels, text ---------------------------------
  class LiveView {
    constructor(root = document) {
      this.nodes = {
        faces: need(root, "faces-count"), emotion: need(root, "dominant-emotion"),
        emotions: need(root, "emotions"), labels: need(root, "labels"),
        text: need(root, "text-seen"), notes: need(root, "frame-notes"),
      };
      this.bars = {};
      const container = need(root, "metrics");
      for (const [key, label] of METRICS) {
        const row = el("div", null, "metric");
        row.dataset.metric = key;
        row.dataset.testid = `metric-${key}`;
        const bar = el("div", null, "bar");
        const fill = named("div", `bar-${key}`, "bar-fill");
        bar.append(fill);
        const value = el("div", null, "value");
        const current = named("span", `value-${key}`);
        current.textContent = "—";
        const avg = el("span", "", "avg");
        avg.id = `avg-${key}`;
        value.append(current, avg);
        row.append(el("div", label, "name"), bar, value);
        container.append(row);
        this.bars[key] = { fill, current, avg };
      }
    }

    showMetric(key, value) {
      const bar = this.bars[key];
      const n = value === null || value === undefined ? NaN : Number(value);
      if (!Number.isFinite(n)) {
        bar.fill.style.width = "0%";
        bar.fill.className = "bar-fill";
        bar.current.textContent = "—";
        bar.current.dataset.value = "";
        return;
      }
      const clamped = Math.max(0, Math.min(100, n));
      bar.fill.style.width = `${clamped}%`;
      bar.fill.className = "bar-fill " + (clamped < 40 ? "low" : clamped < 70 ? "mid" : "high");
      bar.current.textContent = fmtNum(clamped, 0);
      bar.current.dataset.value = String(clamped);
    }

    // One frame_analysis result.
    show(result) {
      const ui = this.nodes;
      const metrics = result.metrics || {};
      for (const [key] of METRICS) this.showMetric(key, metrics[key]);
      ui.faces.textContent = result.faces_count ?? "—";
      ui.faces.dataset.value = result.faces_count ?? "";
      ui.emotion.textContent = result.dominant_emotion ? human(String(result.dominant_emotion).toLowerCase()) : "—";
      ui.emotion.dataset.value = result.dominant_emotion || "";
      chips(ui.emotions, Object.entries(result.emotions || {})
        .sort((a, b) => b[1] - a[1]).slice(0, 4)
        .map(([name, v]) => `${human(name.toLowerCase())} ${fmtNum(v, 0)}`));
      chips(ui.labels, (result.labels || []).map((l) =>
        typeof l === "string" ? l : `${l.name ?? "?"} ${fmtNum(l.confidence, 0)}%`));
      chips(ui.text, (result.text || []).map((t) => (typeof t === "string" ? t : t.text ?? "")));
      const notes = [];
      if (result.insufficient) notes.push("face too small, dark or blurred to judge");
      if (result.degraded && result.degraded.length) notes.push(`degraded: ${result.degraded.join(", ")}`);
      ui.notes.textContent = notes.length ? notes.join("; ") : "—";
    }

    // The session averages from a live_metrics message (its `metrics` object).
    showAverages(metrics) {
      for (const [key] of METRICS) {
        const m = (metrics || {})[key];
        const avg = m && typeof m === "object" ? m.average : null;
        this.bars[key].avg.textContent = avg === null || avg === undefined ? "" : `avg ${fmtNum(avg, 0)}`;
      }
    }

    reset() {
      for (const [key] of METRICS) { this.showMetric(key, null); this.bars[key].avg.textContent = ""; }
      for (const node of Object.values(this.nodes)) node.textContent = "—";
      this.nodes.faces.dataset.value = this.nodes.emotion.dataset.value = "";
    }
  }

  // --- alert episodes: one list item each, from onset to end -----------------------------------
  class AlertList {
    // The "active for …" text of open episodes is refreshed every `tickMs`.
    constructor(root = document, tickMs = 1000) {
      this.list = need(root, "alerts-list");
      this.empty = need(root, "alerts-empty");
      this.count = need(root, "active-alerts");
      this.items = new Map(); // episode key → {li, alert}
      this.refreshCount();
      setInterval(() => this.tick(), tickMs);
    }

    static key(a) {
      return a.episode_id ?? `${a.type}:${a.object ?? ""}@${a.started_at ?? a.frame_index}`;
    }

    // An onset or an end of an episode; repeated onsets update it, an ended one never reopens.
    show(a) {
      if (!a || !a.type) return;
      const key = AlertList.key(a);
      let item = this.items.get(key);
      if (item && item.alert.status === "ended" && a.status !== "ended") return;
      if (!item) {
        const li = el("li");
        li.dataset.testid = "alert";
        li.dataset.episodeId = key;
        li.dataset.type = a.type;
        const title = el("div", null, "title");
        title.append(el("span", human(a.type)), el("span", "", "badge"), el("span", "", "state"));
        li.append(title, el("div", null, "message"), el("div", null, "meta"));
        this.list.prepend(li);
        item = { li, alert: a };
        this.items.set(key, item);
      }
      item.alert = { ...item.alert, ...a };
      this.render(item);
      this.refreshCount();
    }

    // After a reconnect, events sent while the page was cut off are lost: take the server's
    // list of open episodes (live_metrics.active_alerts) as the truth.
    resync(openAlerts) {
      const open = new Set(openAlerts.map(AlertList.key));
      for (const a of openAlerts) if (!this.items.has(AlertList.key(a))) this.show(a);
      for (const [key, item] of this.items) {
        if (item.alert.status !== "ended" && !open.has(key)) {
          this.show({ ...item.alert, status: "ended", ended_at: null, duration_s: null,
                      end_reason: "ended while disconnected" });
        }
      }
    }

    // The session is over: close what is still open, with the report's end where it has one.
    closeAll(reportAlerts) {
      for (const item of [...this.items.values()]) {
        if (item.alert.status === "ended") continue;
        const closing = (reportAlerts || []).find((a) => AlertList.key(a) === AlertList.key(item.alert));
        this.show(closing ? { ...closing, status: "ended" }
          : { ...item.alert, status: "ended", end_reason: "session ended" });
      }
    }

    clear() {
      this.items.clear();
      this.list.replaceChildren();
      this.refreshCount();
    }

    tick() {
      for (const item of this.items.values()) if (item.alert.status !== "ended") this.render(item);
    }

    render(item) {
      const a = item.alert;
      const li = item.li;
      const severity = SEVERITIES.includes(a.severity) ? a.severity : "info";
      const ended = a.status === "ended";
      li.className = `${severity} ${ended ? "ended" : "active"}`;
      li.dataset.status = ended ? "ended" : "onset";
      li.dataset.severity = severity;
      const [title, message, meta] = li.children;
      const [, sevBadge, stateText] = title.children;
      sevBadge.textContent = severity;
      sevBadge.className = "badge" + (severity === "critical" ? " bad" : severity === "warning" ? " warn" : "");
      stateText.textContent = ended ? "ended" : "active";
      message.textContent = a.message || "";
      const onset = `onset ${fmtTime(a.started_at)}`;
      if (ended) {
        const end = a.ended_at ? fmtTime(a.ended_at) : (a.end_reason || "unknown");
        const duration = a.duration_s !== null && a.duration_s !== undefined
          ? ` · lasted ${fmtDuration(a.duration_s)}` : "";
        meta.textContent = `${onset} → ended ${end}${duration}`;
        li.dataset.duration = a.duration_s ?? "";
      } else {
        const started = toDate(a.started_at);
        const since = started ? ` · active for ${fmtDuration((Date.now() - started.getTime()) / 1000)}` : "";
        meta.textContent = `${onset} (frame ${a.frame_index ?? "—"})${since}`;
      }
    }

    refreshCount() {
      let active = 0;
      for (const item of this.items.values()) if (item.alert.status !== "ended") active++;
      this.count.textContent = `${active} active`;
      this.count.dataset.count = String(active);
      this.count.className = "badge" + (active ? " bad" : "");
      this.empty.hidden = this.items.size > 0;
    }
  }

  // --- the final report: drawn by the one report renderer (report_view.js) ----------------------
  class ReportView {
    constructor(root = document) {
      this.section = need(root, "report");
    }

    // Returns false (and shows nothing) when given no report: a candidate whose server sends
    // only the session's state (CANDIDATE_VIEW=status) gets {"status": "ended"}.
    render(report, opts = {}) {
      if (!isReport(report)) { this.hide(); return false; }
      this.section.hidden = false;  // laid out first: the charts size themselves to it
      if (!window.ReportRenderer) {
        this.section.replaceChildren(el("p", "The report renderer (report_view.js) is not loaded.", "empty"));
        return true;
      }
      this.drawn = window.ReportRenderer.render(this.section, report, opts);
      this.section.scrollIntoView({ behavior: "smooth", block: "start" });
      return true;
    }

    hide() { this.section.hidden = true; }
  }

  // A full report, as opposed to a state-only answer ({"status": "ended"}).
  function isReport(x) {
    return !!x && typeof x === "object" && typeof x.summary === "object" && x.summary !== null;
  }

  window.ProctorUI = Object.freeze({
    METRICS, el, toDate, fmtTime, fmtNum, fmtDuration, human, errText, chips, isReport,
    LiveView, AlertList, ReportView,
  });
})();
