"""Settings, read from the environment or `.env` (pydantic-settings).

Every threshold and rate the product contract names is a setting here, so operators tune
them without code. Names are the environment variables, case-insensitive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["auto", "rekognition", "local"]


class ConfigError(ValueError):
    """A setting the server refuses to start with; the message names the setting (never
    a secret's value)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- server ---------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 5001
    secret_key: str = Field(
        default="",
        description="Accepted for the seed's compatibility; unused (no cookies or signed tokens).",
    )
    api_token: str = Field(
        default="",
        description="Operator token; when set the server runs in secured mode (roles).",
    )
    # Named operator tokens, "name:token,name:token" (beside API_TOKEN, whose holder is
    # "operator"): reviews, re-scorings and erasures are audited under the name.
    api_tokens: str = Field(
        default="",
        description="Named operator tokens (name:token,...); any set: secured mode.",
    )
    # What a candidate token's holder receives back: the brief's payloads or state only.
    # Empty: "status" in secured mode, "results" in development mode.
    candidate_view: Literal["", "results", "status"] = ""
    public_url: str = ""  # e.g. https://proctor.example.com: host of join URLs, allowed Host
    allow_insecure: bool = False  # let `proctor serve` bind a non-loopback host with no token
    cors_origins: list[str] = Field(default_factory=list)  # empty: same origin only
    # Peers (IPs or CIDRs) whose X-Forwarded-For/-Host/-Proto headers are believed.
    trusted_proxies: list[str] = Field(default_factory=list)
    candidate_tokens_max: int = 10_000  # remembered candidate tokens (oldest forgotten)
    log_level: str = "INFO"
    public_dir: Path = Path(__file__).resolve().parent.parent / "public"
    client_example: Path = Path(__file__).resolve().parent.parent / "client_example.html"
    node_modules_dir: Path = Path(__file__).resolve().parent.parent / "node_modules"

    # --- storage ------------------------------------------------------------------------
    # Empty: SQLite at DATABASE_PATH. sqlite:///path: SQLite there. postgresql://user:pw@
    # host:port/db (or postgres://): PostgreSQL, which several nodes can share.
    database_url: str = ""
    database_path: Path = Path("data/proctor.sqlite3")
    database_pool_min_size: int = 1  # PostgreSQL connections kept open per node …
    database_pool_max_size: int = 10  # … and at most
    database_timeout_s: float = 10.0  # PostgreSQL: connecting, and each statement, give up after
    store_queue_size: int = 10_000  # writes waiting for the writer thread; producers wait beyond
    store_write_attempts: int = 3  # a failed write batch is tried this many times in all …
    store_retry_backoff_s: float = 0.1  # … this long before the 2nd, twice it before the 3rd
    store_retry_window_s: float = 30.0  # … and for at least this long (a database restart)
    store_retry_max_backoff_s: float = 2.0  # the wait between attempts never exceeds this
    store_flush_timeout_s: float = 10.0  # flush() raises instead of waiting longer than this

    # --- more than one machine (README "Running a cluster") -------------------------------
    # redis://[:password@]host:port/db. Set: this node joins a cluster. Socket.IO events
    # travel between nodes over Redis, the node holds a lease on its sessions in the store,
    # requests for a session another node owns are forwarded to it, the Rekognition budget
    # and spend caps are shared, recorded-video jobs go on a Redis queue. The store must
    # then be shared by every node. Empty: one node, everything in process.
    redis_url: str = ""
    redis_timeout_s: float = 0.5  # a Redis command (or connect) gives up after this
    redis_ping_interval_s: float = 1.0  # the link is checked this often (down → up noticed)
    # Nodes expected in the cluster: while Redis is down each node's budget is
    # ANALYSER_CALLS_PER_S divided by the larger of this and the nodes last seen, so the
    # nodes together stay under the account's quota.
    cluster_size_hint: int = 1
    node_id: str = ""  # this node's name in the cluster; empty: host name + ":" + port
    # How the other nodes reach this one (http://10.0.0.5:5001); empty: http://HOST:PORT,
    # with the host name when HOST is 0.0.0.0 / ::.
    node_address: str = ""
    # A node renews its leases (on its sessions and its running video jobs) every third of
    # this; a node silent for this long is dead: another node marks its live sessions
    # interrupted (end_reason "node_lost") and its running jobs `interrupted`.
    node_lease_s: float = 15.0
    # Shared by every node: signs node-to-node requests (HMAC), so only a peer may pass
    # on a client's address. Required with REDIS_URL.
    cluster_secret: str = ""
    cluster_connect_timeout_s: float = 2.0  # a forwarded request's connection to its owner
    fanout_queue_size: int = 10_000  # Socket.IO events waiting for Redis; dropped beyond
    # --- review, audit and privacy ----------------------------------------------------------
    # off: no emotion or facial expression is inferred or stored (EU AI Act Art. 5(1)(f));
    # engagement then comes from eye contact alone.
    emotion_analysis: bool = True
    # Ended/interrupted sessions (frames, alerts, evidence, reviews, report) older than this
    # are erased by a periodic sweep; 0 or empty: kept forever.
    retention_days: float = 0.0
    retention_sweep_interval_s: float = 3600.0
    retention_batch_sessions: int = 100  # sessions erased per store batch by the sweep
    # Webhooks: JSON POSTs signed with HMAC-SHA256 of WEBHOOK_SECRET (README "Webhooks").
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_events: list[str] = Field(default_factory=lambda: ["alert", "session_ended"])
    webhook_alert_severities: list[str] = Field(default_factory=lambda: ["critical"])
    webhook_queue_size: int = 1000  # deliveries waiting; beyond it new ones are dropped
    webhook_timeout_s: float = 5.0  # per attempt
    webhook_max_attempts: int = 6  # attempts in all for one delivery
    webhook_retry_backoff_s: float = 1.0  # before the 2nd attempt; doubles, with jitter …
    webhook_retry_max_backoff_s: float = 60.0  # … up to this
    webhook_shutdown_drain_s: float = 2.0  # a stop waits this long for queued deliveries

    # --- sessions -----------------------------------------------------------------------
    max_live_sessions: int = 200
    session_idle_timeout_s: float = 300.0
    idle_sweep_interval_s: float = 5.0
    internal_errors_max: int = 5  # this many internal errors in one session …
    internal_errors_window_s: float = 60.0  # … within this window end it ("internal_error")
    shutdown_timeout_s: float = 10.0  # a graceful stop gives up waiting for sessions after this
    max_frame_bytes: int = 5 * 1024 * 1024  # Rekognition's image limit
    max_frame_dimension: int = 1920  # larger frames are downscaled, never refused
    max_frame_pixels: int = 40_000_000  # above it (from the header) refused, never decoded
    job_data_max_bytes: int = 4096  # job_data as compact JSON
    start_body_max_bytes: int = 8 * 1024  # POST /api/sessions/start
    offer_body_max_bytes: int = 32 * 1024  # POST /api/rtc/offer (SDP + job_data)
    timestamp_max_skew_s: float = 86_400.0  # a frame's timestamp within this of our clock
    offload_bytes: int = 256 * 1024  # pushed frames larger than this are parsed in a thread
    socketio_events_per_s: float = 30.0  # per connection, sustained
    socketio_event_burst: int = 60  # per connection, burst
    socketio_errors_per_s: float = 5.0  # rate-limit error events sent back per connection
    # Packets waiting for one Socket.IO client; past it its frame_analysis / live_metrics are
    # dropped, at twice it the client is disconnected (a stalled reader holds no memory).
    socketio_send_queue_max: int = 256
    # The console: live_metrics pushed to each live session's watch_session watchers.
    watch_metrics_interval_s: float = 2.0
    jpeg_quality: int = 85

    # --- spend caps (counted in the store: a restart does not reset them) ---------------------
    # New sessions per client address (behind TRUSTED_PROXIES: the forwarded one) in any
    # 60 s, over every way a session starts; beyond it 429 `rate_limited`. 0 = off.
    session_starts_per_minute: int = 30
    # Billed Rekognition calls per UTC day, server-wide; once reached, live sessions go on
    # with the offline backend and new ones start on it. 0 = no cap.
    rekognition_daily_calls: int = 0
    # LLM tokens (prompt + completion) per UTC day; once reached, reports get the
    # rule-based narrative (llm.error "daily_token_cap"). 0 = no cap.
    llm_daily_tokens: int = 0

    # --- analyser -----------------------------------------------------------------------
    analyser_backend: BackendName = "auto"
    analyser_max_concurrency: int = 16  # analyser calls in flight server-wide
    analyser_timeout_s: float = 10.0
    labels_interval_s: float = 5.0  # DetectLabels at most this often per session
    text_interval_s: float = 10.0  # DetectText at most this often per session

    # --- AWS / Rekognition ----------------------------------------------------------------
    aws_access_key_id: str = ""
    aws_secret_access_key: str = ""
    aws_session_token: str = ""
    aws_region: str = "us-east-1"
    aws_profile: str = ""
    rekognition_max_attempts: int = 3  # total attempts, botocore adaptive retry mode
    rekognition_connect_timeout_s: float = 2.0
    rekognition_read_timeout_s: float = 3.0
    rekognition_min_face_confidence: float = 50.0
    rekognition_min_label_confidence: float = 60.0

    # --- scoring ----------------------------------------------------------------------------
    posture_window_frames: int = 10
    positive_emotions: list[str] = Field(default_factory=lambda: ["HAPPY", "CALM", "SURPRISED"])

    # --- alert rules (defaults are the product contract's) -----------------------------------
    # "N frames" is per analysed frame on push transports (REST, Socket.IO); on WebRTC and
    # recorded video a rule of N > 1 frames must hold over (N - 1) × this many seconds of
    # capture time, seen in at least two analysed frames.
    rule_frame_interval_s: float = 1.0
    no_face_frames: int = 3
    looking_away_yaw_deg: float = 30.0
    looking_away_pitch_deg: float = 25.0
    looking_away_frames: int = 5
    low_engagement_threshold: float = 40.0
    low_engagement_frames: int = 10
    multiple_faces_frames: int = 1
    suspicious_object_frames: int = 1
    text_detected_frames: int = 1
    # Too dark / too bright / too blurred to judge for this long (capture time, on every
    # transport) raises video_unusable (category "technical").
    unusable_video_s: float = 10.0
    suspicious_object_confidence: float = 70.0
    # Flag whenever seen (above the confidence).
    suspicious_labels: list[str] = Field(
        default_factory=lambda: [
            "Mobile Phone",
            "Cell Phone",
            "Phone",
            "Book",
            "Paper",
            "Document",
            "Notebook",
            "Tablet Computer",
            "Headphones",
        ]
    )
    # The candidate's own equipment: flag only as a second device, two or more boxed
    # instances in one frame.
    second_device_labels: list[str] = Field(
        default_factory=lambda: ["Computer", "Electronics", "Laptop", "Monitor", "Screen"]
    )
    text_min_confidence: float = 80.0
    text_min_chars: int = 8  # "significant" text: this many characters over confident lines
    # Rekognition's EyeDirection counts in eye_contact from this confidence (0-100) up.
    eye_direction_min_confidence: float = 50.0

    # --- alert evidence (operator only) ----------------------------------------------------
    # "snapshot": each alert onset keeps a JPEG of the frame that raised it, boxes drawn;
    # "none": no image is rendered or stored.
    evidence: Literal["snapshot", "none"] = "snapshot"
    evidence_max_bytes: int = Field(default=80_000, ge=8_000)  # quality, then size, shrink
    evidence_max_width: int = Field(default=640, ge=160, le=640)
    evidence_queue_size: int = Field(default=8, ge=1)  # waiting to render; beyond: dropped
    evidence_max_per_session: int = Field(default=200, ge=0)  # a flapping rule cannot fill a disk
    rescore_max_concurrent: int = Field(default=2, ge=1)  # re-scoring replays at once; more wait

    # --- LLM narrative -------------------------------------------------------------------------
    openai_api_key: str = ""
    anthropic_api_key: str = ""
    llm_provider: Literal["auto", "openai", "anthropic", "none"] = "auto"
    openai_model: str = "gpt-4o-mini"
    anthropic_model: str = "claude-haiku-4-5"
    llm_timeout_s: float = 30.0
    llm_max_tokens: int = 800

    # --- WebRTC and sampler ---------------------------------------------------------------
    # ICE: STUN/TURN servers as RTCIceServer dicts, e.g.
    # [{"urls": ["turn:turn.example.com:3478"], "username": "u", "credential": "p"}].
    # None by default: aiortc would otherwise use a public Google STUN server.
    rtc_ice_servers: list[dict[str, Any]] = Field(default_factory=list)
    # TURN for browsers behind strict NATs: pages get these URLs with ephemeral
    # credentials (TURN REST API: HMAC-SHA1 of TURN_SECRET, coturn's use-auth-secret),
    # valid TURN_TTL_S seconds; the secret itself never leaves the server.
    turn_urls: list[str] = Field(default_factory=list)
    turn_secret: str = ""
    turn_ttl_s: int = 3600
    # Host candidate addresses to offer (aioice's own default, used when empty, is every
    # interface address except 127.0.0.1). Tests pin ["127.0.0.1"].
    rtc_host_addresses: list[str] = Field(default_factory=list)
    # Remote ICE candidates are checked only when public, or loopback / link-local /
    # private when the server has such an address itself; these addresses or networks
    # (e.g. "10.0.0.0/8") are admitted as well.
    rtc_remote_candidate_addresses: list[str] = Field(default_factory=list)
    rtc_prefer_codecs: list[str] = Field(default_factory=lambda: ["H264", "VP8"])
    rtc_max_peers: int = 50  # concurrent WebRTC peers; offers beyond get 429
    rtc_reconnect_grace_s: float = 30.0  # a lost peer's session waits this long for a reconnect
    rtc_media_timeout_s: float = 10.0  # no video frame for this long counts as a lost peer
    rtc_metrics_interval_s: float = 3.0  # live_metrics pushed on the data channel this often
    rtc_channel_high_water_bytes: int = 256 * 1024  # above it metric updates are coalesced
    rtc_channel_open_timeout_s: float = 5.0  # analysis waits this long for the data channel
    rtc_overload_frame_lag_ms: float = 250.0  # median frame lag over peers that means "behind"
    rtc_overload_loop_lag_ms: float = 100.0  # event-loop lag that means "behind"
    rtc_overload_cooldown_s: float = 10.0  # overload state lasts this long after the last sign
    rtc_overload_retry_after_s: int = 10  # Retry-After on the 503 for new offers
    rtc_adjust_max_width: int = 480  # first adjust_video asks for at most this width …
    rtc_adjust_max_fps: int = 10  # … and this frame rate
    sampler_policy: Literal["adaptive", "fixed"] = "adaptive"
    sampler_fixed_interval_s: float = 1.0  # the "fixed" policy's interval
    # Stable scene, no alert pending or active, on a billed (cloud) backend.
    sampler_idle_interval_s: float = 12.0
    # The same on the offline backend while its workers have headroom (backs off towards
    # sampler_idle_interval_s as they fill up or under WebRTC overload).
    sampler_local_idle_interval_s: float = 1.0
    # An alert rule's streak has started (plus one sample exactly when its dwell is over).
    sampler_pending_interval_s: float = 0.5
    # ... while the pending rule's dwell ends within this many seconds.
    sampler_pending_horizon_s: float = 2.0
    sampler_active_interval_s: float = 1.0  # an alert episode is open
    sampler_min_interval_s: float = 0.1  # floor between two samples of a session
    sampler_probe_interval_s: float = 0.1  # change score computed at most this often
    sampler_change_min_interval_s: float = 0.5  # scene-change samples at most this often
    sampler_change_threshold: float = 0.10  # share of 64×48 thumbnail cells that changed
    sampler_change_object_threshold: float = 0.008  # … or one compact region this large
    sampler_change_cell_delta: int = 16  # grey levels for a cell to count as changed
    sampler_scene_checks_interval_s: float = (
        2.0  # scene changes force labels/text at most this often
    )
    # On a sampled stream scene changes force labels and text; these periodic checks are
    # the safety net for a scene that did not change.
    sampler_labels_interval_s: float = 30.0
    sampler_text_interval_s: float = 30.0
    # Server-wide billed API calls per second (DetectFaces + DetectLabels + DetectText),
    # shared by every session of every transport, live before recorded; cloud backends
    # only (the offline backend is bounded by its worker pool). 0 = off.
    analyser_calls_per_s: float = 25.0

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        from server.session.database import database_kind

        database_kind(value)  # refuses an unknown scheme at start, with what is accepted
        return value.strip()

    @field_validator("retention_days", mode="before")
    @classmethod
    def _empty_is_forever(cls, value: Any) -> Any:
        return 0.0 if isinstance(value, str) and not value.strip() else value

    @property
    def clustered(self) -> bool:
        return bool(self.redis_url)

    @property
    def secured(self) -> bool:
        """An operator token is configured (API_TOKEN or API_TOKENS): roles apply."""
        return bool(self.api_token or self.api_tokens.strip())

    @property
    def resolved_candidate_view(self) -> Literal["results", "status"]:
        if self.candidate_view:
            return self.candidate_view
        return "status" if self.secured else "results"

    # --- recorded videos --------------------------------------------------------------------
    video_jobs: int = 2  # recorded videos analysed at once; more wait in the queue
    video_queue_max: int = 20  # queued + running jobs; beyond it POST /api/videos gets 429
    video_max_bytes: int = 2 * 1024**3  # size cap for a download or an upload
    video_max_duration_s: float = 4 * 3600.0  # longer videos are refused as too large
    video_fetch_timeout_s: float = 900.0  # a whole download must finish within this
    video_url_allow: list[str] = Field(
        default_factory=list,
        description="Hosts, addresses or CIDR networks a video URL may use although the SSRF "
        'rules refuse them (loopback, private, link-local, metadata), e.g. ["10.1.2.0/24"].',
    )
    video_work_dir: Path = Path("data/videos")  # downloads and uploads while their job runs
    video_interval_default_s: float = 2.0
    video_interval_min_s: float = 0.1
    video_interval_max_s: float = 600.0
    video_seek_min_gap_s: float = 4.0  # seek to the keyframe before a sample this far ahead
    video_progress_save_s: float = 1.0  # a running job's progress is persisted this often

    @property
    def has_aws_credentials(self) -> bool:
        return bool(self.aws_access_key_id and self.aws_secret_access_key) or bool(self.aws_profile)

    @property
    def resolved_backend(self) -> Literal["rekognition", "local"]:
        if self.analyser_backend == "auto":
            return "rekognition" if self.has_aws_credentials else "local"
        return self.analyser_backend
