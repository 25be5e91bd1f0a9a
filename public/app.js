// Candidate / interviewer page: sends the camera to the server over WebRTC and shows the
// analysis that comes back on the "proctoring" data channel. Plain browser JavaScript, no
// build step, no third-party code. The contract with the server is /api/rtc/offer plus the
// JSON messages listed in the README.
(() => {
  "use strict";

  // Rendering shared with client_example.html (metric bars, alerts, report): proctor_ui.js.
  const { el, fmtTime, fmtNum, human, errText } = window.ProctorUI;

  const OFFER_URL = "/api/rtc/offer";
  const ICE_SERVERS_URL = "/api/rtc/ice-servers";
  const ICE_GATHER_TIMEOUT_MS = 5000; // aiortc has no trickle ICE: wait, but not forever
  const OPEN_TIMEOUT_MS = 20000; // answer → data channel open
  const DISCONNECTED_GRACE_MS = 3000; // "disconnected" often heals by itself
  const RECONNECT_MAX_DELAY_MS = 8000;
  const OVERLOAD_RETRIES = 3; // 503 + Retry-After on the first connect
  const END_TIMEOUT_MS = 90000; // the report may wait for an LLM
  const LIVE_METRICS_EVERY_MS = 5000;
  const PING_EVERY_MS = 5000;
  const STATS_EVERY_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    sessionState: $("session-state"), rtcState: $("rtc-state"), dcState: $("dc-state"),
    banner: $("error-banner"), bannerText: $("error-banner-text"), bannerClose: $("error-dismiss"),
    job: $("job-title"), connect: $("connect-btn"), end: $("end-btn"),
    video: $("preview"), overlay: $("video-overlay"),
    sessionId: $("session-id"), backend: $("backend"), sendStats: $("send-stats"),
    videoLimits: $("video-limits"), rtt: $("rtt"), reconnects: $("reconnects"),
    analysed: $("frames-analysed"), latency: $("analysis-latency"),
    counters: $("server-counters"), serverVideo: $("server-video"),
    status: $("status-line"), log: $("error-log"), timings: $("timings"),
  };
  const liveView = new ProctorUI.LiveView();
  const alertList = new ProctorUI.AlertList();
  const reportView = new ProctorUI.ReportView();

  // phase: idle → connecting → live ⇄ reconnecting → ending → ended (→ connecting again)
  const state = {
    phase: "idle",
    config: loadConfig(),
    join: readJoinLink(), // {sessionId, token} from a join_url, or null
    stream: null,
    track: null,
    sessionId: null,
    gen: 0, // bumps with every peer connection; events from older ones are ignored
    pc: null,
    dc: null,
    sender: null,
    videoLimits: null,
    reconnects: 0,
    disconnectTimer: null,
    endTimer: null,
    timers: [],
    analyses: 0,
    resyncAlerts: false,
    marks: {},
    frameAges: [], // ms from capture to analysis start, recent analyses (bounded)
  };
  // Read-only view for tests and for anyone debugging from the console.
  window.proctorPage = { marks: state.marks, frameAges: state.frameAges, get phase() { return state.phase; },
                         get sessionId() { return state.sessionId; } };

  // --- small helpers ---------------------------------------------------------------------
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function loadConfig() {
    let cfg = {};
    const node = document.getElementById("proctor-config");
    if (node && node.textContent.trim()) {
      try {
        cfg = JSON.parse(node.textContent);
      } catch (err) {
        console.warn("ignoring unreadable #proctor-config:", err);
      }
    }
    if (window.PROCTOR_CONFIG && typeof window.PROCTOR_CONFIG === "object") {
      cfg = { ...cfg, ...window.PROCTOR_CONFIG };
    }
    return {
      iceServers: Array.isArray(cfg.iceServers) ? cfg.iceServers : [],
      // See withoutAbsSendTime(): off unless the page config turns it back on.
      absSendTime: cfg.absSendTime === true,
      // The server decodes H.264 for about a third of VP8's CPU; "" keeps the browser's order.
      preferCodec: typeof cfg.preferCodec === "string" ? cfg.preferCodec : "H264",
    };
  }

  // A join_url (/#session=<id>&token=<candidate token>) makes this page join that session
  // instead of starting one. The fragment never reaches the server or its logs.
  function readJoinLink() {
    const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const sessionId = params.get("session");
    const token = params.get("token");
    return sessionId ? { sessionId, token: token || null } : null;
  }

  function authHeaders() {
    return state.join && state.join.token ? { Authorization: `Bearer ${state.join.token}` } : {};
  }

  function mark(name) {
    if (state.marks[name] !== undefined) return;
    state.marks[name] = Math.round(performance.now());
    const dt = el("dt", human(name));
    const dd = el("dd", `${state.marks[name]} ms after page load`);
    dd.dataset.mark = name;
    dd.dataset.ms = String(state.marks[name]);
    ui.timings.append(dt, dd);
  }

  // --- status, log, errors --------------------------------------------------------------------
  function setStatus(text) { ui.status.textContent = text; }
  function log(level, text) {
    const li = el("li", `${new Date().toLocaleTimeString()} — ${text}`, level);
    li.dataset.level = level;
    ui.log.prepend(li);
    while (ui.log.children.length > 80) ui.log.lastChild.remove();
  }
  function showError(text) {
    ui.bannerText.textContent = text;
    ui.banner.hidden = false;
    log("error", text);
  }
  function clearError() {
    ui.banner.hidden = true;
    ui.bannerText.textContent = "";
  }
  ui.bannerClose.addEventListener("click", clearError);

  function setPhase(phase) {
    state.phase = phase;
    document.body.dataset.state = phase;
    const labels = { idle: "idle", connecting: "connecting…", live: "live",
                     reconnecting: "reconnecting…", ending: "ending…", ended: "ended" };
    ui.sessionState.textContent = labels[phase] || phase;
    ui.sessionState.className = "badge" + (phase === "live" ? " ok"
      : ["connecting", "reconnecting", "ending"].includes(phase) ? " warn" : "");
    ui.connect.disabled = !["idle", "ended"].includes(phase);
    ui.connect.textContent = phase === "ended" ? "Start New Session" : "Start Session";
    ui.end.disabled = !["live", "reconnecting"].includes(phase);
    ui.job.disabled = !["idle", "ended"].includes(phase);
  }
  function setBadge(node, value, text, tone) {
    node.dataset.state = value;
    node.textContent = text;
    node.className = "badge" + (tone ? ` ${tone}` : "");
  }
  function showPcState(pcState) {
    const tone = pcState === "connected" ? "ok"
      : ["failed", "closed", "disconnected"].includes(pcState) ? "bad"
      : pcState === "connecting" ? "warn" : "";
    setBadge(ui.rtcState, pcState, ["new", "none"].includes(pcState) ? "not connected" : pcState, tone);
  }
  function showDcState(dcState) {
    const tone = dcState === "open" ? "ok" : dcState === "connecting" ? "warn"
      : dcState === "none" ? "" : "bad";
    setBadge(ui.dcState, dcState, dcState === "none" ? "—" : dcState, tone);
  }

  // --- live panel -----------------------------------------------------------------------------
  function showResult(result) {
    liveView.show(result);
    const t = result.timings || {};
    if (Number.isFinite(t.captured_at) && Number.isFinite(t.analysis_ended_at)) {
      const ms = Math.max(0, (t.analysis_ended_at - t.captured_at) * 1000);
      const age = Math.max(0, (t.analysis_started_at - t.captured_at) * 1000);
      ui.latency.textContent = `${Math.round(ms)} ms`;
      ui.latency.title = `frame age at analysis start ${Math.round(age)} ms, analyser ${fmtNum(t.analyser_ms, 0)} ms`;
      ui.latency.dataset.ms = String(Math.round(ms));
      ui.latency.dataset.ageMs = String(Math.round(age));
      ui.latency.dataset.analyserMs = String(Math.round(Number(t.analyser_ms) || 0));
      state.frameAges.push(Math.round(age));
      if (state.frameAges.length > 300) state.frameAges.shift();
    }
  }

  function showLiveMetrics(payload) {
    liveView.showAverages(payload.metrics);
    // Every frames_* counter the server reports (transport-specific ones included).
    const counters = Object.entries(payload)
      .filter(([k, v]) => k.startsWith("frames_") && typeof v === "number")
      .map(([k, v]) => `${k.slice(7).replace(/_/g, " ")} ${v}`);
    if (counters.length) ui.counters.textContent = counters.join(" · ");
    const rtc = payload.rtc;
    if (rtc && typeof rtc === "object") {
      const parts = [];
      if (rtc.width) parts.push(`${rtc.width}×${rtc.height}`);
      if (rtc.fps !== undefined && rtc.fps !== null) parts.push(`${fmtNum(rtc.fps, 0)} fps`);
      if (rtc.codec) parts.push(rtc.codec);
      if (rtc.frame_age_ms_p95 !== undefined && rtc.frame_age_ms_p95 !== null) {
        parts.push(`frame age p95 ${fmtNum(rtc.frame_age_ms_p95, 0)} ms`);
      }
      if (rtc.sampler) parts.push(`${rtc.sampler} sampler`);
      if (parts.length) ui.serverVideo.textContent = parts.join(" · ");
    }
    if (state.resyncAlerts && Array.isArray(payload.active_alerts)) {
      state.resyncAlerts = false;
      alertList.resync(payload.active_alerts);
    }
  }

  function resetSessionView() {
    state.analyses = 0;
    ui.analysed.textContent = "0";
    alertList.clear();
    liveView.reset();
    for (const node of [ui.latency, ui.counters, ui.serverVideo]) node.textContent = "—";
    ui.sessionId.textContent = ui.backend.textContent = "—";
    ui.rtt.textContent = "—";
    reportView.hide();
    state.reconnects = 0;
    ui.reconnects.textContent = "0";
    state.videoLimits = null;
    ui.videoLimits.textContent = "none";
    state.frameAges.length = 0;
  }

  // --- camera ----------------------------------------------------------------------------------
  // One getUserMedia at a time: the preview at load and a Start Session click may overlap.
  let cameraPromise = null;
  function ensureCamera() {
    if (state.track && state.track.readyState === "live") return Promise.resolve();
    if (!cameraPromise) cameraPromise = openCamera().finally(() => { cameraPromise = null; });
    return cameraPromise;
  }
  async function openCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser exposes no camera here (a secure context — https or localhost — is required)");
    }
    ui.overlay.hidden = false;
    ui.overlay.textContent = "Waiting for camera permission…";
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15, max: 30 } },
      audio: false,
    });
    state.stream = stream;
    state.track = stream.getVideoTracks()[0];
    state.track.addEventListener("ended", () => {
      showError("The camera stopped delivering video (unplugged or taken by another application).");
      ui.overlay.hidden = false;
      ui.overlay.textContent = "Camera stopped";
    });
    ui.video.srcObject = stream;
    await ui.video.play().catch(() => {}); // autoplay of a muted preview; the track is what matters
    ui.overlay.hidden = true;
    mark("camera_ready");
  }
  function stopCamera() {
    if (state.stream) for (const t of state.stream.getTracks()) t.stop();
    state.stream = null;
    state.track = null;
    ui.video.srcObject = null;
  }

  // --- signaling ---------------------------------------------------------------------------------
  class OfferError extends Error {
    constructor(status, code, message, retryAfterS) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfterS = retryAfterS;
    }
    describe() {
      const http = this.status ? `HTTP ${this.status} ` : "";
      return `${http}${this.code}: ${this.message}`;
    }
  }

  // STUN/TURN servers (TURN with short-lived credentials) from the server, unless the page
  // config names its own. Without any, the browser offers its host candidates only.
  async function loadIceServers() {
    if (state.config.iceServers.length) return;
    try {
      const res = await fetch(ICE_SERVERS_URL, { headers: authHeaders() });
      if (!res.ok) return;
      const data = await res.json();
      if (Array.isArray(data.ice_servers) && data.ice_servers.length) {
        state.config.iceServers = data.ice_servers;
        log("info", `using the server's ${data.ice_servers.length} ICE server(s)`);
      }
    } catch (err) {
      log("warn", `could not load ICE servers (${errText(err)}); host candidates only`);
    }
  }

  async function postOffer(body) {
    let res;
    try {
      res = await fetch(OFFER_URL, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
      });
    } catch (err) {
      throw new OfferError(0, "network_error", `cannot reach the server (${errText(err)})`, null);
    }
    let data = null;
    try { data = await res.json(); } catch { /* handled below */ }
    if (!res.ok) {
      const e = (data && data.error) || {};
      const retry = Number(res.headers.get("Retry-After"));
      throw new OfferError(res.status, e.code || `http_${res.status}`,
        e.message || res.statusText || "request failed", Number.isFinite(retry) && retry > 0 ? retry : null);
    }
    if (!data || data.type !== "answer" || typeof data.sdp !== "string" || !data.session_id) {
      throw new OfferError(res.status, "bad_answer", "the server's reply holds no SDP answer and session id", null);
    }
    return data;
  }

  function waitIceGathering(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (complete) => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve(complete);
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(true); };
      const timer = setTimeout(() => done(false), ICE_GATHER_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function waitOpen(pc, dc) {
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        dc.removeEventListener("open", onOpen);
        pc.removeEventListener("connectionstatechange", onState);
      };
      const onOpen = () => { cleanup(); resolve(); };
      const onState = () => {
        if (["failed", "closed"].includes(pc.connectionState)) {
          cleanup();
          reject(new Error(`the media connection ${pc.connectionState} (ICE ${pc.iceConnectionState})`));
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`no connection after ${OPEN_TIMEOUT_MS / 1000} s (ICE ${pc.iceConnectionState}); `
          + "a firewall may block UDP — a TURN server in the page config may help"));
      }, OPEN_TIMEOUT_MS);
      if (dc.readyState === "open") onOpen();
      dc.addEventListener("open", onOpen);
      pc.addEventListener("connectionstatechange", onState);
    });
  }

  function preferCodec(transceiver) {
    const want = state.config.preferCodec.toLowerCase();
    if (!want || !transceiver.setCodecPreferences || !window.RTCRtpSender?.getCapabilities) return;
    const caps = RTCRtpSender.getCapabilities("video");
    if (!caps || !caps.codecs.some((c) => c.mimeType.toLowerCase() === `video/${want}`)) return;
    const rank = (c) => {
      if (c.mimeType.toLowerCase() !== `video/${want}`) return 2;
      return /packetization-mode=1/.test(c.sdpFmtpLine || "") ? 0 : 1;
    };
    try {
      transceiver.setCodecPreferences([...caps.codecs].sort((a, b) => rank(a) - rank(b)));
    } catch (err) {
      console.warn("codec preference not applied:", err);
    }
  }

  // aiortc answers abs-send-time with REMB feedback from its own receive-rate estimator,
  // which on a still scene falls to Chromium's 30 kbps floor; the next change of scene
  // (the candidate coming back) then needs seconds to get through. Without abs-send-time no
  // REMB is sent and the browser's loss-based control keeps the rate up. Measured here:
  // first frame after a blank→face change 2.6–4.5 s late with it, 0.07–0.5 s without.
  const ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";
  function withoutAbsSendTime(transceiver) {
    if (state.config.absSendTime || !transceiver.setHeaderExtensionsToNegotiate) return false;
    try {
      transceiver.setHeaderExtensionsToNegotiate(transceiver.getHeaderExtensionsToNegotiate()
        .map((e) => (e.uri === ABS_SEND_TIME ? { ...e, direction: "stopped" } : e)));
      return true;
    } catch (err) {
      console.warn("header extensions not changed:", err);
      return false;
    }
  }
  function stripAbsSendTime(sdp) {
    return sdp.split("\r\n").filter((line) => !(line.startsWith("a=extmap:") && line.includes(ABS_SEND_TIME)))
      .join("\r\n");
  }

  // One peer connection with its data channel, negotiated and open. `sessionId` resumes an
  // existing session; otherwise `jobData` starts a new one.
  async function openPeer({ sessionId, jobData }) {
    teardownPeer();
    const gen = ++state.gen;
    const current = () => gen === state.gen;
    const pc = new RTCPeerConnection({ iceServers: state.config.iceServers, bundlePolicy: "max-bundle" });
    state.pc = pc;
    // Created before the offer so the SCTP association is negotiated with it.
    const dc = pc.createDataChannel("proctoring", { ordered: true });
    state.dc = dc;
    showDcState("connecting");
    const transceiver = pc.addTransceiver(state.track, { direction: "sendonly", streams: [state.stream] });
    state.sender = transceiver.sender;
    preferCodec(transceiver);
    const extensionsSet = withoutAbsSendTime(transceiver);

    pc.addEventListener("connectionstatechange", () => {
      if (!current()) return;
      onPcState(pc.connectionState);
    });
    dc.addEventListener("open", () => { if (current()) showDcState("open"); });
    dc.addEventListener("close", () => {
      if (!current()) return;
      showDcState("closed");
      log(state.phase === "live" ? "warn" : "info", `the data channel closed (${state.phase})`);
      if (state.phase === "live") scheduleReconnect("the data channel closed");
      else if (state.phase === "ending") fallbackReport("the data channel closed before the report arrived");
    });
    dc.addEventListener("message", (ev) => { if (current()) onMessage(ev.data); });
    dc.addEventListener("error", (ev) => {
      if (current() && state.phase === "live") log("warn", `data channel error: ${errText(ev.error || ev)}`);
    });

    const offer = await pc.createOffer();
    if (!extensionsSet && !state.config.absSendTime && offer.sdp.includes(ABS_SEND_TIME)) {
      // Browsers without setHeaderExtensionsToNegotiate: drop the line from the offer.
      try {
        await pc.setLocalDescription({ type: "offer", sdp: stripAbsSendTime(offer.sdp) });
      } catch {
        await pc.setLocalDescription(offer);
      }
    } else {
      await pc.setLocalDescription(offer);
    }
    if (!(await waitIceGathering(pc))) {
      log("warn", `ICE gathering incomplete after ${ICE_GATHER_TIMEOUT_MS / 1000} s; offering the candidates found so far`);
    }
    if (!current()) throw new Error("superseded");
    mark("ice_gathered");
    const body = { sdp: pc.localDescription.sdp, type: "offer" };
    if (sessionId) body.session_id = sessionId;
    else body.job_data = jobData;
    const answer = await postOffer(body);
    if (!current()) throw new Error("superseded");
    mark("answer_received");
    if (Array.isArray(answer.ice_servers) && answer.ice_servers.length && !state.config.iceServers.length) {
      // The server told us which STUN/TURN servers to use: use them for reconnects.
      state.config.iceServers = answer.ice_servers;
      log("info", `using the server's ${answer.ice_servers.length} ICE server(s) for reconnects`);
    }
    state.sessionId = answer.session_id;
    ui.sessionId.textContent = answer.session_id;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    await waitOpen(pc, dc);
    if (!current()) throw new Error("superseded");
    mark("channel_open");
    if (state.videoLimits) await applyVideoLimits(state.videoLimits, false);
  }

  function teardownPeer() {
    clearTimeout(state.disconnectTimer);
    state.disconnectTimer = null;
    for (const t of state.timers) clearInterval(t);
    state.timers = [];
    state.gen++; // silence events from the connection being closed
    if (state.dc) { try { state.dc.close(); } catch { /* already closed */ } }
    if (state.pc) { try { state.pc.close(); } catch { /* already closed */ } }
    state.pc = state.dc = state.sender = null;
    showDcState("none");
    showPcState("none");
  }

  function startLiveTimers() {
    for (const t of state.timers) clearInterval(t);
    state.timers = [
      setInterval(() => send({ type: "get_live_metrics" }), LIVE_METRICS_EVERY_MS),
      setInterval(() => send({ type: "ping", t: performance.now() }), PING_EVERY_MS),
      setInterval(updateSendStats, STATS_EVERY_MS),
    ];
    send({ type: "get_live_metrics" });
    send({ type: "ping", t: performance.now() });
  }

  function send(message) {
    const dc = state.dc;
    if (!dc || dc.readyState !== "open") return false;
    try {
      dc.send(JSON.stringify(message));
      return true;
    } catch (err) {
      log("warn", `could not send ${message.type}: ${errText(err)}`);
      return false;
    }
  }

  function onPcState(pcState) {
    showPcState(pcState);
    if (pcState === "connected") {
      mark("connected");
      clearTimeout(state.disconnectTimer);
      state.disconnectTimer = null;
    } else if (pcState === "disconnected" && state.phase === "live") {
      clearTimeout(state.disconnectTimer);
      state.disconnectTimer = setTimeout(() => {
        if (state.pc && state.pc.connectionState !== "connected") scheduleReconnect("the connection was lost");
      }, DISCONNECTED_GRACE_MS);
    } else if (["failed", "closed"].includes(pcState) && state.phase === "live") {
      scheduleReconnect(`the connection ${pcState}`);
    }
  }

  // --- connect, reconnect, end ---------------------------------------------------------------
  async function connect() {
    if (!["idle", "ended"].includes(state.phase)) return;
    clearError();
    resetSessionView();
    state.sessionId = null;
    setPhase("connecting");
    mark("connect_clicked");
    try {
      setStatus("Opening the camera…");
      await ensureCamera();
    } catch (err) {
      ui.overlay.hidden = false;
      ui.overlay.textContent = `Camera unavailable: ${errText(err)}`;
      showError(`Camera: ${errText(err)}`);
      setStatus("Allow the camera and press Start Session again.");
      setPhase("idle");
      return;
    }
    const jobData = { jobTitle: ui.job.value.trim() || "Candidate" };
    await loadIceServers();
    for (let attempt = 0; ; attempt++) {
      try {
        setStatus("Connecting: gathering network candidates and sending the offer…");
        // Joining the operator's session (join_url), or starting one (development mode).
        await openPeer(state.join ? { sessionId: state.join.sessionId } : { jobData });
        break;
      } catch (err) {
        teardownPeer();
        if (err instanceof OfferError && err.status === 503 && attempt < OVERLOAD_RETRIES && state.phase === "connecting") {
          const wait = Math.min(30, err.retryAfterS || 5);
          log("warn", `${err.describe()} — retrying in ${wait} s`);
          setStatus(`The server is busy; retrying in ${wait} s…`);
          await sleep(wait * 1000);
          if (state.phase !== "connecting") return;
          continue;
        }
        showError(`Could not connect — ${err instanceof OfferError ? err.describe() : errText(err)}`);
        setStatus("Not connected. Fix the problem above and press Start Session again.");
        state.sessionId = null;
        setPhase("idle");
        return;
      }
    }
    goLive();
  }

  function goLive() {
    setPhase("live");
    setStatus("Live: the server is analysing the camera.");
    startLiveTimers();
  }

  let reconnecting = false;
  async function scheduleReconnect(reason) {
    if (reconnecting || state.phase !== "live" || !state.sessionId) return;
    reconnecting = true;
    setPhase("reconnecting");
    log("warn", `${reason}; reconnecting to session ${state.sessionId}`);
    teardownPeer();
    let delay = 500;
    try {
      while (state.phase === "reconnecting") {
        setStatus(`Connection lost; reconnecting to the same session…`);
        try {
          await openPeer({ sessionId: state.sessionId });
        } catch (err) {
          teardownPeer();
          if (state.phase !== "reconnecting") return;
          if (err instanceof OfferError && (err.status === 404 || err.status === 409)) {
            showError(`The session could not be resumed — ${err.describe()}`);
            if (err.status === 409) await fetchReport("the session ended while disconnected");
            else { setPhase("ended"); setStatus("The session is gone."); }
            return;
          }
          const wait = err instanceof OfferError && err.retryAfterS ? err.retryAfterS * 1000 : delay;
          log("warn", `reconnect failed (${err instanceof OfferError ? err.describe() : errText(err)}); next try in ${Math.round(wait / 1000)} s`);
          await sleep(wait);
          delay = Math.min(RECONNECT_MAX_DELAY_MS, delay * 2);
          continue;
        }
        if (state.phase !== "reconnecting") { teardownPeer(); return; }
        state.reconnects++;
        ui.reconnects.textContent = String(state.reconnects);
        state.resyncAlerts = true;
        log("info", "reconnected; the session continues");
        goLive();
        return;
      }
    } finally {
      reconnecting = false;
    }
  }

  async function endSession() {
    if (!["live", "reconnecting"].includes(state.phase)) return;
    setPhase("ending");
    setStatus("Ending the session and writing the report…");
    if (send({ type: "end_session" })) {
      clearTimeout(state.endTimer);
      state.endTimer = setTimeout(() => fallbackReport("no report on the data channel in time"), END_TIMEOUT_MS);
      return;
    }
    // No channel (we are between connections): end it over REST instead.
    teardownPeer();
    await restReport("POST", `/api/sessions/${encodeURIComponent(state.sessionId)}/end`);
  }

  let fallbackStarted = false;
  async function fallbackReport(reason) {
    if (state.phase !== "ending" || fallbackStarted) return;
    fallbackStarted = true;
    try {
      await sleep(1500); // the report may still be on its way on the channel
      if (state.phase !== "ending") return;
      log("warn", `${reason}; asking for the report over HTTP`);
      teardownPeer();
      await fetchReport(reason);
    } finally {
      fallbackStarted = false;
    }
  }

  async function fetchReport(reason) {
    setPhase("ending");
    setStatus(`${human(reason)}; fetching the report…`);
    await restReport("GET", `/api/sessions/${encodeURIComponent(state.sessionId)}/report`);
  }

  async function restReport(method, url) {
    try {
      const res = await fetch(url, { method, headers: authHeaders() });
      const data = await res.json().catch(() => null);
      if (res.status === 403 && state.join) {
        finish(null); // a candidate may not read reports: the session is over all the same
        return;
      }
      if (!res.ok) {
        const e = (data && data.error) || {};
        throw new Error(`HTTP ${res.status} ${e.code || ""}: ${e.message || res.statusText}`);
      }
      finish(data);
    } catch (err) {
      showError(`The report could not be fetched — ${errText(err)}`);
      setPhase("ended");
      setStatus("Session over; the report is not available here.");
    }
  }

  function finish(report) {
    clearTimeout(state.endTimer);
    teardownPeer();
    setPhase("ended");
    alertList.closeAll(report && report.alerts);
    // The server may send the session's state only ({"status": "ended"}): show what came.
    setStatus(reportView.render(report) ? "Session ended. The report is below." : "Session ended.");
  }

  // --- data channel messages ---------------------------------------------------------------------
  function onMessage(raw) {
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      log("warn", `unreadable message on the data channel: ${String(raw).slice(0, 80)}`);
      return;
    }
    if (!msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "session_started":
        mark("session_started");
        if (msg.session_id) { state.sessionId = msg.session_id; ui.sessionId.textContent = msg.session_id; }
        ui.backend.textContent = msg.backend || "—";
        if (state.phase === "live") setStatus(`Live since ${fmtTime(msg.started_at)}: the server is analysing the camera.`);
        break;
      case "frame_analysis":
        state.analyses++;
        ui.analysed.textContent = String(state.analyses);
        if (state.analyses === 1) mark("first_analysis");
        if (!msg.result) return; // state only (CANDIDATE_VIEW=status)
        showResult(msg.result);
        for (const a of msg.result.alerts || []) alertList.show(a);
        break;
      case "alerts":
        for (const a of msg.alerts || []) alertList.show(a);
        break;
      case "live_metrics":
        showLiveMetrics(msg);
        break;
      case "session_ended":
        mark("report_received");
        finish(msg.report || null);
        break;
      case "adjust_video":
        applyVideoLimits(msg, true);
        break;
      case "pong":
        if (Number.isFinite(msg.t)) ui.rtt.textContent = `${Math.max(0, Math.round(performance.now() - msg.t))} ms`;
        break;
      case "error":
        onServerError(msg);
        break;
      default:
        log("warn", `unknown message type ${JSON.stringify(msg.type)}`);
    }
  }

  function onServerError(msg) {
    const text = `${msg.code || "error"}: ${msg.message || "(no message)"}`;
    showError(`Server error — ${text}`);
    if (state.phase === "ending" && /ended|not_found/.test(msg.code || "")) {
      fallbackReport(`end_session failed (${msg.code})`);
    }
  }

  // --- adaptive video (the server asks when it cannot keep up) -------------------------------------
  async function applyVideoLimits(msg, announce) {
    state.videoLimits = { max_width: msg.max_width ?? null, max_fps: msg.max_fps ?? null, reason: msg.reason ?? "" };
    const parts = [];
    if (state.videoLimits.max_width) parts.push(`≤ ${state.videoLimits.max_width} px wide`);
    if (state.videoLimits.max_fps) parts.push(`≤ ${state.videoLimits.max_fps} fps`);
    ui.videoLimits.textContent = parts.length
      ? parts.join(", ") + (state.videoLimits.reason ? ` (${state.videoLimits.reason})` : "") : "none";
    if (announce) log("warn", `server asked for ${parts.join(", ") || "no limits"}${state.videoLimits.reason ? ` — ${state.videoLimits.reason}` : ""}`);
    const sender = state.sender;
    if (!sender) return;
    try {
      const params = sender.getParameters();
      if (!params.encodings || !params.encodings.length) params.encodings = [{}];
      const width = (state.track && state.track.getSettings().width) || 640;
      for (const enc of params.encodings) {
        enc.scaleResolutionDownBy = state.videoLimits.max_width
          ? Math.max(1, width / state.videoLimits.max_width) : 1;
        if (state.videoLimits.max_fps) enc.maxFramerate = Number(state.videoLimits.max_fps);
        else delete enc.maxFramerate;
      }
      await sender.setParameters(params);
    } catch (err) {
      log("error", `could not apply the video limits: ${errText(err)}`);
    }
  }

  async function updateSendStats() {
    const sender = state.sender;
    if (!sender) return;
    try {
      const stats = await sender.getStats();
      let out = null;
      const byId = new Map();
      stats.forEach((r) => { byId.set(r.id, r); if (r.type === "outbound-rtp" && r.kind === "video") out = r; });
      if (!out) return;
      const codec = out.codecId && byId.get(out.codecId);
      const parts = [];
      if (out.frameWidth) parts.push(`${out.frameWidth}×${out.frameHeight}`);
      if (out.framesPerSecond !== undefined) parts.push(`${fmtNum(out.framesPerSecond, 0)} fps`);
      if (codec) parts.push(codec.mimeType.replace("video/", ""));
      if (out.qualityLimitationReason && out.qualityLimitationReason !== "none") {
        parts.push(`limited by ${out.qualityLimitationReason}`);
      }
      ui.sendStats.textContent = parts.join(" · ") || "—";
      ui.sendStats.dataset.codec = codec ? codec.mimeType : "";
    } catch {
      /* a closing connection: the next tick or the next peer will report */
    }
  }

  // --- wiring ----------------------------------------------------------------------------------
  if (state.join) {
    // The operator set the job data when creating the session.
    ui.job.closest("label").hidden = true;
    ui.connect.textContent = "Join session";
  }
  ui.connect.addEventListener("click", connect);
  ui.end.addEventListener("click", endSession);
  window.addEventListener("pagehide", () => {
    // Closing the peer lets the server start its reconnect grace period at once.
    teardownPeer();
    stopCamera();
  });

  setPhase("idle");
  showPcState("new");
  showDcState("none");
  setStatus("Opening the camera for the preview…");
  ensureCamera()
    .then(() => setStatus("Camera ready. Enter the job title and press Start Session."))
    .catch((err) => {
      ui.overlay.hidden = false;
      ui.overlay.textContent = `Camera unavailable: ${errText(err)}`;
      setStatus("Allow the camera, then press Start Session.");
      log("warn", `camera: ${errText(err)}`);
    });
})();
