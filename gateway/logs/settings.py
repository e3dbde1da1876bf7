"""Logging settings: config over environment over Ray's defaults, and where each file goes."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Types only: a replica process imports this module and should not pay for pydantic.
    from gateway.config import GatewayConfig, LoggingConfig


ROOT = "gateway"
TREES = (ROOT, "exporters")
"""Logger trees the gateway's handlers serve (exporters are plug-ins living beside gateway/)."""
ACCESS = "gateway.access"
ENV_MAX_BYTES = "RAY_ROTATION_MAX_BYTES"
ENV_BACKUP_COUNT = "RAY_ROTATION_BACKUP_COUNT"
ENV_MEMORY_PROFILING = "GATEWAY_ENABLE_MEMORY_PROFILING"
ENV_REPLICA_LOGGING = "GATEWAY_LOGGING"
"""How the gateway hands a replica process its resolved logging settings (JSON)."""
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # Ray's defaults
DEFAULT_BACKUP_COUNT = 5
GATEWAY_LOG_FILE = "gateway.log"


log = logging.getLogger("gateway.logs")


@dataclass(frozen=True)
class LogSettings:
    """Logging settings with every default filled in (config over environment over Ray's)."""

    log_level: str = "INFO"
    encoding: str = "TEXT"
    logs_dir: str = "logs"
    disable_access_log: bool = False
    stream_replica_logs: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    backup_count: int = DEFAULT_BACKUP_COUNT

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LogSettings:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", key, raw)
        return default
    return max(value, 0)


def resolve(
    cfg: LoggingConfig | None, logs_dir: Path | str | None, env: Mapping[str, str]
) -> LogSettings:
    """Fill the unset fields of `cfg`: rotation from the environment, the rest from defaults.

    An explicit `logs_dir` (the gateway's own) wins over the config's.
    """

    def get(key: str) -> Any:
        return getattr(cfg, key) if cfg is not None else None

    max_bytes, backup_count = get("max_bytes"), get("backup_count")
    stream = get("stream_replica_logs")
    return LogSettings(
        log_level=get("log_level") or "INFO",
        encoding=get("encoding") or "TEXT",
        logs_dir=str(Path(logs_dir or get("logs_dir") or "logs").resolve()),
        disable_access_log=bool(get("disable_access_log")),
        stream_replica_logs=True if stream is None else bool(stream),
        max_bytes=(
            max_bytes if max_bytes is not None
            else _env_int(env, ENV_MAX_BYTES, DEFAULT_MAX_BYTES)
        ),
        backup_count=(
            backup_count if backup_count is not None
            else _env_int(env, ENV_BACKUP_COUNT, DEFAULT_BACKUP_COUNT)
        ),
    )


def replica_logging_config(config: GatewayConfig, app: str, deployment: str) -> LoggingConfig:
    """Deployment's logging_config over the application's over the gateway's."""
    merged = config.logging_config
    app_cfg = config.application(app)
    if app_cfg is not None:
        if app_cfg.logging_config is not None:
            merged = app_cfg.logging_config.merged_over(merged)
        dep = next((d for d in app_cfg.deployments if d.name == deployment), None)
        if dep is not None and dep.logging_config is not None:
            merged = dep.logging_config.merged_over(merged)
    return merged


def safe_name(replica_id: str) -> str:
    """A replica id (`app#Deployment#suffix`) as a file-name part."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in replica_id)


def replica_log_file(logs_dir: Path | str, replica_id: str) -> Path:
    return Path(logs_dir) / f"replica_{safe_name(replica_id)}.log"
