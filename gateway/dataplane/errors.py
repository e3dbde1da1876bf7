"""The one place where the gateway's own failures become gRPC status codes.

Replica statuses are passed through untouched; only what the gateway itself decides
(routing, queueing, reachability) is named here.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class GatewayError(Exception):
    """A failure made by the gateway, carried to the client as `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.request_id = ""
        # What was known when the call was refused, so it is still counted and logged by it.
        self.application = ""
        self.deployment = ""


def _names(apps: Iterable[str]) -> str:
    listed = sorted(apps)
    return ", ".join(repr(a) for a in listed) if listed else "none"


def application_missing(available: Iterable[str]) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.NOT_FOUND,
        "Application metadata not set: send metadata 'application' with one of: "
        f"{_names(available)}",
    )


def application_unknown(name: str, available: Iterable[str]) -> GatewayError:
    # The client's value is echoed in details only; it never becomes a metric label.
    shown = name if len(name) <= 100 else name[:100] + "..."
    return GatewayError(
        grpc.StatusCode.NOT_FOUND,
        f"Application {shown!r} not found. Available applications: {_names(available)}",
    )


def no_healthy_replica(app: str, deployment: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"No healthy replica of deployment {deployment!r} in application {app!r}",
    )


def replica_unreachable(app: str, deployment: str, attempts: int, why: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"Could not reach a replica of deployment {deployment!r} in application {app!r} "
        f"after {attempts} attempt(s): {why}",
    )


def replica_lost(app: str, deployment: str, replica: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"Replica {replica!r} of deployment {deployment!r} in application {app!r} was stopped "
        "while the call was in flight (scale-down, rolling change or shutdown past its grace)",
    )


def queue_full(app: str, deployment: str, bound: int) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"Deployment {deployment!r} in application {app!r} is saturated: "
        f"{bound} calls already queued (max_queued_requests)",
    )


def deadline_in_queue(app: str, deployment: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"Deadline exceeded while waiting for a replica of {deployment!r} in {app!r}",
    )


def draining() -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE, "Gateway is draining and accepts no new calls"
    )


def bad_metadata(key: str, why: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata {key!r}: {why}")


def bad_request_id(key: str, value: str, max_len: int) -> GatewayError:
    # The value itself is not echoed: it may hold control characters.
    if len(value) > max_len:
        why = f"longer than {max_len} chars ({len(value)})"
    else:
        pos = next(
            (i for i, c in enumerate(value) if not (c.isascii() and c.isprintable()) or c == " "),
            0,
        )
        why = f"character {pos + 1} is not printable ASCII (or is a space)"
    return bad_metadata(
        key, f"{why}; a request id is 1-{max_len} printable ASCII characters without spaces"
    )


def internal(exc: BaseException) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.INTERNAL, f"Gateway internal error: {type(exc).__name__}: {exc}"
    )


def method_not_found(path: str, app: str) -> GatewayError:
    shown = path if len(path) <= 200 else path[:200] + "..."
    return GatewayError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"Method not found: {shown!r} is not served by application {app!r}",
    )
