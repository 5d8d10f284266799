"""Settings: typed structs, where they come from, and how a bad one is reported.

Settings are read in this order, each layer overriding the one before:

1. the defaults written in the structs below;
2. ``config/default.toml`` of this checkout (it documents every setting and a
   test keeps it equal to the structs);
3. the TOML file named by ``NIMU_CONFIG``, when set;
4. ``NIMU_<SECTION>_<KEY>`` environment variables, e.g. ``NIMU_DATABASE_URL``
   or ``NIMU_QUEUE_MAX_ATTEMPTS``. A value for a table or list setting is
   written as JSON.

An unknown key, a wrong type or a value out of range raises
:class:`~nimu_rt.errors.ConfigError` whose message is one line naming the key,
the problem and where the value came from. The command line prints that line
and exits.

Environment variables that configure the test and benchmark harness rather
than the service (``NIMU_CONFIG``, ``NIMU_TEST_*``, ``NIMU_BENCH_*``,
``NIMU_REQUIRE_POSTGRES``) are not settings and are ignored here.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from nimu_rt.errors import ConfigError

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every settings table: unknown keys are an error, not ignored."""


class ServerSettings(_Section, kw_only=True):
    """``[server]``: where the service listens and keeps its files."""

    host: str = "127.0.0.1"
    port: Port = 8000
    # Where the embedded default keeps its SQLite file, videos and dev key.
    data_dir: str = "./data"
    # Base URL that clients use to reach this service; empty means
    # http://{host}:{port}. Used in printed links and local signed URLs.
    public_url: str = ""
    # Stable name of this process in a cluster; empty means host-pid-random.
    instance_id: str = ""
    # Seconds a graceful shutdown waits for running work before cancelling it.
    shutdown_grace_s: NonNegativeFloat = 10.0
    # Largest JSON request body accepted; larger ones get 413.
    max_body_bytes: PositiveInt = 64 * 1024


class DatabaseSettings(_Section, kw_only=True):
    """``[database]``: the store (SQLite by default, or PostgreSQL)."""

    # Empty means the embedded default, SQLite at {data_dir}/nimu.db.
    # Otherwise postgresql://... or sqlite:///path/to/file.db.
    url: str = ""
    # PostgreSQL schema that holds the tables (its search_path).
    schema_name: Annotated[str, Meta(pattern=r"^[a-z_][a-z0-9_]{0,62}$")] = "public"
    pool_min_size: NonNegativeInt = 1
    pool_max_size: PositiveInt = 10
    connect_timeout_s: PositiveFloat = 10.0
    command_timeout_s: PositiveFloat = 30.0
    # Apply pending migrations when the server starts. SQLite always does.
    auto_migrate: bool = False


# Signature algorithms a deployment may accept. HS* use auth.jwt_secret;
# the others take their keys from auth.jwks_url.
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
    "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
)


class AuthSettings(_Section, kw_only=True):
    """``[auth]``: how bearer tokens are verified and issued."""

    # Shared secret for HS256 tokens. Empty in the embedded default means a
    # dev key generated once and kept in {data_dir}/dev-signing-key.
    jwt_secret: str = ""
    # Accepted signing algorithms; a token's own "alg" header is not trusted.
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    # Checked when not empty.
    issuer: str = ""
    audience: str = ""
    # Clock skew tolerated on exp, nbf and iat.
    leeway_s: NonNegativeFloat = 30.0
    # Lifetime of tokens printed by `nimu-rt serve` and `nimu-rt token`.
    dev_token_ttl_s: PositiveInt = 30 * 24 * 3600
    # JSON Web Key Set of the identity provider, for RS*/ES*/PS* tokens
    # (required when algorithms lists one of them).
    jwks_url: str = ""
    # Keys are fetched again when older than this, and at once for a token
    # whose "kid" is unknown, but never more often than jwks_min_refresh_s:
    # a flood of made-up kids must not become a flood of fetches.
    jwks_cache_s: PositiveFloat = 600.0
    jwks_min_refresh_s: NonNegativeFloat = 30.0
    jwks_timeout_s: PositiveFloat = 5.0
    # Scoped read tokens minted by POST /api/tokens: the lifetime when the
    # caller asks for none, and the longest one may ask for. Short, because
    # they live in browser pages.
    scoped_token_ttl_s: PositiveInt = 600
    scoped_token_max_ttl_s: PositiveInt = 3600

    def __post_init__(self) -> None:
        unknown = [a for a in self.algorithms if a not in JWT_ALGORITHMS]
        if unknown or not self.algorithms:
            # "none" lands here too: an unsigned token must never pass.
            known = ", ".join(JWT_ALGORITHMS)
            raise ValueError(
                f"algorithms must be a non-empty subset of {known};"
                f" not {', '.join(unknown) or 'empty'}"
            )
        if any(not a.startswith("HS") for a in self.algorithms) and not self.jwks_url:
            raise ValueError("jwks_url is required for RS*, ES* and PS* algorithms")
        if self.scoped_token_ttl_s > self.scoped_token_max_ttl_s:
            raise ValueError(
                "scoped_token_ttl_s must not exceed scoped_token_max_ttl_s"
            )


