"""Settings: one pydantic-settings class read from TRAWLER_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

_DRIVER_PREFIXES = (
    "postgres://",
    "postgresql://",
    "postgresql+psycopg://",
    "postgresql+psycopg2://",
    "postgresql+asyncpg://",
)


def normalize_database_url(url: str) -> str:
    """Return the URL with the asyncpg driver, whatever driver the user spelled."""
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url.split('://', 1)[0]}://...")


def _check_parses(url: str) -> None:
    # a typo in the port or host must fail here, as a settings error, not deep in a connect
    try:
        port = make_url(url).port
    except (ArgumentError, ValueError) as error:
        raise ValueError(f"malformed database URL ({error})") from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"database URL port {port} is out of range")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAWLER_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="PostgreSQL URL; unset = embedded PostgreSQL in DATA_DIR"
    )
    data_dir: Path = Field(default=Path(".trawler"), description="embedded DB, admin key")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # database pool
    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_timeout: float = Field(default=5.0, gt=0, description="seconds to wait for a connection")
    pool_recycle: int = Field(default=1800, description="seconds before a connection is renewed")
    pool_overflow_idle_s: float = Field(
        default=30.0,
        ge=0,
        description="connections beyond pool_size are closed once no more than pool_size "
        "have been in use for this long",
    )
    pool_ping_idle_s: float = Field(
        default=0.5,
        ge=0,
        description="the hot paths' one-statement checkouts ping a pooled connection only "
        "when it has been idle this long; 0: always (every other checkout always pings)",
    )
    db_connect_timeout: float = Field(default=3.0, gt=0)
    db_command_timeout: float = Field(default=30.0, gt=0)
    health_timeout: float = Field(default=1.5, gt=0, description="hard limit of a health probe")
    pgbouncer: bool = Field(
        default=False, description="transaction pooler: no prepared statements, no LISTEN"
    )

    # executor
    worker_concurrency: int = Field(default=64, ge=1)
    claim_batch: int = Field(default=100, ge=1)
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)
    shutdown_grace: float = Field(default=20.0, ge=0)
    worker_stale_seconds: float = Field(
        default=30.0, gt=0, description="a worker silent this long is presumed dead"
    )
    flush_interval: float = Field(default=0.02, ge=0, description="group-commit window")
    retry_base_s: float = Field(default=1.0, gt=0, description="first retry delay")
    retry_max_s: float = Field(default=300.0, gt=0)
    per_host_concurrency: int = Field(default=8, ge=1, description="default fetches per host")

    # scraping
    allow_private_networks: bool = False
    allowed_cidrs: list[str] = Field(default_factory=list)
    user_agent: str = "TrawlerBot/0.1 (+https://github.com/trawler/trawler)"
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_redirects: int = Field(default=10, ge=0)

    # tenants (every key of a tenant shares these; 0 turns a limit off)
    tenant_max_active_jobs: int = Field(
        default=1000, ge=0, description="queued + running jobs a tenant may have; 0 = no limit"
    )
    tenant_submit_rate: float = Field(
        default=10.0, ge=0, description="job submissions per second per tenant; 0 = no limit"
    )
    tenant_submit_burst: int = Field(
        default=100, ge=1, description="submissions a tenant may make at once above the rate"
    )

    # admin and metrics
    metrics_token: SecretStr | None = Field(
        default=None, description="bearer token for GET /metrics besides admin keys"
    )
    purge_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="rows deleted per committed purge batch"
    )
    admin_query_timeout: float = Field(
        default=10.0, gt=0, description="server-side limit of admin and metrics queries"
    )

    # webhooks (delivered by the workers from the webhook_deliveries outbox)
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="total time one delivery attempt may take"
    )
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    webhook_retry_base_s: float = Field(
        default=30.0, gt=0, description="delay after the first failed attempt (then doubled)"
    )
    webhook_retry_max_s: float = Field(default=6 * 3600.0, gt=0, description="longest delay")
    webhook_max_attempts: int = Field(
        default=12, ge=1, le=100, description="attempts before a delivery is marked failed"
    )
    webhook_poll_interval: float = Field(
        default=1.0, gt=0, description="seconds between looks for due deliveries"
    )
    webhook_batch: int = Field(default=50, ge=1, le=1000, description="deliveries per claim")
    webhook_concurrency: int = Field(default=16, ge=1, le=256)

    # schedules
    schedule_poll_interval: float = Field(
        default=1.0, gt=0, description="seconds between looks for due schedule ticks"
    )
    schedule_min_interval_s: float = Field(
        default=60.0, ge=1, description="shortest time between two ticks of a schedule"
    )
    schedule_runs_retain_days: int = Field(
        default=30, ge=1, description="days the run history of schedules is kept"
    )

    # retention (the purge runs in every worker; jobs are locked with SKIP LOCKED)
    default_retain_days: int | None = Field(
        default=None, ge=0, description="retain_days of jobs that do not set it; None = forever"
    )
    retention_interval_s: float = Field(
        default=300.0, gt=0, description="seconds between two retention purges of a worker"
    )

    @field_validator("metrics_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        secret = value.get_secret_value().strip()
        if len(secret) < 24:  # refuses placeholders ("changeme") along with short tokens
            raise ValueError("metrics_token must be a random string of at least 24 characters")
        return SecretStr(secret)

    @field_validator("database_url")
    @classmethod
    def _normalize_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = normalize_database_url(value.strip())
        _check_parses(url)
        return url


@lru_cache
def get_settings() -> Settings:
    return Settings()
