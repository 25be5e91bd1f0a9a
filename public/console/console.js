// The proctor's console (GET /console): live sessions, the alert feed across them, one
// session's live view, evidence and review, ended sessions and their reports, and new
// sessions with the candidate's join link.
//
// - The operator token lives in `auth.token`, a variable of this closure: never in
//   localStorage, a cookie or a URL. REST calls send it as `Authorization: Bearer`, the
//   Socket.IO connection as `auth: {token}`, evidence images are fetched with the header
//   and shown as blob: URLs. In development mode (no API_TOKEN) no token is needed.
// - Live updates: Socket.IO `watch_all` (every session's session_started, alerts,
//   session_ended) and `watch_session` for the session on screen (its frame_analysis,
//   alerts, live_metrics, session_ended).
// - Everything the server sends is written with textContent: job data and alert text are
//   candidate-influenced. No inline script (the page's CSP forbids it).
// Test and benchmark hooks: window.proctorConsole (marks, stats).
(() => {
  "use strict";

  const R = window.ReportRenderer;
  const FEED_MAX = 200;
  const LIST_REFRESH_MS = 5000;
  const METRICS = [
    ["eye_contact", "Eye contact"], ["engagement", "Engagement"],
    ["facial_expression", "Expression"], ["posture", "Posture"], ["confidence", "Confidence"],
  ];

  const $ = (id) => document.getElementById(id);
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function button(text, cls, testid) {
    const b = el("button", text, cls);
    b.type = "button";
    if (testid) b.dataset.testid = testid;
    return b;
  }
  const now = () => performance.timeOrigin + performance.now();
  const shortId = (id) => String(id || "").slice(0, 8);

  // --- state -------------------------------------------------------------------------------
  const auth = { token: null, secured: null };
  const sessions = new Map();  // id → record (REST list rows, updated by events)
  const feedItems = new Map();  // episode id → {li, alert, sessionId}
  const state = {
    view: null, sessionId: null, socket: null, listTimer: null, tickTimer: null,
    session: null,  // the session view: {id, chart, alerts: Map, blobs: Set, metrics}
    detail: null,   // the open alert: {sessionId, alert, blob}
  };
  const stats = { events: {}, alertShown: [], started: now() };
  const marks = {};
  window.proctorConsole = { marks, stats, sessions };

  // --- small helpers ----------------------------------------------------------------------
  let noticeTimer = null;
  function notice(text, kind = "info") {
    $("notice-text").textContent = text;
    $("notice").className = `notice no-print ${kind}`;
    $("notice").hidden = false;
    clearTimeout(noticeTimer);
    if (kind !== "error") noticeTimer = setTimeout(() => { $("notice").hidden = true; }, 6000);
  }
  function errText(err) {
    if (err instanceof ApiError) {
      const e = err.body && err.body.error;
      return `${err.status} ${e ? `${e.code}: ${e.message}` : String(err.body).slice(0, 200)}`;
    }
    return err && err.message ? err.message : String(err);
  }
  function candidateName(job) { return R.candidateOf(job) || "—"; }
  function jobTitle(job) { return R.jobTitleOf(job) || "—"; }
  function label(sessionId) {
    const s = sessions.get(sessionId);
    const name = s ? R.candidateOf(s.job_data) : "";
    return name || `session ${shortId(sessionId)}`;
  }
  function healthBadge(node, health) {
    const status = (health && health.status) || "unknown";
    node.textContent = status === "ok" ? "ok" : status;
    node.className = "badge " + (status === "ok" ? "ok" : status === "warning" ? "warn" : status === "bad" ? "bad" : "");
    node.dataset.health = status;
    node.title = health && health.reasons && health.reasons.length ? health.reasons.join(", ") : "";
  }
  function duration(startedAt, endedAt) {
    const start = Number(startedAt);
    if (!Number.isFinite(start)) return "—";
    const end = endedAt ? Number(endedAt) : Date.now() / 1000;
    return R.mmss(Math.max(0, end - start));
  }

  // --- REST with the token in a header ------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body) {
      super(`HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }
  function headers(extra = {}) {
    const h = { ...extra };
    if (auth.token) h.Authorization = `Bearer ${auth.token}`;
    return h;
  }
  async function api(method, path, body) {
    const init = { method, headers: headers(), credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const ctype = r.headers.get("Content-Type") || "";
    const data = ctype.includes("json") ? await r.json() : await r.text();
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }
  // Only ever our own origin: a URL the server hands over (an evidence URL) is reduced to
  // its path, so the token cannot be sent anywhere else.
  function ownPath(url) {
    const u = new URL(url, location.origin);
    return u.pathname + u.search;
  }
  // An image fetched with the header, as a blob: URL the caller must revoke.
  async function imageUrl(url) {
    const r = await fetch(ownPath(url), { headers: headers(), credentials: "omit", cache: "no-store" });
    if (!r.ok) throw new ApiError(r.status, await r.text().catch(() => ""));
    const blob = await r.blob();
    if (!blob.type.startsWith("image/")) throw new Error(`not an image (${blob.type || "no type"})`);
    return URL.createObjectURL(blob);
  }
  function evidencePath(sessionId, alert) {
    if (alert.evidence_url) return alert.evidence_url;
    const id = alert.episode_id ?? alert.id;
    return `/api/sessions/${encodeURIComponent(sessionId)}/alerts/${encodeURIComponent(id)}/evidence`;
  }

  // --- sign-in ------------------------------------------------------------------------------
  async function probe(token) {
    const r = await fetch("/api/sessions?limit=1", {
      headers: token ? { Authorization: `Bearer ${token}` } : {}, credentials: "omit", cache: "no-store",
    });
    return r.status;
  }

  async function boot() {
    let health;
    try {
      health = await api("GET", "/health");
    } catch (err) {
      document.body.dataset.state = "error";
      notice(`The server cannot be reached: ${errText(err)}`, "error");
      return;
    }
    if (health.auth === "none") {
      auth.secured = false;
      signedIn();
    } else {
      auth.secured = true;
      showSignIn();
    }
  }

  function showSignIn(message) {
    document.body.dataset.state = "signed-out";
    $("app").hidden = true;
    $("signin").hidden = false;
    $("sign-out").hidden = true;
    $("mode").textContent = "secured";
    $("signin-error").hidden = !message;
    $("signin-error").textContent = message || "";
    $("token").focus();
  }

  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("token");
    const token = input.value.trim();
    input.value = "";  // the field is not where the token is kept
    if (!token) return;
    $("signin-btn").disabled = true;
    try {
      const status = await probe(token);
      if (status === 200) {
        auth.token = token;
        signedIn();
      } else if (status === 403) {
        showSignIn("This token may not use the console (a candidate's token?). Use the operator token.");
      } else if (status === 401) {
        showSignIn("The token is not valid.");
      } else {
        showSignIn(`The server answered ${status}.`);
      }
    } catch (err) {
      showSignIn(`The server cannot be reached: ${errText(err)}`);
    } finally {
      $("signin-btn").disabled = false;
    }
  });

  $("sign-out").addEventListener("click", () => {
    auth.token = null;
    if (state.socket) { state.socket.disconnect(); state.socket = null; }
    clearInterval(state.listTimer);
    clearInterval(state.tickTimer);
    closeSession();
    closeDetail();
    sessions.clear();
    feedItems.clear();
    $("alert-feed").replaceChildren();
    $("live-sessions").replaceChildren();
    $("report").replaceChildren();
    showSignIn();
  });

  function signedIn() {
    document.body.dataset.state = "ready";
    marks.signed_in = now();
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = !auth.secured;
    $("mode").textContent = auth.secured ? "secured" : "development (no token)";
    $("mode").className = "badge " + (auth.secured ? "ok" : "warn");
    connectSocket();
    refreshLive();
    state.listTimer = setInterval(refreshLive, LIST_REFRESH_MS);
    state.tickTimer = setInterval(tick, 1000);
    route();
  }

  // --- live events ------------------------------------------------------------------------
  function connectSocket() {
    const socket = window.io({
      transports: ["websocket"],
      auth: (cb) => cb(auth.token ? { token: auth.token } : {}),
    });
    state.socket = socket;
    const badge = $("socket-state");
    socket.on("connect", () => {
      badge.textContent = "connected";
      badge.className = "badge ok";
      socket.emit("watch_all", {}, (ack) => {
        if (ack && ack.status === "error") notice(`watch_all: ${ack.error.code}`, "error");
        else marks.watching_all = now();
      });
      if (state.session) watchSession(state.session.id);
      refreshLive();  // what happened while disconnected
    });
    socket.on("disconnect", () => { badge.textContent = "reconnecting…"; badge.className = "badge warn"; });
    socket.on("connect_error", () => { badge.textContent = "cannot connect"; badge.className = "badge bad"; });
    const count = (name) => { stats.events[name] = (stats.events[name] || 0) + 1; };
    socket.on("session_started", (p) => { count("session_started"); onSessionStarted(p); });
    socket.on("alerts", (p) => { count("alerts"); onAlerts(p); });
    socket.on("session_ended", (p) => { count("session_ended"); onSessionEnded(p); });
    socket.on("frame_analysis", (p) => { count("frame_analysis"); onFrame(p); });
    socket.on("live_metrics", (p) => { count("live_metrics"); onLiveMetrics(p); });
    socket.on("error", (p) => {
      count("error");
      if (p && p.code) notice(`${p.event || "server"}: ${p.code} — ${p.message || ""}`, "error");
    });
  }

  function watchSession(id) {
    if (!state.socket) return;
    state.socket.emit("watch_session", { session_id: id }, (ack) => {
      if (ack && ack.status === "error") {
        if (ack.error.code === "session_ended") sessionOver(id);
        else notice(`watch_session: ${ack.error.code} — ${ack.error.message}`, "error");
      }
    });
  }

  function onSessionStarted(p) {
    if (!p || !p.session_id) return;
    const prev = sessions.get(p.session_id) || {};
    sessions.set(p.session_id, { alert_count: 0, ...prev, ...p, status: "live",
                                 live: prev.live || { health: { status: "ok", reasons: [] }, alerts_active: 0 } });
    renderLive();
  }

  function onSessionEnded(p) {
    if (!p || !p.session_id) return;
    const s = sessions.get(p.session_id);
    if (s) { s.status = "ended"; s.ended_at = Date.now() / 1000; }
    renderLive();
    if (state.session && state.session.id === p.session_id) sessionOver(p.session_id, p.report);
    if (state.view === "ended") refreshEnded();
  }

  function onAlerts(p) {
    if (!p || !Array.isArray(p.alerts)) return;
    const s = sessions.get(p.session_id);
    for (const a of p.alerts) {
      if (!a || !a.type) continue;
      if (s) {
        s.live = s.live || { alerts_active: 0 };
        if (a.status === "onset" && !feedItems.has(a.episode_id)) {
          s.alert_count = (s.alert_count || 0) + 1;
          s.live.alerts_active = (s.live.alerts_active || 0) + 1;
        } else if (a.status === "ended") {
          s.live.alerts_active = Math.max(0, (s.live.alerts_active || 0) - 1);
        }
      }
      feedShow(p.session_id, a);
      if (state.session && state.session.id === p.session_id) sessionAlert(a);
    }
    renderLive();
  }

  // --- the sessions table -------------------------------------------------------------------
  async function refreshLive() {
    try {
      const data = await api("GET", "/api/sessions?status=live&limit=200");
      const seen = new Set();
      for (const row of data.sessions || []) {
        seen.add(row.session_id);
        sessions.set(row.session_id, { ...(sessions.get(row.session_id) || {}), ...row });
      }
      for (const [id, s] of sessions) if (s.status === "live" && !seen.has(id)) s.status = "ended";
      renderLive();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401 && auth.secured) showSignIn("The token is no longer accepted.");
    }
  }

  function renderLive() {
    const body = $("live-sessions");
    const live = [...sessions.values()].filter((s) => s.status === "live")
      .sort((a, b) => (b.started_at || 0) - (a.started_at || 0));
    const rows = new Map([...body.children].map((tr) => [tr.dataset.sessionId, tr]));
    live.forEach((s, i) => {
      let tr = rows.get(s.session_id);
      if (!tr) {
        tr = el("tr");
        tr.dataset.testid = "live-session";
        tr.dataset.sessionId = s.session_id;
        tr.tabIndex = 0;
        for (let c = 0; c < 7; c++) tr.append(el("td"));
        const health = el("span", "", "badge");
        tr.children[6].append(health);
        tr.addEventListener("click", () => { location.hash = `#/session/${encodeURIComponent(s.session_id)}`; });
        tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") tr.click(); });
      }
      rows.delete(s.session_id);
      const c = tr.children;
      c[0].textContent = candidateName(s.job_data);
      c[1].textContent = jobTitle(s.job_data);
      c[2].textContent = duration(s.started_at);
      c[2].dataset.started = String(s.started_at || "");
      c[3].textContent = s.transport || "—";
      c[4].textContent = (s.live && s.live.backend) || s.backend || "—";
      const active = (s.live && s.live.alerts_active) || 0;
      c[5].textContent = `${active} active · ${s.alert_count || 0} total`;
      c[5].dataset.total = String(s.alert_count || 0);
      healthBadge(c[6].firstChild, s.live && s.live.health);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const tr of rows.values()) tr.remove();
    $("live-count").textContent = String(live.length);
    $("live-empty").hidden = live.length > 0;
  }

  function tick() {
    for (const td of $("live-sessions").querySelectorAll("td[data-started]")) {
      td.textContent = duration(Number(td.dataset.started));
    }
  }

  // --- the alert feed -----------------------------------------------------------------------
  function feedShow(sessionId, a) {
    const id = a.episode_id ?? `${a.type}@${a.started_at}`;
    let item = feedItems.get(id);
    if (item && item.alert.status === "ended" && a.status !== "ended") return;
    if (!item) {
      const li = el("li");
      li.dataset.testid = "feed-alert";
      li.dataset.episodeId = id;
      li.dataset.sessionId = sessionId;
      li.dataset.type = a.type;
      const open = button("", "feed-open", "feed-open");
      open.append(el("span", "", "title"), el("span", "", "who"), el("span", "", "message"), el("span", "", "meta"));
      open.addEventListener("click", () => openDetail(sessionId, item.alert));
      li.append(open);
      $("alert-feed").prepend(li);
      item = { li, alert: a, sessionId };
      feedItems.set(id, item);
      while ($("alert-feed").children.length > FEED_MAX) {
        const last = $("alert-feed").lastChild;
        feedItems.delete(last.dataset.episodeId);
        last.remove();
      }
      item.alert = { ...a };
      renderFeedItem(item);
      if (a.status === "onset") {
        const at = now();
        li.dataset.shownAt = String(at);
        stats.alertShown.push([id, at]);
        if (stats.alertShown.length > 10000) stats.alertShown.splice(0, 5000);
      }
    } else {
      item.alert = { ...item.alert, ...a };
      renderFeedItem(item);
    }
    $("feed-count").textContent = String(feedItems.size);
    $("feed-empty").hidden = feedItems.size > 0;
  }

  function renderFeedItem(item) {
    const a = item.alert;
    const severity = ["info", "warning", "critical"].includes(a.severity) ? a.severity : "info";
    const ended = a.status === "ended";
    item.li.className = `${severity} ${ended ? "ended" : "active"}`;
    item.li.dataset.status = ended ? "ended" : "onset";
    item.li.dataset.verdict = (a.review && a.review.verdict) || "";
    const [title, who, message, meta] = item.li.firstChild.children;
    title.textContent = `${R.human(a.type)} · ${severity}`;
    who.textContent = label(item.sessionId);
    message.textContent = a.message || "";
    const review = a.review && a.review.verdict ? ` · ${a.review.verdict}` : "";
    meta.textContent = ended
      ? `${R.fmtTime(a.started_at)} → ${a.ended_at ? R.fmtTime(a.ended_at) : "ended"}${a.duration_s != null ? ` (${R.fmtDuration(a.duration_s)})` : ""}${review}`
      : `${R.fmtTime(a.started_at)} · active${review}`;
  }

  // --- one session --------------------------------------------------------------------------
  function closeSession() {
    const v = state.session;
    if (!v) return;
    if (state.socket) state.socket.emit("unwatch_session", { session_id: v.id });
    if (v.chart) v.chart.destroy();
    for (const url of v.blobs) URL.revokeObjectURL(url);
    state.session = null;
  }

  async function openSession(id) {
    closeSession();
    const v = { id, chart: null, alerts: new Map(), blobs: new Set(), over: false };
    state.session = v;
    $("session-alerts").replaceChildren();
    $("session-alert-count").textContent = "0";
    $("session-alerts-empty").hidden = false;
    $("session-report").hidden = true;
    $("session-end").hidden = false;
    $("session-end").disabled = false;
    $("session-end").textContent = "End session";
    $("session-state").textContent = "live";
    $("session-state").className = "badge ok";
    $("session-chart").replaceChildren();
    buildMetrics();
    for (const k of ["faces", "emotion", "labels", "notes", "frames"]) $(`session-${k}`).textContent = "—";
    showSessionFacts(id);
    v.chart = new R.LiveChart($("session-chart"), { testid: "chart-live", height: 220 });
    watchSession(id);
    // What the feed has seen of it, oldest first; then the stored list (with evidence
    // URLs and reviews) for what happened before this page loaded.
    for (const item of [...feedItems.values()].reverse()) {
      if (item.sessionId === id) sessionAlert(item.alert);
    }
    try {
      const data = await api("GET", `/api/sessions/${encodeURIComponent(id)}/alerts`);
      if (state.session !== v) return;
      for (const a of data.alerts || []) sessionAlert({ ...a, episode_id: a.episode_id ?? a.id, status: a.ended_at ? "ended" : "onset" });
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) notice(`Alerts of the session: ${errText(err)}`, "error");
    }
  }

  function showSessionFacts(id) {
    const s = sessions.get(id) || {};
    $("session-title").textContent = candidateName(s.job_data) !== "—" ? candidateName(s.job_data) : `Session ${shortId(id)}`;
    $("session-id").textContent = id;
    const job = s.job_data || {};
    $("session-job").textContent = [jobTitle(job), job.company].filter((x) => x && x !== "—").join(" · ") || "—";
    $("session-transport").textContent = `${s.transport || "—"} · ${(s.live && s.live.backend) || s.backend || "—"}`;
    $("session-started").textContent = s.started_at ? new Date(s.started_at * 1000).toLocaleString() : "—";
    healthBadge($("session-health"), s.live && s.live.health);
  }

  function buildMetrics() {
    const box = $("session-metrics");
    box.replaceChildren();
    for (const [key, name] of METRICS) {
      const row = el("div", null, "metric");
      row.dataset.metric = key;
      const bar = el("div", null, "bar");
      const fill = el("div", null, "bar-fill");
      bar.append(fill);
      const value = el("div", "—", "value");
      value.dataset.testid = `live-${key}`;
      row.append(el("div", name, "name"), bar, value);
      box.append(row);
    }
  }

  function showMetric(key, v) {
    const row = $("session-metrics").querySelector(`[data-metric=${key}]`);
    if (!row) return;
    const n = v === null || v === undefined ? NaN : Number(v);
    const fill = row.querySelector(".bar-fill");
    const value = row.querySelector(".value");
    if (!Number.isFinite(n)) { fill.style.width = "0%"; value.textContent = "—"; return; }
    const c = Math.max(0, Math.min(100, n));
    fill.style.width = `${c}%`;
    fill.className = "bar-fill " + (c < 40 ? "low" : c < 70 ? "mid" : "high");
    value.textContent = R.fmtNum(c, 0);
  }

  function onFrame(p) {
    const v = state.session;
    if (!v || !p || p.session_id !== v.id || !p.result) return;
    const r = p.result;
    for (const [key] of METRICS) showMetric(key, (r.metrics || {})[key]);
    $("session-faces").textContent = r.faces_count ?? "—";
    $("session-emotion").textContent = r.dominant_emotion ? R.human(r.dominant_emotion) : "—";
    $("session-labels").textContent = (r.labels || []).map((l) => (typeof l === "string" ? l : `${l.name} ${R.fmtNum(l.confidence, 0)}%`)).join(", ") || "—";
    const notes = [];
    if (r.insufficient) notes.push("too dark or blurred to judge");
    if (r.degraded && r.degraded.length) notes.push(`degraded: ${r.degraded.join(", ")}`);
    $("session-notes").textContent = notes.join("; ") || "—";
    if (v.chart) v.chart.push(r);
  }

  function onLiveMetrics(p) {
    const v = state.session;
    if (!p || !p.session_id) return;
    const s = sessions.get(p.session_id);
    if (s) {
      s.live = { ...(s.live || {}), health: p.health, backend: p.backend, frames_analysed: p.frames_analysed,
                 alerts_active: (p.active_alerts || []).length };
    }
    if (!v || p.session_id !== v.id) return;
    healthBadge($("session-health"), p.health);
    $("session-frames").textContent =
      `${p.frames_analysed ?? 0} analysed of ${p.frames_received ?? 0} received · ${p.frames_dropped ?? 0} dropped`
      + (p.rtc && p.rtc.fps ? ` · ${R.fmtNum(p.rtc.fps, 1)} fps` : "");
    for (const a of p.active_alerts || []) sessionAlert(a);
    renderLive();
  }

  function sessionOver(id, report) {
    const v = state.session;
    if (!v || v.id !== id || v.over) return;
    v.over = true;
    $("session-state").textContent = "ended";
    $("session-state").className = "badge";
    $("session-end").hidden = true;
    $("session-report").hidden = false;
    for (const a of (report && report.alerts) || []) sessionAlert({ ...a, status: "ended" });
  }

  $("session-report").addEventListener("click", () => {
    if (state.session) location.hash = `#/report/${encodeURIComponent(state.session.id)}`;
  });
  $("session-end").addEventListener("click", async () => {
    const b = $("session-end");
    const v = state.session;
    if (!v) return;
    if (b.dataset.armed !== "true") {  // a second click confirms
      b.dataset.armed = "true";
      b.textContent = "Click again to end it";
      setTimeout(() => { b.dataset.armed = ""; if (!v.over) b.textContent = "End session"; }, 4000);
      return;
    }
    b.dataset.armed = "";
    b.disabled = true;
    b.textContent = "Ending…";
    try {
      const report = await api("POST", `/api/sessions/${encodeURIComponent(v.id)}/end`);
      sessionOver(v.id, report);
    } catch (err) {
      notice(`Ending the session: ${errText(err)}`, "error");
      b.disabled = false;
      b.textContent = "End session";
    }
  });

  // An episode in the session's alert list (event, live_metrics or the REST list).
  function sessionAlert(a) {
    const v = state.session;
    if (!v || !a || !a.type) return;
    const id = a.episode_id ?? a.id;
    if (!id) return;
    let item = v.alerts.get(id);
    if (item && item.alert.status === "ended" && a.status !== "ended") {
      if (a.review || a.evidence_url) { item.alert = { ...item.alert, review: a.review || item.alert.review, evidence_url: a.evidence_url || item.alert.evidence_url }; renderSessionAlert(item); }
      return;
    }
    if (!item) {
      const li = el("li");
      li.dataset.testid = "session-alert";
      li.dataset.episodeId = id;
      li.dataset.type = a.type;
      const thumb = el("img", null, "thumb");
      thumb.alt = "Evidence";
      thumb.dataset.testid = "evidence-thumb";
      thumb.hidden = true;
      const open = button("", "open", "session-alert-open");
      open.append(el("span", "", "title"), el("span", "", "message"), el("span", "", "meta"));
      const form = el("div", null, "review-inline");
      const note = el("input");
      note.type = "text";
      note.placeholder = "Note (optional)";
      note.maxLength = 1000;
      note.dataset.testid = "review-note";
      const confirm = button("Confirm", "danger small", "review-confirm");
      const dismiss = button("Dismiss", "secondary small", "review-dismiss");
      const verdict = el("span", "", "verdict");
      verdict.dataset.testid = "review-state";
      form.append(note, confirm, dismiss, verdict);
      li.append(thumb, open, form);
      item = { li, alert: a, thumb, note, verdict, thumbLoaded: false };
      v.alerts.set(id, item);
      open.addEventListener("click", () => openDetail(v.id, item.alert));
      thumb.addEventListener("click", () => openDetail(v.id, item.alert));
      confirm.addEventListener("click", () => review(v.id, item.alert, "confirmed", note.value));
      dismiss.addEventListener("click", () => review(v.id, item.alert, "dismissed", note.value));
      $("session-alerts").prepend(li);
      item.alert = { ...a };
    } else {
      item.alert = { ...item.alert, ...a };
    }
    if (v.chart) v.chart.episode(item.alert);
    renderSessionAlert(item);
    $("session-alert-count").textContent = String(v.alerts.size);
    $("session-alerts-empty").hidden = v.alerts.size > 0;
    if (!item.thumbLoaded) loadThumb(v, item);
  }

  function renderSessionAlert(item) {
    const a = item.alert;
    const severity = ["info", "warning", "critical"].includes(a.severity) ? a.severity : "info";
    const ended = a.status === "ended" || !!a.ended_at;
    item.li.className = `${severity} ${ended ? "ended" : "active"}`;
    item.li.dataset.status = ended ? "ended" : "onset";
    const [title, message, meta] = item.li.children[1].children;
    title.textContent = `${R.human(a.type)} · ${severity}`;
    message.textContent = a.message || "";
    meta.textContent = `${R.fmtTime(a.started_at)}${ended ? ` → ${a.ended_at ? R.fmtTime(a.ended_at) : "ended"}` : " · active"}`;
    item.verdict.textContent = a.review && a.review.verdict ? R.reviewText(a.review) : "";
    item.li.dataset.verdict = (a.review && a.review.verdict) || "";
  }

  // Thumbnails one at a time (a burst of alerts must not flood the server with fetches).
  let thumbQueue = Promise.resolve();
  function loadThumb(v, item) {
    item.thumbLoaded = true;
    thumbQueue = thumbQueue.then(async () => {
      if (state.session !== v) return;
      try {
        const url = await imageUrl(evidencePath(v.id, item.alert));
        if (state.session !== v) { URL.revokeObjectURL(url); return; }
        v.blobs.add(url);
        item.thumb.src = url;
        item.thumb.hidden = false;
      } catch (err) {
        // No snapshot (yet): an alert raised a moment ago may get one shortly.
        if (err instanceof ApiError && err.status === 404 && item.alert.status !== "ended") {
          setTimeout(() => { item.thumbLoaded = false; if (state.session === v) loadThumb(v, item); }, 3000);
        }
      }
    });
  }

  // --- review ---------------------------------------------------------------------------------
  async function review(sessionId, alert, verdict, note) {
    const id = alert.episode_id ?? alert.id;
    const body = { verdict };
    if (note && note.trim()) body.note = note.trim();
    try {
      const answer = await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/alerts/${encodeURIComponent(id)}/review`, body);
      const reviewed = (answer && answer.review) || { verdict, note: body.note || null, at: Date.now() / 1000 };
      applyReview(sessionId, id, reviewed);
      notice(`Alert ${verdict}.`, "ok");
      return true;
    } catch (err) {
      notice(`Review: ${errText(err)}`, "error");
      return false;
    }
  }

  function applyReview(sessionId, id, reviewed) {
    const f = feedItems.get(id);
    if (f) { f.alert = { ...f.alert, review: reviewed }; renderFeedItem(f); }
    const v = state.session;
    if (v && v.id === sessionId) {
      const item = v.alerts.get(id);
      if (item) { item.alert = { ...item.alert, review: reviewed }; renderSessionAlert(item); }
      if (v.chart) v.chart.review(id, reviewed.verdict);
    }
    const d = state.detail;
    if (d && d.sessionId === sessionId && (d.alert.episode_id ?? d.alert.id) === id) {
      d.alert = { ...d.alert, review: reviewed };
      $("detail-review").textContent = R.reviewText(reviewed);
      $("detail-review").dataset.verdict = reviewed.verdict || "";
    }
  }

  // --- an alert's evidence and numbers --------------------------------------------------------
  function closeDetail() {
    const d = state.detail;
    if (!d) return;
    if (d.blob) URL.revokeObjectURL(d.blob);
    state.detail = null;
    $("alert-detail").hidden = true;
    $("detail-evidence").removeAttribute("src");
  }
  $("detail-close").addEventListener("click", closeDetail);
  $("alert-detail").addEventListener("click", (ev) => { if (ev.target === $("alert-detail")) closeDetail(); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeDetail(); });
  $("detail-confirm").addEventListener("click", () => {
    const d = state.detail;
    if (d) review(d.sessionId, d.alert, "confirmed", $("detail-note").value);
  });
  $("detail-dismiss").addEventListener("click", () => {
    const d = state.detail;
    if (d) review(d.sessionId, d.alert, "dismissed", $("detail-note").value);
  });

  function numbersRows(a) {
    const rows = [
      ["Type", R.human(a.type)], ["Category", a.category || "behaviour"],
      ["Onset", a.started_at ? new Date(a.started_at * 1000).toLocaleString() : "—"],
      ["Ended", a.ended_at ? new Date(a.ended_at * 1000).toLocaleString() : (a.status === "ended" ? "ended" : "still active")],
      ["Duration", R.fmtDuration(a.duration_s)],
      ["Frame", a.onset_frame ?? a.frame_index ?? "—"],
    ];
    if (a.object) rows.push(["Object", a.object]);
    for (const [k, v] of Object.entries(a.details || {})) {
      rows.push([R.human(k), v !== null && typeof v === "object" ? JSON.stringify(v) : (typeof v === "number" ? R.fmtNum(v, 2) : v)]);
    }
    return rows;
  }

  async function openDetail(sessionId, alert) {
    closeDetail();
    const d = { sessionId, alert: { ...alert }, blob: null };
    state.detail = d;
    $("alert-detail").hidden = false;
    $("detail-note").value = "";
    renderDetail(d);
    $("detail-close").focus();
    // The stored episode: its evidence URL and review (the event may predate both).
    try {
      const data = await api("GET", `/api/sessions/${encodeURIComponent(sessionId)}/alerts`);
      const id = alert.episode_id ?? alert.id;
      const stored = (data.alerts || []).find((x) => (x.episode_id ?? x.id) === id);
      if (stored && state.detail === d) {
        d.alert = { ...d.alert, ...stored, status: stored.ended_at ? "ended" : d.alert.status };
        renderDetail(d);
      }
    } catch (err) { /* the event's numbers stay; the image fetch says what is missing */ }
    if (state.detail !== d) return;
    try {
      const url = await imageUrl(evidencePath(sessionId, d.alert));
      if (state.detail !== d) { URL.revokeObjectURL(url); return; }
      d.blob = url;
      const img = $("detail-evidence");
      img.onload = () => { img.dataset.decoded = String(img.naturalWidth > 0); marks.evidence_shown = now(); };
      img.src = url;
      img.hidden = false;
      $("detail-evidence-note").textContent = "Faces and objects are boxed. The snapshot is of the frame that raised the alert.";
    } catch (err) {
      $("detail-evidence-note").textContent = err instanceof ApiError && err.status === 404
        ? "No evidence snapshot is stored for this alert."
        : `The evidence could not be loaded: ${errText(err)}`;
    }
  }

  function renderDetail(d) {
    const a = d.alert;
    $("detail-title").textContent = `${R.human(a.type)} — ${label(d.sessionId)}`;
    $("detail-severity").textContent = a.severity || "info";
    $("detail-severity").className = "badge " + (a.severity === "critical" ? "bad" : a.severity === "warning" ? "warn" : "");
    $("detail-message").textContent = a.message || "";
    const table = $("detail-numbers");
    table.replaceChildren();
    for (const [k, v] of numbersRows(a)) {
      const tr = el("tr");
      tr.append(el("th", k), el("td", v === null || v === undefined || v === "" ? "—" : v));
      table.append(tr);
    }
    $("detail-review").textContent = a.review && a.review.verdict ? R.reviewText(a.review) : "Not reviewed.";
    $("detail-review").dataset.verdict = (a.review && a.review.verdict) || "";
    if (!d.blob) {
      $("detail-evidence").hidden = true;
      $("detail-evidence-note").textContent = "Loading the evidence…";
    }
  }

  // --- ended sessions and reports ------------------------------------------------------------
  async function refreshEnded() {
    try {
      const [ended, interrupted] = await Promise.all([
        api("GET", "/api/sessions?status=ended&limit=200"),
        api("GET", "/api/sessions?status=interrupted&limit=200"),
      ]);
      const rows = [...(ended.sessions || []), ...(interrupted.sessions || [])]
        .sort((a, b) => (b.started_at || 0) - (a.started_at || 0));
      const body = $("ended-sessions");
      body.replaceChildren();
      for (const s of rows) {
        sessions.set(s.session_id, { ...(sessions.get(s.session_id) || {}), ...s });
        const tr = el("tr");
        tr.dataset.testid = "ended-session";
        tr.dataset.sessionId = s.session_id;
        tr.append(el("td", candidateName(s.job_data)), el("td", jobTitle(s.job_data)),
                  el("td", s.started_at ? new Date(s.started_at * 1000).toLocaleString() : "—"),
                  el("td", duration(s.started_at, s.ended_at || s.last_activity)),
                  el("td", s.status + (s.end_reason ? ` (${s.end_reason})` : "")),
                  el("td", String(s.alert_count ?? "—")),
                  el("td", s.review_status ? R.human(s.review_status) : "—"));
        const actions = el("td", null, "actions");
        const open = button("Report", "secondary small", "open-report");
        open.addEventListener("click", () => { location.hash = `#/report/${encodeURIComponent(s.session_id)}`; });
        const erase = button("Erase", "link-danger small", "erase-session");
        erase.addEventListener("click", () => eraseSession(s.session_id, erase));
        actions.append(open, erase);
        tr.append(actions);
        body.append(tr);
      }
      $("ended-empty").hidden = rows.length > 0;
    } catch (err) {
      notice(`Ended sessions: ${errText(err)}`, "error");
    }
  }
  $("ended-refresh").addEventListener("click", refreshEnded);

  async function eraseSession(id, b) {
    if (b.dataset.armed !== "true") {
      b.dataset.armed = "true";
      b.textContent = "Click again to erase";
      setTimeout(() => { b.dataset.armed = ""; b.textContent = "Erase"; }, 4000);
      return;
    }
    try {
      await api("DELETE", `/api/sessions/${encodeURIComponent(id)}`);
      sessions.delete(id);
      notice("Session erased: its frames, alerts, evidence and report.", "ok");
      refreshEnded();
    } catch (err) {
      notice(`Erase: ${errText(err)}`, "error");
    }
  }

  async function openReport(id) {
    const section = $("report");
    section.replaceChildren(el("p", "Loading the report…", "empty"));
    $("report-state").textContent = "";
    document.body.dataset.report = "loading";
    try {
      const report = await api("GET", `/api/sessions/${encodeURIComponent(id)}/report`);
      // Reviews made after the report was written: the stored alerts carry them.
      try {
        const data = await api("GET", `/api/sessions/${encodeURIComponent(id)}/alerts`);
        const byId = new Map((data.alerts || []).map((a) => [a.episode_id ?? a.id, a]));
        report.alerts = (report.alerts || []).map((a) => {
          const stored = byId.get(a.episode_id ?? a.id);
          return stored && stored.review ? { ...a, review: stored.review } : a;
        });
      } catch (err) { /* the report's own reviews stand */ }
      if (state.view !== "report") return;
      const s = sessions.get(id) || {};
      const title = `Report — ${candidateName(report.job_data || s.job_data)}`;
      const drawn = R.render(section, report, { printable: true, title });
      await drawn.ready;  // uPlot draws on the next frame
      section.dataset.bands = String(drawn.bands);
      section.dataset.episodes = String(drawn.episodes);
      document.body.dataset.report = "ready";
      marks.report_rendered = now();
    } catch (err) {
      const live = err instanceof ApiError && err.status === 409;
      section.replaceChildren(el("p", live ? "The session is still live: its report is written when it ends." : `The report could not be loaded: ${errText(err)}`, "empty"));
      document.body.dataset.report = "error";
    }
  }

  // --- a new session -------------------------------------------------------------------------
  $("new-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const job = {};
    const put = (key, value) => { const v = value.trim(); if (v) job[key] = v; };
    put("candidateName", $("new-candidate").value);
    put("jobTitle", $("new-job-title").value);
    put("company", $("new-company").value);
    put("jobDescription", $("new-description").value);
    const skills = $("new-skills").value.split(",").map((x) => x.trim()).filter(Boolean);
    if (skills.length) job.requiredSkills = skills;
    $("new-start").disabled = true;
    try {
      const started = await api("POST", "/api/sessions/start", { job_data: job });
      sessions.set(started.session_id, { ...started, status: "live", alert_count: 0,
                                          live: { health: { status: "ok", reasons: [] }, alerts_active: 0 } });
      $("new-session-id").textContent = shortId(started.session_id);
      $("new-session-id").dataset.sessionId = started.session_id;
      $("join-url").value = started.join_url || "";
      $("copy-state").textContent = "";
      $("new-result").hidden = false;
      $("new-form").reset();
      renderLive();
    } catch (err) {
      notice(`Creating the session: ${errText(err)}`, "error");
    } finally {
      $("new-start").disabled = false;
    }
  });
  $("copy-join").addEventListener("click", async () => {
    const input = $("join-url");
    try {
      await navigator.clipboard.writeText(input.value);
      $("copy-state").textContent = "Copied.";
    } catch (err) {
      input.select();  // no clipboard permission: leave it selected for Ctrl+C
      $("copy-state").textContent = document.execCommand && document.execCommand("copy") ? "Copied." : "Selected: press Ctrl+C.";
    }
  });
  $("new-watch").addEventListener("click", () => {
    const id = $("new-session-id").dataset.sessionId;
    if (id) location.hash = `#/session/${encodeURIComponent(id)}`;
  });

  // --- views -----------------------------------------------------------------------------------
  function show(view) {
    state.view = view;
    for (const name of ["live", "session", "ended", "report", "new"]) $(`view-${name}`).hidden = name !== view;
    for (const a of document.querySelectorAll("nav.tabs a")) {
      a.classList.toggle("current", a.dataset.view === view || (view === "session" && a.dataset.view === "live")
        || (view === "report" && a.dataset.view === "ended"));
    }
    document.body.dataset.view = view;
  }

  function route() {
    if (document.body.dataset.state !== "ready") return;
    const [, view, raw] = (location.hash || "#/live").match(/^#\/([a-z]+)(?:\/(.+))?$/) || [];
    const id = raw ? decodeURIComponent(raw) : null;
    if (view !== "session") closeSession();
    if (view === "session" && id) {
      show("session");
      if (!state.session || state.session.id !== id) openSession(id);
    } else if (view === "report" && id) {
      show("report");
      openReport(id);
    } else if (view === "ended") {
      show("ended");
      refreshEnded();
    } else if (view === "new") {
      show("new");
      $("new-job-title").focus();
    } else {
      show("live");
    }
  }
  window.addEventListener("hashchange", route);
  $("notice-close").addEventListener("click", () => { $("notice").hidden = true; });

  boot();
})();