class GenerationSettings(_Section, kw_only=True):
    """``[generations]``: limits and defaults of a generation request."""

    # Model used when a request names none; must be a key of [pricing].
    default_model: str = "veo-3.1-generate-001"
    max_prompt_chars: Annotated[int, Meta(ge=1, le=20000)] = 2000
    max_answer_chars: Annotated[int, Meta(ge=1, le=20000)] = 500
    # Prompts with fewer words than this get a "detail" question.
    min_prompt_words: NonNegativeInt = 5
    # Page size of list routes when the caller asks for none, and the cap.
    default_page_size: Annotated[int, Meta(ge=1, le=1000)] = 20
    max_page_size: Annotated[int, Meta(ge=1, le=1000)] = 100


class Rate(_Section, kw_only=True):
    """USD per generated second, with and without an audio track."""

    audio: NonNegativeFloat
    silent: NonNegativeFloat


def _default_pricing() -> dict[str, dict[str, Rate]]:
    # Vertex AI list prices per second as captured 2026-08 (see README).
    return {
        "veo-3.1-generate-001": {
            "720p": Rate(audio=0.40, silent=0.20),
            "1080p": Rate(audio=0.40, silent=0.20),
        },
        "veo-3.1-fast-generate-001": {
            "720p": Rate(audio=0.10, silent=0.08),
            "1080p": Rate(audio=0.12, silent=0.10),
        },
    }


class QueueSettings(_Section, kw_only=True):
    """``[queue]``: dispatch limits, retries, leases and deadlines."""

    # Veo 3 quotas are per Google Cloud project, so these two limits hold for
    # the whole cluster, not per instance.
    max_concurrent_operations: PositiveInt = 10
    submissions_per_minute: PositiveInt = 50
    # Jobs one instance runs at once (any phase); operators may change it
    # per instance at run time.
    instance_concurrency: PositiveInt = 20
    # Attempts of one generation before it fails (a user retry starts over).
    max_attempts: PositiveInt = 3
    # Wait before a retryable failure is tried again: doubles per attempt,
    # with jitter, capped.
    backoff_initial_s: NonNegativeFloat = 5.0
    backoff_max_s: NonNegativeFloat = 300.0
    # A running job's lease: renewed every lease_s / 3 by its instance and
    # taken over by another instance when not renewed in time.
    lease_s: PositiveFloat = 30.0
    # An instance whose heartbeat is older than this is considered gone.
    instance_timeout_s: PositiveFloat = 30.0
    # The coordinator wakes on events; this is its fallback re-check.
    tick_s: PositiveFloat = 2.0
    # How often a non-coordinating instance tries to take over coordination.
    leader_retry_s: PositiveFloat = 1.0
    # A phase that runs longer than its deadline is failed (generating) or
    # retried (submitting, uploading).
    submitting_deadline_s: PositiveFloat = 120.0
    generating_deadline_s: PositiveFloat = 900.0
    uploading_deadline_s: PositiveFloat = 900.0
    # Stored progress events per job at most this often.
    progress_interval_s: NonNegativeFloat = 1.0
    # Queue position events per job at most this often.
    position_interval_s: NonNegativeFloat = 0.5
    # Positions are published for this many jobs at the head of the queue.
    positions_published_max: PositiveInt = 1000
    # How long a cancel or override waits for the instance running the job.
    command_timeout_s: PositiveFloat = 5.0
    # Run time assumed for start-time estimates until jobs have finished.
    typical_run_s: PositiveFloat = 90.0
    # Maintenance: terminal generations older than this are removed, with
    # their events and stored objects. 0 keeps them forever.
    retention_days: NonNegativeFloat = 30.0
    maintenance_interval_s: PositiveFloat = 3600.0

