"""Settings: read once at start from the environment (the seed's names plus ADIUVA_*).

Every value is validated here so that a bad setting fails at start with a clear message,
never later in a request. `Settings` is immutable and passed to `create_app`; nothing reads
the environment after this.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

from adiuva_server import tiers
from adiuva_server.errors import ConfigError

TIERS = tiers.NAMES
DEFAULT_CORS_ORIGINS = ("app://.", "http://localhost:3000", "http://localhost:5173")
JWT_SECRET_FILE = "jwt_secret"
LICENSE_FILE = "license.json"
MIN_SECRET_BYTES = 32
MIN_METRICS_TOKEN_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path
    host: str = "0.0.0.0"
    port: int = 8000
    env: str = "prod"
    log_level: str = "INFO"
    jwt_secret: str | None = None  # resolved by `ensure_data_dir` when unset
    jwt_algorithm: str = "HS256"
    access_token_minutes: int = 30
    refresh_token_days: int = 30
    # A refresh token presented again this soon after its rotation (a network retry, two windows
    # of the app) gets the same successor back instead of revoking its family as a theft.
    refresh_grace_seconds: int = 10
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    signups_open: bool = True
    # No license, homelab mode: the box's disk is the limit, so new accounts get `team` (DESIGN
    # "Tiers"); a licensed (paid cloud) server gives them `free`. ADIUVA_DEFAULT_TIER decides when set.
    licensed: bool = False
    default_tier: str = "team"
    # The license file (default <data dir>/license.json) and the public key that verifies it
    # (empty: the production key built into the server; base64 of 32 raw bytes, or a PEM).
    license_file: Path | None = None
    license_public_key: str = ""
    password_min_length: int = 8
    # argon2id cost (OWASP's recommended minimum by default: 19 MiB, t=2, p=1, ~18 ms here).
    argon2_memory_kib: int = 19 * 1024
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    max_concurrent_hashes: int = 0  # 0: one per CPU
    # "full": every acknowledged write survives power loss; "normal": survives a crash of the
    # process (kill -9) but the last commits may be lost on power loss. Faster writes.
    sqlite_synchronous: str = "full"
    rate_limits: Mapping[str, int] = dataclasses.field(default_factory=tiers.rate_limits)
    rate_window_seconds: float = 60.0
    # Password guessing: failures per client address and per account inside the window
    # before login answers 429 until the window slides on (a back-off, never a permanent ban).
    login_failures_per_address: int = 20
    login_failures_per_account: int = 10
    login_failure_window_seconds: float = 900.0
    registrations_per_address: int = 10
    registration_window_seconds: float = 3600.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    llm_model: str = "ollama/llama3.2"
    llm_router_model: str = "ollama/llama3.2"
    # Models besides llm_model that paying tiers may pick per request (LLM_MODELS, comma list).
    llm_models: tuple[str, ...] = ()
    ollama_host: str = "http://127.0.0.1:11434"
    llm_api_base: str = ""  # LiteLLM's api_base for non-Ollama models; "" = the provider's own
    # Bounds one provider call; when streaming, the wait for each next chunk.
    llm_timeout: float = 60.0
    chat_heartbeat_seconds: float = 30.0
    # Chat WebSockets one account may hold open at once (more are refused with 429), and the
    # plans (plan-mode answers, built plans) kept in memory per account, its oldest dropped first.
    chat_max_sockets: int = 4
    chat_max_plans_per_user: int = 50
    # How long GET /chat/models (and the serve banner) trust their last check of the providers,
    # so the app's polling does not ask Ollama every time. Not read from the environment.
    llm_status_ttl: float = 5.0
    stripe_secret_key: str = dataclasses.field(default="", repr=False)
    stripe_webhook_secret: str = dataclasses.field(default="", repr=False)
    # Billing (licensed mode, adiuva_server/billing): a Stripe-compatible API, the price of each
    # paid tier, how long a past_due subscription keeps its tier, how often the subscriptions are
    # re-read from Stripe to repair missed webhooks (0: only `adiuva billing reconcile`), and
    # where Stripe's pages send the user back to.
    stripe_api_base: str = "https://api.stripe.com"
    stripe_price_pro: str = "price_pro_monthly"
    stripe_price_power: str = "price_power_monthly"
    stripe_price_team: str = "price_team_monthly"
    billing_past_due_grace: float = 7 * 86400.0
    billing_reconcile_interval: float = 86400.0
    billing_return_url: str = "https://adiuva.app/billing/return"
    shutdown_timeout: float = 15.0
    # Scheduled whole-server backups into <data dir>/server-backups: every N seconds (0: off),
    # keeping the newest `backup_keep` archives.
    backup_interval: float = 0.0
    backup_keep: int = 7
    tls: bool = False
    tls_cert: Path | None = None  # the admin's own certificate and key (imply tls)
    tls_key: Path | None = None
    # Vector store: vectors per upsert, the largest top_k (sqlite-vec caps k at 4096), the
    # largest payload of one vector, and the body limit of an upsert (other JSON bodies: 1 MiB).
    vector_max_batch: int = 1000
    vector_max_top_k: int = 100
    vector_max_payload_bytes: int = 64 * 1024
    vector_max_request_bytes: int = 16 * 1024 * 1024
    # In-memory copies of searched vector collections for exact numpy search (vectors/mirror.py):
    # at most this many bytes in all (0 turns it off; a 100k x 384 collection takes ~155 MB),
    # for collections of at least this many vectors (smaller ones are read from SQLite each time).
    vector_cache_bytes: int = 512 * 1024**2
    vector_cache_min_vectors: int = 1
    # Encrypted storage (records and backups): body size limits, records per user, and how many
    # backups each user keeps (older ones are deleted when a new one arrives).
    max_record_bytes: int = 64 * 1024**2
    max_backup_bytes: int = 2 * 1024**3
    max_records_per_user: int = 1_000_000
    backup_retention: int = 5
    # Deleted records stay in the change feed as tombstones this long (seconds; 0: forever).
    tombstone_retention: float = 90 * 86400.0
    # Hostile clients (http/protocol.py, http/bodies.py): seconds a connection has to deliver a
    # complete request head after it opens or after its previous answer (idle keep-alive
    # connections close after it too); seconds a request body may go without a byte; open
    # connections in all and from one client address (trusted proxies are not capped).
    header_timeout: float = 15.0
    body_timeout: float = 30.0
    max_connections: int = 4096
    max_connections_per_address: int = 256
    # Bearer token that /metrics requires; empty: /metrics answers 404.
    metrics_token: str = dataclasses.field(default="", repr=False)
    # LAN discovery (mDNS/DNS-SD) by `adiuva serve` (ADIUVA_MDNS: on unless set off), announced on
    # these local addresses (empty: the LAN addresses the banner prints).
    mdns: bool = False
    mdns_interfaces: tuple[str, ...] = ()
    # The doctor's checks (as `adiuva doctor`, never --fix) in the background for the admin
    # status: a minute after start, then every N seconds (0: only when an admin asks).
    doctor_interval: float = 86400.0
    # The plugin marketplace: its bundled plugins' folder (None: the one shipped with the server;
    # "": none), and the bounds of a submitted package (the .tar.gz, what it unpacks to, entries).
    plugins_dir: str | None = None
    plugin_max_package_bytes: int = 5 * 1024**2
    plugin_max_unpacked_bytes: int = 20 * 1024**2
    plugin_max_files: int = 200
    # Many machines (DESIGN "One box, or many"): PostgreSQL for metadata and vectors instead of
    # the SQLite file ("" = SQLite). The URL may carry a password: never printed.
    database_url: str = dataclasses.field(default="", repr=False)
    # Redis or Valkey shared by several `adiuva serve` processes (rate limits, login throttles,
    # chat socket caps, plans, cluster job leases, change notices); empty: all in this process.
    # May carry a password: never printed.
    redis_url: str = dataclasses.field(default="", repr=False)
    # An S3-compatible bucket for the blobs instead of the data dir's files ("" = files); the
    # endpoint is for MinIO, Garage, Ceph... ("" = AWS). The keys are never printed.
    s3_bucket: str = ""
    # With DATABASE_URL: this is the only node, so local blobs and in-process limits are whole.
    single_node: bool = False
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    aws_access_key_id: str = dataclasses.field(default="", repr=False)
    aws_secret_access_key: str = dataclasses.field(default="", repr=False)
    # Where each setting came from ("default", "environment", "flag"), for the admin console.
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:  # never print the secret
        fields = (f.name for f in dataclasses.fields(self) if f.repr and f.name != "jwt_secret")
        return "Settings(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in fields) + ")"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "adiuva.db"

    @property
    def license_path(self) -> Path:
        return self.license_file or self.data_dir / LICENSE_FILE

    @property
    def backend(self) -> str:
        """Which metadata backend: "sqlite" (the data dir's file) or "postgresql"."""
        return "postgresql" if self.database_url else "sqlite"

    @property
    def dev(self) -> bool:
        return self.env == "dev"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `environ` (default: os.environ); keyword overrides win
        (they come from CLI flags). Raises ConfigError naming the variable at fault."""
        env = dict(os.environ if environ is None else environ)
        r = _Reader(env)
        values: dict[str, Any] = {
            "data_dir": Path(
                env.get("ADIUVA_DATA_DIR") or platformdirs.user_data_dir("adiuva", appauthor=False)
            ).expanduser(),
            "host": env.get("ADIUVA_HOST", cls.host),
            "port": r.int("ADIUVA_PORT", cls.port, 0, 65535),
            "env": r.choice("ENV", "prod", ("dev", "prod", "test")),
            "log_level": r.choice(
                "ADIUVA_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            "jwt_secret": env.get("JWT_SECRET") or None,
            "jwt_algorithm": r.choice("JWT_ALGORITHM", "HS256", ("HS256",)),
            "access_token_minutes": r.int("JWT_ACCESS_TOKEN_EXPIRE_MINUTES", 30, 1, 24 * 60),
            "refresh_token_days": r.int("JWT_REFRESH_TOKEN_EXPIRE_DAYS", 30, 1, 365),
            "refresh_grace_seconds": r.int("ADIUVA_REFRESH_GRACE_SECONDS", cls.refresh_grace_seconds, 0, 60),
            "cors_origins": r.list("CORS_ORIGINS", DEFAULT_CORS_ORIGINS),
            "signups_open": r.choice("ADIUVA_SIGNUPS", "open", ("open", "closed")) == "open",
            "password_min_length": r.int("ADIUVA_PASSWORD_MIN_LENGTH", 8, 6, 128),
            "argon2_memory_kib": r.int("ADIUVA_ARGON2_MEMORY_KIB", 19 * 1024, 8 * 1024, 4 * 1024 * 1024),
            "argon2_time_cost": r.int("ADIUVA_ARGON2_TIME_COST", 2, 1, 20),
            "argon2_parallelism": r.int("ADIUVA_ARGON2_PARALLELISM", 1, 1, 16),
            "max_concurrent_hashes": r.int("ADIUVA_MAX_CONCURRENT_HASHES", 0, 0, 64),
            "sqlite_synchronous": r.choice("ADIUVA_SQLITE_SYNCHRONOUS", "full", ("full", "normal")),
            "trusted_proxies": r.networks("ADIUVA_TRUSTED_PROXIES"),
            "rate_limits": r.tier_limits("ADIUVA_RATE_LIMITS", tiers.rate_limits()),
            "llm_model": env.get("LLM_MODEL") or cls.llm_model,
            "llm_router_model": env.get("LLM_ROUTER_MODEL") or env.get("LLM_MODEL") or cls.llm_router_model,
            "llm_models": r.list("LLM_MODELS", ()),
            "ollama_host": r.url("OLLAMA_HOST", cls.ollama_host),
            "llm_api_base": r.url("LLM_API_BASE", ""),
            "llm_timeout": r.float("LLM_TIMEOUT", cls.llm_timeout, 0.1, 3600.0),
            "chat_max_sockets": r.int("ADIUVA_CHAT_MAX_SOCKETS", cls.chat_max_sockets, 1, 1000),
            "chat_max_plans_per_user": r.int("ADIUVA_CHAT_MAX_PLANS", cls.chat_max_plans_per_user, 1, 1000),
            "stripe_secret_key": env.get("STRIPE_SECRET_KEY", ""),
            "stripe_webhook_secret": env.get("STRIPE_WEBHOOK_SECRET", ""),
            "stripe_api_base": r.url("STRIPE_API_BASE", cls.stripe_api_base),
            "stripe_price_pro": r.price("STRIPE_PRICE_PRO", cls.stripe_price_pro),
            "stripe_price_power": r.price("STRIPE_PRICE_POWER", cls.stripe_price_power),
            "stripe_price_team": r.price("STRIPE_PRICE_TEAM", cls.stripe_price_team),
            "billing_return_url": r.url("ADIUVA_BILLING_RETURN_URL", cls.billing_return_url),
            "vector_max_batch": r.int("ADIUVA_VECTOR_MAX_BATCH", 1000, 1, 100_000),
            "vector_max_top_k": r.int("ADIUVA_VECTOR_MAX_TOP_K", 100, 1, 4096),
            "vector_max_payload_bytes": r.int("ADIUVA_VECTOR_MAX_PAYLOAD_BYTES", 64 * 1024, 0, 16 * 1024 * 1024),
            "vector_cache_bytes": r.int("ADIUVA_VECTOR_CACHE_BYTES", cls.vector_cache_bytes, 0, 1 << 40),
            "vector_cache_min_vectors": r.int("ADIUVA_VECTOR_CACHE_MIN_VECTORS", cls.vector_cache_min_vectors, 1, 10**9),
            "vector_max_request_bytes": r.int("ADIUVA_VECTOR_MAX_REQUEST_BYTES", 16 * 1024 * 1024, 1024 * 1024, 1024**3),
            "max_record_bytes": r.int("ADIUVA_MAX_RECORD_BYTES", cls.max_record_bytes, 1, 2**40),
            "max_backup_bytes": r.int("ADIUVA_MAX_BACKUP_BYTES", cls.max_backup_bytes, 1, 2**44),
            "max_records_per_user": r.int("ADIUVA_MAX_RECORDS_PER_USER", cls.max_records_per_user, 1, 10**9),
            "backup_retention": r.int("ADIUVA_BACKUP_RETENTION", cls.backup_retention, 1, 1000),
            "header_timeout": r.float("ADIUVA_HEADER_TIMEOUT", cls.header_timeout, 0.1, 3600.0),
            "body_timeout": r.float("ADIUVA_BODY_TIMEOUT", cls.body_timeout, 0.1, 3600.0),
            "max_connections": r.int("ADIUVA_MAX_CONNECTIONS", cls.max_connections, 16, 1_000_000),
            "max_connections_per_address": r.int(
                "ADIUVA_MAX_CONNECTIONS_PER_ADDRESS", cls.max_connections_per_address, 1, 1_000_000),
        }
        values["backup_interval"] = r.duration("ADIUVA_BACKUP_INTERVAL", 0.0)
        values["tombstone_retention"] = r.duration("ADIUVA_TOMBSTONE_RETENTION", cls.tombstone_retention)
        values["backup_keep"] = r.int("ADIUVA_BACKUP_KEEP", 7, 1, 10_000)
        values["tls_cert"] = _path(env.get("ADIUVA_TLS_CERT"))
        values["tls_key"] = _path(env.get("ADIUVA_TLS_KEY"))
        values["tls"] = r.choice("ADIUVA_TLS", "off", ("on", "off", "1", "0", "true", "false")) in ("on", "1", "true")
        values["metrics_token"] = r.secret("ADIUVA_METRICS_TOKEN", MIN_METRICS_TOKEN_BYTES)
        values["mdns"] = r.choice("ADIUVA_MDNS", "on", ("on", "off", "1", "0", "true", "false")) in ("on", "1", "true")
        values["mdns_interfaces"] = r.addresses("ADIUVA_MDNS_INTERFACES")
        values["doctor_interval"] = r.duration("ADIUVA_DOCTOR_INTERVAL", cls.doctor_interval)
        plugins_dir = env.get("ADIUVA_PLUGINS_DIR")
        values["plugins_dir"] = None if plugins_dir is None else ("" if plugins_dir.strip().lower() in ("", "off") else plugins_dir)
        values["plugin_max_package_bytes"] = r.int("ADIUVA_PLUGIN_MAX_PACKAGE_BYTES", cls.plugin_max_package_bytes, 1024, 1024**3)
        values["plugin_max_unpacked_bytes"] = r.int("ADIUVA_PLUGIN_MAX_UNPACKED_BYTES", cls.plugin_max_unpacked_bytes, 1024, 4 * 1024**3)
        values["plugin_max_files"] = r.int("ADIUVA_PLUGIN_MAX_FILES", cls.plugin_max_files, 1, 100_000)
        values["billing_past_due_grace"] = r.duration("ADIUVA_BILLING_PAST_DUE_GRACE", cls.billing_past_due_grace)
        values["billing_reconcile_interval"] = r.duration("ADIUVA_BILLING_RECONCILE_INTERVAL",
                                                          cls.billing_reconcile_interval)
        values["license_file"] = _path(env.get("ADIUVA_LICENSE_FILE"))
        values["license_public_key"] = (env.get("ADIUVA_LICENSE_PUBLIC_KEY") or "").strip()
        values["database_url"] = r.database_url("DATABASE_URL")
        values["redis_url"] = r.redis_url("REDIS_URL")
        values["s3_bucket"] = r.s3_bucket("S3_BUCKET")
        values["single_node"] = r.choice("ADIUVA_SINGLE_NODE", "false", ("true", "false", "1", "0")) in ("true", "1")
        values["s3_endpoint_url"] = r.s3_endpoint("S3_ENDPOINT_URL")
        values["s3_region"] = r.s3_region("S3_REGION", cls.s3_region)
        values["aws_access_key_id"] = (env.get("AWS_ACCESS_KEY_ID") or "").strip()
        values["aws_secret_access_key"] = (env.get("AWS_SECRET_ACCESS_KEY") or "").strip()
        values["sources"] = setting_sources(env, overrides)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in overrides and overrides["data_dir"] is not None:
            values["data_dir"] = Path(overrides["data_dir"]).expanduser()
        # The mode follows the license file (in the data dir, so after --data-dir is applied).
        if overrides.get("licensed") is None:
            values["licensed"] = licensed_mode(
                values["license_file"] or values["data_dir"] / LICENSE_FILE, values["license_public_key"])
        if overrides.get("default_tier") is None:
            values["default_tier"] = r.choice("ADIUVA_DEFAULT_TIER", default_tier(values["licensed"]), TIERS)
        settings = cls(**values)
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise ConfigError("give both a TLS certificate and its key (--cert/--key or ADIUVA_TLS_CERT/ADIUVA_TLS_KEY)")
        for path in (settings.tls_cert, settings.tls_key):
            if path is not None and not path.is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        if settings.tls_cert is not None:
            settings = dataclasses.replace(settings, tls=True)
        if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes; "
                "unset it to let the server generate and keep one in its data dir"
            )
        settings.check_llm_models()
        settings.check_shared()
        return settings

    def check_shared(self) -> None:
        """A shared database with pieces that are not shared would split state between nodes:
        each would keep its own blobs (an upload on one, a 404 on the next) or its own rate limits
        and socket caps. Refused unless this is declared the only node."""
        if not self.database_url or self.single_node:
            return
        missing = [name for name, value in (("S3_BUCKET", self.s3_bucket), ("REDIS_URL", self.redis_url)) if not value]
        if not missing and not self.jwt_secret:
            raise ConfigError("DATABASE_URL is set (several nodes) but JWT_SECRET is not, so each node would sign "
                              "tokens with a secret of its own and a token from one node would fail on the next; "
                              "set the same JWT_SECRET (32 bytes or more) on every node")
        if missing:
            what = " and ".join(missing)
            raise ConfigError(
                f"DATABASE_URL is set (metadata shared by every node) but {what} {'is' if len(missing) == 1 else 'are'} "
                "not, so each node would keep its own " + " and its own ".join(
                    {"S3_BUCKET": "blobs", "REDIS_URL": "rate limits, throttles and socket caps"}[m] for m in missing)
                + f"; set {what} on every node, or ADIUVA_SINGLE_NODE=true if this server is the only one")

    @property
    def chat_models(self) -> tuple[str, ...]:
        """The models a request may pick, default first."""
        return tuple(dict.fromkeys((self.llm_model, *self.llm_models)))

    def check_llm_models(self) -> None:
        for name in (*self.chat_models, self.llm_router_model):
            provider, sep, model = name.partition("/")
            if not name.strip() or name != name.strip() or (provider == "ollama" and not (sep and model)):
                raise ConfigError(f"invalid LLM model name {name!r}; use 'ollama/<name>' or a LiteLLM model name")

    def with_secret(self) -> Settings:
        """Return settings whose jwt_secret is set: JWT_SECRET if given, else the secret kept in
        the data dir (created on first start, mode 0600). Never a built-in default."""
        if self.jwt_secret:
            return self
        path = self.data_dir / JWT_SECRET_FILE
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            secret = secrets.token_urlsafe(48)
            # O_EXCL: two processes starting at once must not both write a different secret.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                secret = path.read_text().strip()
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secret + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
        return dataclasses.replace(self, jwt_secret=secret)


def licensed_mode(license_path: Path, public_key: str) -> bool:
    """Whether this server starts in licensed mode: the one place that decides it. A license
    that verifies (valid, expiring, in grace or expired) is licensed mode; no file or an unusable
    one is homelab mode (license/state.py). A running server follows its LicenseState."""
    from adiuva_server.license.format import load_public_key
    from adiuva_server.license.state import evaluate, read
    from adiuva_server.clock import SystemClock

    try:
        key = load_public_key(public_key)
    except ValueError as exc:
        raise ConfigError(f"ADIUVA_LICENSE_PUBLIC_KEY {exc}") from None
    return evaluate(read(license_path, key), license_path, SystemClock().now()).licensed


def default_tier(licensed: bool) -> str:
    """The tier of new accounts when ADIUVA_DEFAULT_TIER is not set."""
    return "free" if licensed else "team"


def ensure_data_dir(settings: Settings) -> Settings:
    """Create the data dir (0700) if needed and resolve the JWT secret."""
    d = settings.data_dir
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data dir {d}: {exc.strerror}") from exc
    if not d.is_dir():
        raise ConfigError(f"data dir {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"data dir {d} is not writable")
    return settings.with_secret()


def _path(raw: str | None) -> Path | None:
    return Path(raw).expanduser() if raw and raw.strip() else None


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    def float(self, name: str, default: float, lo: float, hi: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    def url(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if "://" not in raw:  # Ollama's own convention: OLLAMA_HOST=127.0.0.1:11434
            raw = "http://" + raw
        parsed = urllib.parse.urlsplit(raw)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
        try:
            parsed.port
        except ValueError:
            raise ConfigError(f"{name} has an invalid port: {raw!r}") from None
        return raw.rstrip("/")

    def database_url(self, name: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return ""
        parsed = urllib.parse.urlsplit(raw)
        if parsed.scheme not in ("postgresql", "postgres") or not (parsed.hostname or "host=" in parsed.query):
            # Never echo the value: it may hold a password.
            raise ConfigError(f"{name} must be a PostgreSQL URL: postgresql://user:password@host:5432/dbname")
        return raw

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        for option in options:  # case-insensitive, canonical spelling back
            if raw.casefold() == option.casefold():
                return option
        raise ConfigError(f"{name} must be one of {', '.join(options)}; got {raw!r}")

    def list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.startswith("["):
            try:
                items = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name} is not a valid JSON list: {exc.msg}") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigError(f"{name} must be a JSON list of strings")
        else:
            items = [i.strip() for i in raw.split(",")]
        return tuple(i for i in items if i)

    def duration(self, name: str, default: float) -> float:
        """Seconds, or a number with s/m/h/d (`24h`); 0 means off; at least a minute otherwise."""
        raw = self._raw(name)
        if raw is None:
            return default
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        number, unit = (raw[:-1], raw[-1]) if raw[-1].lower() in units else (raw, "s")
        try:
            seconds = float(number) * units[unit.lower()]
        except ValueError:
            raise ConfigError(f"{name} must be a duration such as 3600, 30m, 24h or 7d; got {raw!r}") from None
        if seconds != 0 and not 60 <= seconds <= 365 * 86400:
            raise ConfigError(f"{name} must be 0 (off) or between 1 minute and 365 days; got {raw!r}")
        return seconds

    def tier_limits(self, name: str, default: dict[str, int]) -> dict[str, int]:
        """`free=20,pro=60,...`: requests per minute by tier; tiers not named keep defaults."""
        limits = dict(default)
        for item in self.list(name, ()):
            tier, sep, value = item.partition("=")
            if not sep or tier.strip() not in limits or not value.strip().isdigit() or int(value) < 1:
                raise ConfigError(f"{name} must look like 'free=20,pro=60,power=120,team=200'; got {item!r}")
            limits[tier.strip()] = int(value)
        return limits

    def networks(self, name: str) -> tuple[Any, ...]:
        nets = []
        for item in self.list(name, ()):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"{name}: {item!r} is not an IP address or network") from None
        return tuple(nets)

    def secret(self, name: str, min_bytes: int) -> str:
        raw = self._raw(name)
        if raw is None:
            return ""
        if len(raw.encode()) < min_bytes:
            raise ConfigError(f"{name} must be at least {min_bytes} bytes (e.g. `openssl rand -hex 32`)")
        return raw

    def redis_url(self, name: str) -> str:
        """redis://[user:password@]host[:port][/db], rediss://... (TLS) or unix:///path. The
        value is never echoed back: it may hold a password."""
        raw = self._raw(name)
        if raw is None:
            return ""
        form = "use redis://[user:password@]host[:port][/db], rediss://... or unix:///path/to/redis.sock"
        try:
            parts = urllib.parse.urlsplit(raw)
            parts.port
        except ValueError:
            raise ConfigError(f"{name} is not a valid URL; {form}") from None
        if parts.scheme in ("redis", "rediss"):
            db = parts.path.strip("/")
            if not parts.hostname or (db and not db.isdigit()):
                raise ConfigError(f"{name} needs a host and at most a database number as its path; {form}")
        elif parts.scheme == "unix":
            if not parts.path:
                raise ConfigError(f"{name} needs the path of the socket; {form}")
        else:
            raise ConfigError(f"{name} must start with redis://, rediss:// or unix://; {form}")
        return raw

    def s3_bucket(self, name: str) -> str:
        """A bucket name as S3 accepts it: 3-63 characters, lowercase letters, digits, dots and
        hyphens, starting and ending with a letter or digit, not shaped like an IP address."""
        raw = self._raw(name)
        if raw is None:
            return ""
        if (not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", raw) or ".." in raw
                or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", raw)):
            raise ConfigError(f"{name} must be an S3 bucket name (3-63 lowercase letters, digits, '.' and '-'); "
                              f"got {raw!r}")
        return raw

    def s3_endpoint(self, name: str) -> str:
        """http(s)://host[:port] of an S3-compatible server; unlike OLLAMA_HOST the scheme is
        required (whether the keys travel in clear text must be said, not guessed)."""
        raw = self._raw(name)
        if raw is None:
            return ""
        try:
            parts = urllib.parse.urlsplit(raw)
            parts.port
        except ValueError:
            raise ConfigError(f"{name} has an invalid port: {raw!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name} must be an http(s) URL such as https://s3.example.com; got {raw!r}")
        return raw.rstrip("/")

    def s3_region(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[a-z0-9-]{1,64}", raw):
            raise ConfigError(f"{name} must be a region name such as us-east-1; got {raw!r}")
        return raw

    def price(self, name: str, default: str) -> str:
        """A Stripe price id (or lookup-key-like name): letters, digits and _ - . only."""
        raw = self._raw(name)
        if raw is None:
            return default
        if len(raw) > 255 or not re.fullmatch(r"[A-Za-z0-9_.-]+", raw):
            raise ConfigError(f"{name} must be a Stripe price id such as price_1Abc...; got {raw!r}")
        return raw

    def addresses(self, name: str) -> tuple[str, ...]:
        out = []
        for item in self.list(name, ()):
            try:
                out.append(str(ipaddress.ip_address(item)))
            except ValueError:
                raise ConfigError(f"{name}: {item!r} is not an IP address of this host") from None
        return tuple(out)


# The variables each setting is read from (first wins), for the provenance the console shows.
# A field not named here is not read from the environment: its source is "default" or "flag".
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "data_dir": ("ADIUVA_DATA_DIR",), "host": ("ADIUVA_HOST",), "port": ("ADIUVA_PORT",), "env": ("ENV",),
    "log_level": ("ADIUVA_LOG_LEVEL",), "jwt_secret": ("JWT_SECRET",), "jwt_algorithm": ("JWT_ALGORITHM",),
    "access_token_minutes": ("JWT_ACCESS_TOKEN_EXPIRE_MINUTES",), "refresh_token_days": ("JWT_REFRESH_TOKEN_EXPIRE_DAYS",),
    "cors_origins": ("CORS_ORIGINS",), "signups_open": ("ADIUVA_SIGNUPS",), "default_tier": ("ADIUVA_DEFAULT_TIER",),
    "password_min_length": ("ADIUVA_PASSWORD_MIN_LENGTH",), "argon2_memory_kib": ("ADIUVA_ARGON2_MEMORY_KIB",),
    "argon2_time_cost": ("ADIUVA_ARGON2_TIME_COST",), "argon2_parallelism": ("ADIUVA_ARGON2_PARALLELISM",),
    "max_concurrent_hashes": ("ADIUVA_MAX_CONCURRENT_HASHES",), "sqlite_synchronous": ("ADIUVA_SQLITE_SYNCHRONOUS",),
    "trusted_proxies": ("ADIUVA_TRUSTED_PROXIES",), "rate_limits": ("ADIUVA_RATE_LIMITS",),
    "llm_model": ("LLM_MODEL",), "llm_router_model": ("LLM_ROUTER_MODEL", "LLM_MODEL"), "llm_models": ("LLM_MODELS",),
    "ollama_host": ("OLLAMA_HOST",), "llm_api_base": ("LLM_API_BASE",), "llm_timeout": ("LLM_TIMEOUT",),
    "chat_max_sockets": ("ADIUVA_CHAT_MAX_SOCKETS",), "chat_max_plans_per_user": ("ADIUVA_CHAT_MAX_PLANS",),
    "stripe_secret_key": ("STRIPE_SECRET_KEY",), "stripe_webhook_secret": ("STRIPE_WEBHOOK_SECRET",),
    "vector_max_batch": ("ADIUVA_VECTOR_MAX_BATCH",), "vector_max_top_k": ("ADIUVA_VECTOR_MAX_TOP_K",),
    "vector_max_payload_bytes": ("ADIUVA_VECTOR_MAX_PAYLOAD_BYTES",), "vector_cache_bytes": ("ADIUVA_VECTOR_CACHE_BYTES",),
    "vector_cache_min_vectors": ("ADIUVA_VECTOR_CACHE_MIN_VECTORS",),
    "vector_max_request_bytes": ("ADIUVA_VECTOR_MAX_REQUEST_BYTES",), "max_record_bytes": ("ADIUVA_MAX_RECORD_BYTES",),
    "max_backup_bytes": ("ADIUVA_MAX_BACKUP_BYTES",), "max_records_per_user": ("ADIUVA_MAX_RECORDS_PER_USER",),
    "backup_retention": ("ADIUVA_BACKUP_RETENTION",), "backup_interval": ("ADIUVA_BACKUP_INTERVAL",),
    "tombstone_retention": ("ADIUVA_TOMBSTONE_RETENTION",), "backup_keep": ("ADIUVA_BACKUP_KEEP",),
    "tls_cert": ("ADIUVA_TLS_CERT",), "tls_key": ("ADIUVA_TLS_KEY",), "tls": ("ADIUVA_TLS", "ADIUVA_TLS_CERT"),
    "header_timeout": ("ADIUVA_HEADER_TIMEOUT",), "body_timeout": ("ADIUVA_BODY_TIMEOUT",),
    "max_connections": ("ADIUVA_MAX_CONNECTIONS",), "max_connections_per_address": ("ADIUVA_MAX_CONNECTIONS_PER_ADDRESS",),
    "refresh_grace_seconds": ("ADIUVA_REFRESH_GRACE_SECONDS",), "metrics_token": ("ADIUVA_METRICS_TOKEN",), "mdns": ("ADIUVA_MDNS",), "mdns_interfaces": ("ADIUVA_MDNS_INTERFACES",),
    "doctor_interval": ("ADIUVA_DOCTOR_INTERVAL",),
    "plugins_dir": ("ADIUVA_PLUGINS_DIR",), "plugin_max_package_bytes": ("ADIUVA_PLUGIN_MAX_PACKAGE_BYTES",),
    "plugin_max_unpacked_bytes": ("ADIUVA_PLUGIN_MAX_UNPACKED_BYTES",), "plugin_max_files": ("ADIUVA_PLUGIN_MAX_FILES",),
    "stripe_api_base": ("STRIPE_API_BASE",), "stripe_price_pro": ("STRIPE_PRICE_PRO",),
    "stripe_price_power": ("STRIPE_PRICE_POWER",), "stripe_price_team": ("STRIPE_PRICE_TEAM",),
    "billing_past_due_grace": ("ADIUVA_BILLING_PAST_DUE_GRACE",),
    "billing_reconcile_interval": ("ADIUVA_BILLING_RECONCILE_INTERVAL",),
    "billing_return_url": ("ADIUVA_BILLING_RETURN_URL",),
    "license_file": ("ADIUVA_LICENSE_FILE",), "license_public_key": ("ADIUVA_LICENSE_PUBLIC_KEY",),
    "database_url": ("DATABASE_URL",),
    "redis_url": ("REDIS_URL",),
    "s3_bucket": ("S3_BUCKET",), "single_node": ("ADIUVA_SINGLE_NODE",), "s3_endpoint_url": ("S3_ENDPOINT_URL",), "s3_region": ("S3_REGION",),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",), "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
}


def setting_sources(env: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, str]:
    """Each setting's origin: "flag" (a keyword override, i.e. a CLI flag), "environment" (one of
    its variables is set and not blank) or "default"."""
    out = {}
    for f in dataclasses.fields(Settings):
        if f.name == "sources":
            continue
        if overrides.get(f.name) is not None:
            out[f.name] = "flag"
        elif any((env.get(n) or "").strip() for n in ENV_NAMES.get(f.name, ())):
            out[f.name] = "environment"
        else:
            out[f.name] = "default"
    return out
