"""The pre-split name of gateway/logs/: re-exports for code written against it."""

from gateway.dataplane.call import REQUEST_ID_KEYS
from gateway.logs.access import (
    AccessLog,
    access_record,
    emit_batch,
)
from gateway.logs.context import (
    CallContext,
    ContextFilter,
    call_context,
    current_request_id,
    request_id_of,
)
from gateway.logs.format import (
    JsonFormatter,
    TextFormatter,
    file_handler,
    formatter,
)
from gateway.logs.gateway_process import (
    GatewayLogging,
)
from gateway.logs.profiling import (
    memory_profiler,
    memory_profiling_enabled,
)
from gateway.logs.replica import (
    INTERNAL_PREFIXES,
    ReplicaLogging,
)
from gateway.logs.settings import (
    ACCESS,
    DEFAULT_BACKUP_COUNT,
    DEFAULT_MAX_BYTES,
    ENV_BACKUP_COUNT,
    ENV_MAX_BYTES,
    ENV_MEMORY_PROFILING,
    ENV_REPLICA_LOGGING,
    GATEWAY_LOG_FILE,
    ROOT,
    TREES,
    LogSettings,
    replica_log_file,
    replica_logging_config,
    resolve,
    safe_name,
)

__all__ = [
    "ACCESS",
    "DEFAULT_BACKUP_COUNT",
    "DEFAULT_MAX_BYTES",
    "ENV_BACKUP_COUNT",
    "ENV_MAX_BYTES",
    "ENV_MEMORY_PROFILING",
    "ENV_REPLICA_LOGGING",
    "GATEWAY_LOG_FILE",
    "INTERNAL_PREFIXES",
    "REQUEST_ID_KEYS",
    "ROOT",
    "TREES",
    "AccessLog",
    "CallContext",
    "ContextFilter",
    "GatewayLogging",
    "JsonFormatter",
    "LogSettings",
    "ReplicaLogging",
    "TextFormatter",
    "access_record",
    "call_context",
    "current_request_id",
    "emit_batch",
    "file_handler",
    "formatter",
    "memory_profiler",
    "memory_profiling_enabled",
    "replica_log_file",
    "replica_logging_config",
    "request_id_of",
    "resolve",
    "safe_name",
]