class Veo3Settings(_Section, kw_only=True):
    """``[veo3]``: which Veo 3 provider, and how it is called."""

    # Who makes the videos: the built-in simulator (started with the server),
    # Google's Gemini API, or Vertex AI.
    provider: Literal["simulator", "gemini", "vertex"] = "simulator"
    # Gemini API key (x-goog-api-key); required with provider "gemini".
    api_key: str = ""
    # Override of the provider's endpoint; empty means Google's own
    # (https://generativelanguage.googleapis.com or the regional Vertex one).
    base_url: str = ""
    # Vertex AI project and region; the project is required with "vertex".
    vertex_project: str = ""
    vertex_location: str = "us-central1"
    # Vertex REST version in the path; Google's samples use v1.
    vertex_api_version: str = "v1"
    # A fixed OAuth access token; wins over the credentials file. Tokens
    # expire within the hour, so this suits tests and short runs only.
    vertex_access_token: str = ""
    # Service-account JSON file read with google-auth (extra "vertex");
    # empty with no token means google-auth's application default.
    vertex_credentials_file: str = ""
    # gs:// prefix for Vertex to write videos to; empty returns them inline
    # (base64 in the poll answer, so the whole video is held in memory).
    vertex_storage_uri: str = ""
    # Where gs:// objects are downloaded from (the Cloud Storage JSON API).
    gcs_base_url: str = "https://storage.googleapis.com"
    # Per request: connecting, and everything else of a JSON call.
    connect_timeout_s: PositiveFloat = 10.0
    request_timeout_s: PositiveFloat = 60.0
    # Longest wait for the next bytes of a download (not the whole file).
    download_read_timeout_s: PositiveFloat = 60.0
    # Attempts per HTTP call, the first included, before giving up.
    retry_attempts: PositiveInt = 4
    # Full-jitter backoff: a random wait up to initial * 2**n, capped.
    retry_initial_s: NonNegativeFloat = 1.0
    retry_max_s: NonNegativeFloat = 30.0
    # A server hint (RetryInfo, Retry-After) longer than this is not waited
    # out inside the client: the caller gets it as retry_after_s.
    retry_hint_max_s: NonNegativeFloat = 60.0
    # Poll delay: starts at poll_initial_s, times poll_growth per poll,
    # never above poll_max_s. Veo 3 takes 11 s to 6 min.
    poll_initial_s: NonNegativeFloat = 5.0
    poll_growth: Annotated[float, Meta(ge=1)] = 1.5
    poll_max_s: NonNegativeFloat = 30.0
    # Typical generation time, for progress estimates (no percentage is
    # reported by Veo 3). Ignored with the simulator, whose own is used.
    typical_generation_s: PositiveFloat = 90.0
    # Size of the chunks a download yields.
    download_chunk_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024


Rate01 = Annotated[float, Meta(ge=0, le=1)]


