"""Service settings: one pydantic-settings class, read from ``BEYOND_*`` environment variables.

Reach it through :func:`get_settings` (cached, built on first use, never at import time) so
tests can build their own :class:`Settings` and hand it to ``create_app``. Every variable is
documented in ``docs/service.md``.
"""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DAY = 24 * 3600
MIB = 1024 * 1024
PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "test", "password", "apikey", "api-key"}
DEFAULT_MODELS = ("shapes-resnet", "shapes-vgg", "shapes-resnet-fair", "shapes-resnet-faint")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the gateway, the RQ workers and the stack runner read from the environment."""

    model_config = SettingsConfigDict(env_prefix="BEYOND_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"
    log_level: str = "INFO"

    # --- gateway
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    state_dir: Path = Path("var")
    data_dir: Path | None = None

    # --- TorchServe (inference API only; the management API is never used by the gateway)
    torchserve_url: str = "http://127.0.0.1:8080"
    torchserve_key_file: Path | None = None
    torchserve_token: SecretStr | None = None
    torchserve_connect_timeout_s: float = Field(2.0, gt=0)
    torchserve_timeout_s: float = Field(120.0, gt=0)
    # a job's calls (one Explanation Filter is one call) may run up to the archives'
    # responseTimeout (600 s), inside which the handler answers 422 time_limit
    torchserve_job_timeout_s: float = Field(600.0, gt=0)
    torchserve_max_connections: int = Field(32, ge=1)
    torchserve_retry_after_s: int = Field(2, ge=1)
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    describe_cache_s: float = Field(300.0, ge=0)

    # --- admission control: requests in flight per route class; more are answered 429
    max_inflight_predict: int = Field(32, ge=1)
    max_inflight_explain: int = Field(4, ge=1)
    max_inflight_uploads: int = Field(2, ge=1)
    overload_retry_after_s: int = Field(1, ge=1)

    # --- Redis and RQ
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(2.0, gt=0)
    queue_name: str = "beyond"
    job_timeout_s: int = Field(3600, ge=1)
    result_ttl_s: int = Field(7 * DAY, ge=60)
    failure_ttl_s: int = Field(7 * DAY, ge=60)
    expired_marker_ttl_s: int = Field(90 * DAY, ge=60)
    job_retries: int = Field(2, ge=0)
    job_retry_intervals_s: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [5, 30])
    worker_monitor_interval_s: int = Field(5, ge=1)
    worker_heartbeat_grace_s: int = Field(10, ge=1)
    worker_maintenance_interval_s: int = Field(15, ge=1)
    worker_ttl_s: int = Field(30, ge=20)
    embed_batch_size: int = Field(32, ge=1)
    embed_concurrency: int = Field(1, ge=1, le=64)
    # a dataset job of more images runs as chunks of about this many on any workers, then a
    # reduce (service/jobs/fanout.py); 0 runs every job whole, in one worker
    chunk_images: int = Field(1000, ge=0)

    # --- upload and decoding limits
    max_upload_bytes: int = Field(10 * MIB, ge=1024)
    max_archive_bytes: int = Field(256 * MIB, ge=1024)
    max_json_bytes: int = Field(16 * MIB, ge=1024)
    max_image_pixels: int = Field(25_000_000, ge=1)
    max_archive_files: int = Field(20_000, ge=1)
    max_archive_unpacked_bytes: int = Field(1024 * MIB, ge=1024)
    max_form_fields: int = Field(16, ge=1)
    max_relevance_bytes: int = Field(64 * MIB, ge=1024)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("models", "job_retry_intervals_s", mode="before")
    @classmethod
    def _parse_lists(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment == "production":
            for key in self.api_keys:
                raw = key.get_secret_value()
                if raw.lower() in PLACEHOLDER_KEYS or len(raw) < 16:
                    raise ValueError(
                        "BEYOND_API_KEYS holds a placeholder or short key (min. 16 chars)"
                    )
        return self

    # ----------------------------------------------------------------- derived paths
    @property
    def data_path(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.state_dir / "data"

    @property
    def key_file_path(self) -> Path:
        return self.api_key_file if self.api_key_file is not None else self.state_dir / "api_key"

    def resolved_api_keys(self) -> list[str]:
        """Keys from ``BEYOND_API_KEYS``, else the one stored in the local key file."""
        keys = [k.get_secret_value() for k in self.api_keys if k.get_secret_value()]
        if keys:
            return keys
        try:
            stored = self.key_file_path.read_text().strip()
        except OSError:
            return []
        return [stored] if stored else []


def ensure_api_key_file(settings: Settings) -> str | None:
    """Create the local key file with a fresh key when no key is configured; return that key.

    Returns ``None`` when ``BEYOND_API_KEYS`` is set (nothing generated or printed).
    """
    if settings.api_keys:
        return None
    path = settings.key_file_path
    existing = settings.resolved_api_keys()
    if existing:
        return existing[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first call."""
    return Settings()