class SimulatorSettings(_Section, kw_only=True):
    """``[simulator]``: the built-in Veo 3 simulator and its faults."""

    # Seconds an operation stays running before it is done.
    generation_s: NonNegativeFloat = 5.0
    # Pixels on the short side of simulated videos (Google's are 720 or
    # 1080); small is fast. 0 uses the requested resolution's real size.
    frame_short_side_px: Annotated[int, Meta(ge=0, le=2160)] = 360
    # The credential the simulator expects (API key or bearer token); empty
    # accepts any non-empty one.
    api_key: str = ""
    # Models served; empty means the models of [pricing].
    models: list[str] = msgspec.field(default_factory=list)
    # Models answered with 404 "no longer available", as Google does.
    retired_models: list[str] = msgspec.field(
        default_factory=lambda: [
            "veo-2.0-generate-001",
            "veo-3.0-generate-001",
            "veo-3.0-fast-generate-001",
            "veo-3.0-generate-preview",
            "veo-3.0-fast-generate-preview",
        ]
    )
    # Answer downloads with a 302 to a second URL, as Google does.
    redirect_downloads: bool = True
    # Seconds a finished video stays downloadable (Google: 2 days).
    retention_s: NonNegativeFloat = 172800.0
    # retryDelay sent with an injected 429.
    retry_delay_s: NonNegativeFloat = 1.0
    # How long a "slow" fault holds its answer; more than the client waits.
    slow_s: NonNegativeFloat = 120.0
    # Seed of the fault draws: same seed, same requests, same faults.
    fault_seed: int = 0
    # Chance per request of each injected fault (their sum at most 1).
    # 500 and slow on a submit happen after the operation was created.
    fault_429_rate: Rate01 = 0.0
    fault_500_rate: Rate01 = 0.0
    fault_503_rate: Rate01 = 0.0
    fault_slow_rate: Rate01 = 0.0
    # JSON calls only: a 200 whose body is cut short.
    fault_malformed_rate: Rate01 = 0.0
    # Downloads only: the connection closes halfway through the body.
    fault_drop_rate: Rate01 = 0.0
    # Chance per operation to end in an error (code 13) or a safety block.
    operation_error_rate: Rate01 = 0.0
    safety_filter_rate: Rate01 = 0.0


MiB = 1024 * 1024
# R2 (like S3) refuses multipart parts under 5 MiB except the last, and
# parts over 5 GiB.
PartSize = Annotated[int, Meta(ge=5 * MiB, le=5 * 1024 * MiB)]
# Empty, or path segments each ending in "/", e.g. "videos/".
KeyPrefix = Annotated[str, Meta(pattern=r"^([A-Za-z0-9_-]+/)*$")]
ImageType = Literal["image/png", "image/jpeg", "image/webp"]


class StorageSettings(_Section, kw_only=True):
    """``[storage]``: where videos go (local files or R2) and how."""

    # "local": files under local_dir, served by this app at signed URLs (the
    # embedded default). "r2": Cloudflare R2 through its S3 API.
    backend: Literal["local", "r2"] = "local"
    # Empty means {data_dir}/objects.
    local_dir: str = ""
    # R2: https://<account id>.r2.cloudflarestorage.com, the bucket, and an
    # API token's S3 credentials.
    endpoint_url: str = ""
    bucket: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    # R2 ignores the region but SigV4 needs one; "auto" is R2's own name.
    region: str = "auto"
    # R2 accepts both; path style needs no DNS name per bucket.
    addressing_style: Literal["path", "virtual"] = "path"
    # A custom domain serving the bucket publicly. When set, playback links
    # are plain public URLs there instead of presigned ones.
    public_base_url: str = ""
    # Connections to R2 kept open by the one client of this process: at
    # least max_parallel_parts times the uploads running at once, plus a few
    # for deletes and listings. A full pool makes requests wait.
    max_connections: Annotated[int, Meta(ge=2, le=1024)] = 32
    connect_timeout_s: PositiveFloat = 10.0
    # Longest silence while reading a response.
    read_timeout_s: PositiveFloat = 60.0
    # Upper bound on one request, pool wait and body included.
    request_timeout_s: PositiveFloat = 300.0
    # Every part but the last has exactly this size (R2 requires equal
    # parts); memory per upload is about part size x (parallel parts + 1).
    part_size_bytes: PartSize = 8 * MiB
    max_parallel_parts: Annotated[int, Meta(ge=1, le=64)] = 4
    # Tries per request (a part, create, complete) on transient errors, and
    # the backoff between them: base x 2^n, capped, with jitter.
    request_attempts: Annotated[int, Meta(ge=1, le=20)] = 5
    retry_base_delay_s: NonNegativeFloat = 0.5
    retry_max_delay_s: NonNegativeFloat = 10.0
    # Times a dropped source download is reopened at the byte it stopped at.
    source_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    # Lifetime of signed playback links; R2's limit is 7 days.
    signed_url_ttl_s: Annotated[int, Meta(ge=1, le=604800)] = 3600
    # Lifetime of a presigned reference-image upload URL.
    upload_url_ttl_s: Annotated[int, Meta(ge=1, le=604800)] = 900
    # Largest video accepted; a larger download is refused while streaming.
    max_video_bytes: PositiveInt = 2 * 1024 * MiB
    # Thumbnails: a frame this far into the video (or its middle, if
    # shorter), scaled down to at most this width.
    thumbnail_at_s: NonNegativeFloat = 1.0
    thumbnail_max_width: Annotated[int, Meta(ge=16, le=4096)] = 640
    # Key prefix of stored videos and their thumbnails.
    video_prefix: KeyPrefix = "videos/"
    # Reference images (image-to-video): the largest accepted, and the types.
    max_reference_image_bytes: PositiveInt = 10 * MiB
    reference_image_types: list[ImageType] = msgspec.field(
        default_factory=lambda: ["image/png", "image/jpeg", "image/webp"]
    )
    # Browser origins allowed by the bucket's CORS rule (nimu-rt setup-bucket),
    # e.g. ["https://app.example.com"]. Empty: setup-bucket leaves CORS alone.
    cors_origins: list[str] = msgspec.field(default_factory=list)
    # setup-bucket's lifecycle rule: unfinished multipart uploads are aborted
    # this many days after they started (R2's own default is 7).
    abort_incomplete_after_days: Annotated[int, Meta(ge=1, le=365)] = 2
    # Where a video being uploaded is copied to disk to read its metadata;
    # empty means the system's temporary directory.
    spool_dir: str = ""


class LoggingSettings(_Section, kw_only=True):
    """``[logging]``: level and format of the service's logs."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "text"


class SecuritySettings(_Section, kw_only=True):
    """``[security]``: CORS, headers, sizes, rate limits, spend cap."""

    # Browser origins allowed to call the REST API (CORS), e.g.
    # ["https://app.example.com"]; "*" allows any. Empty: no CORS headers,
    # so browsers only allow same-origin calls.
    cors_origins: list[str] = msgspec.field(default_factory=list)
    # How long a browser may cache a CORS preflight answer.
    cors_max_age_s: NonNegativeInt = 600
    # Strict-Transport-Security max-age, sent only on https requests
    # (behind a proxy: its X-Forwarded-Proto, from a trusted address). 0: off.
    hsts_max_age_s: NonNegativeInt = 31536000
    # Largest request head (all header names and values) accepted; 431 above.
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024
    # Longest a request may take before its answer starts; 503 after it.
    # A long-poll gets realtime.longpoll_max_wait_s on top. Streamed bodies
    # (video downloads) are not limited once they have started.
    request_timeout_s: PositiveFloat = 30.0
    # Token buckets on POST, PUT, PATCH and DELETE: a caller may send a burst
    # of this many requests, then this many per second. Kept per instance.
    # Admin and service callers are not limited.
    rate_limits: bool = True
    user_rate_per_s: PositiveFloat = 5.0
    user_burst: PositiveInt = 60
    ip_rate_per_s: PositiveFloat = 20.0
    ip_burst: PositiveInt = 200
    # Buckets kept in memory at most; the idlest are forgotten first (a
    # forgotten bucket is full again).
    rate_limit_max_keys: PositiveInt = 100_000
    # USD a user's confirmed generations may cost per UTC day (confirms and
    # retries count; failed generations do not). 0: no cap.
    daily_spend_cap_usd: NonNegativeFloat = 0.0


class MetricsSettings(_Section, kw_only=True):
    """``[metrics]``: the Prometheus page, and whether it has a port of its own."""

    # Serve Prometheus metrics at all.
    enabled: bool = True
    # false: /metrics on the service's own port, for admin and service
    # tokens. true: on host:port below without auth (keep it private), and
    # not on the service's port. Port 0 picks a free port.
    separate: bool = False
    host: str = "127.0.0.1"
    port: Port = 9464


class RealtimeSettings(_Section, kw_only=True):
    """``[realtime]``: the WebSocket protocol's deadlines and limits."""

    # Seconds a /ws connection opened without an Authorization header has to
    # send its auth message before it is closed (4408).
    auth_deadline_s: PositiveFloat = 10.0
    # WebSocket protocol pings sent by the server, and how long it waits for
    # the pong before it drops the connection (proxies cut idle sockets).
    ping_interval_s: PositiveFloat = 20.0
    ping_timeout_s: PositiveFloat = 20.0
    # Largest client message answered normally; a larger one gets an error
    # frame. Messages over 16 times this are refused by the WebSocket layer
    # itself (close code 1009), before they are read into memory.
    max_message_bytes: Annotated[int, Meta(ge=256)] = 4096
    # Topics one connection may subscribe to at once.
    max_subscriptions: PositiveInt = 100
    # Frames queued for one connection before it counts as too slow and is
    # closed with 4008 (progress and queue updates coalesce and do not pile
    # up). Must be larger than history_replay_limit.
    subscriber_buffer_frames: Annotated[int, Meta(ge=2)] = 512
    # Longest one frame may take to reach the socket; a slower client is
    # closed with 4008.
    send_timeout_s: PositiveFloat = 20.0
    # Browser origins allowed to open /ws besides the service's own; "*"
    # allows any. Clients that send no Origin (not browsers) are allowed.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    # Cap on GET /api/generations/{id}?waitSeconds=N (long-polling).
    longpoll_max_wait_s: PositiveFloat = 25.0
    # Most events replayed to a resuming subscriber; further behind it gets
    # a reset with a fresh snapshot instead of a partial replay.
    history_replay_limit: PositiveInt = 300
    # Generations in the snapshot of a user:{id} topic, newest first.
    user_snapshot_size: Annotated[int, Meta(ge=1, le=1000)] = 20
    # PostgreSQL only: how often the LISTEN connection is checked, and the
    # longest pause between attempts to open it again after it dropped.
    bridge_check_interval_s: PositiveFloat = 5.0
    bridge_retry_max_s: PositiveFloat = 5.0

    def __post_init__(self) -> None:
        # A full replay must fit in a connection's buffer, or a client that
        # resumes far behind would be cut off, resume, and be cut off again.
        if self.history_replay_limit >= self.subscriber_buffer_frames:
            raise ValueError(
                "history_replay_limit must be below subscriber_buffer_frames"
            )


class Settings(_Section, kw_only=True):
    """Every setting of the service, grouped by the part that reads it."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    generations: GenerationSettings = msgspec.field(
        default_factory=GenerationSettings
    )
    # Price table: model -> resolution -> rate. Models missing here cannot be
    # requested.
    pricing: dict[str, dict[str, Rate]] = msgspec.field(
        default_factory=_default_pricing
    )
    queue: QueueSettings = msgspec.field(default_factory=QueueSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    veo3: Veo3Settings = msgspec.field(default_factory=Veo3Settings)
    simulator: SimulatorSettings = msgspec.field(default_factory=SimulatorSettings)
    realtime: RealtimeSettings = msgspec.field(default_factory=RealtimeSettings)
    security: SecuritySettings = msgspec.field(default_factory=SecuritySettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)


    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        """The configured URL, or the embedded SQLite file under data_dir."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.data_path / 'nimu.db'}"

    @property
    def embedded(self) -> bool:
        """True when the store is SQLite: one process, local files."""
        return self.database_url.startswith("sqlite:")

    @property
    def base_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"


DEFAULT_FILE = Path(__file__).resolve().parent.parent / "config" / "default.toml"
_IGNORED_ENV = re.compile(r"^NIMU_(CONFIG|REQUIRE_POSTGRES|TEST_.*|BENCH_.*)$")


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    default_file: Path | None = DEFAULT_FILE,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from the layers in the module docstring.

    ``overrides`` is a nested mapping applied last; tests use it instead of
    environment variables. Raises :class:`ConfigError` on the first problem.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}

    # 1. Files: the documented defaults, then the deployment's own file.
    files = []
    if default_file is not None and default_file.is_file():
        files.append(default_file)
    if env.get("NIMU_CONFIG"):
        path = Path(env["NIMU_CONFIG"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"NIMU_CONFIG: no such file: {path}")
        files.append(path)
    for path in files:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read TOML: {exc}") from None
        _merge(merged, data, origin, str(path), prefix="")

    # 2. Environment variables.
    for name in sorted(env):
        if not name.startswith("NIMU_") or _IGNORED_ENV.match(name):
            continue
        section, key = _split_env_name(name)
        value = _parse_env_value(name, section, key, env[name])
        _merge(merged, {section: {key: value}}, origin, name, prefix="")

    # 3. Explicit overrides from code.
    if overrides:
        _merge(merged, dict(overrides), origin, "overrides", prefix="")

    # msgspec reports a bad value inside a table as "[...]" without the key,
    # so the price table's rows are checked one by one first.
    pricing = merged.get("pricing", {})
    if isinstance(pricing, Mapping):
        for model, rows in pricing.items():
            for resolution, rate in (rows or {}).items():
                where = f"pricing.{model}.{resolution}"
                try:
                    msgspec.convert(rate, Rate, strict=False)
                except msgspec.ValidationError as exc:
                    raise ConfigError(_describe(exc, origin, where)) from None
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _merge(
    into: dict[str, Any],
    data: Mapping[str, Any],
    origin: dict[str, str],
    source: str,
    prefix: str,
) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        # Tables merge key by key so a file may set one key of a section;
        # the price table is replaced per model so a model's rows stay whole.
        if (
            isinstance(value, Mapping)
            and isinstance(into.get(key), dict)
            and prefix.count(".") < 1
        ):
            _merge(into[key], value, origin, source, prefix=f"{dotted}.")
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
            origin[dotted] = source


def _split_env_name(name: str) -> tuple[str, str]:
    rest = name[len("NIMU_") :].lower()
    sections = sorted(Settings.__struct_fields__, key=len, reverse=True)
    for section in sections:
        if rest.startswith(section + "_"):
            key = rest[len(section) + 1 :]
            if _section_fields(section) is None or key in _section_fields(section):
                return section, key
            raise ConfigError(f"{name}: unknown setting {section}.{key}")
    raise ConfigError(f"{name}: unknown setting (no section named like it)")


def _section_fields(section: str) -> tuple[str, ...] | None:
    """Field names of a section struct, or None for free-form tables."""
    field_type = Settings.__annotations__[section]
    cls = globals().get(field_type) if isinstance(field_type, str) else field_type
    if isinstance(cls, type) and issubclass(cls, Struct):
        return cls.__struct_fields__
    return None


def _parse_env_value(name: str, section: str, key: str, raw: str) -> Any:
    # Scalars stay strings and msgspec converts them (strict=False); lists
    # and tables must be JSON so that they can be told apart from scalars.
    if raw.lstrip().startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}: not valid JSON: {exc}") from None
    return raw


_AT = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _describe(
    exc: msgspec.ValidationError, origin: Mapping[str, str], prefix: str = ""
) -> str:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    problem = match["problem"]
    path = ".".join(p for p in (prefix, (match["path"] or "").lstrip(".")) if p)
    path = re.sub(r"\[(?:'|\")?([^\]'\"]+)(?:'|\")?\]", r".\1", path).lstrip(".")
    unknown = re.match(r"Object contains unknown field `([^`]+)`", problem)
    if unknown:
        path = f"{path}.{unknown[1]}" if path else unknown[1]
        problem = "unknown setting"
    missing = re.match(r"Object missing required field `([^`]+)`", problem)
    if missing:
        path = f"{path}.{missing[1]}" if path else missing[1]
        problem = "required setting is missing"
    source = _source_of(path, origin)
    where = f" (from {source})" if source else ""
    return f"{path or 'settings'}: {problem}{where}"


def _source_of(path: str, origin: Mapping[str, str]) -> str | None:
    parts = path.split(".")
    while parts:
        found = origin.get(".".join(parts))
        if found:
            return found
        parts.pop()
    return None
