"""Structured logs for the gateway and its local replicas.

One logger tree under the root name `gateway`; every line carries level, timestamp,
application, deployment, replica, request id, route and message, in TEXT (for people) or JSON
(one object per line, for Loki or ELK). Each component writes its own file under the logs
directory: `gateway.log` for the gateway, `replica_<app>_<deployment>_<suffix>.log` per replica,
each rotated by size (`RAY_ROTATION_MAX_BYTES` / `RAY_ROTATION_BACKUP_COUNT`, or the config).

The access log (one line per call, at the gateway and in each replica) never formats on the
call path: the call only appends to a bounded buffer that a timer on the event loop drains.

settings (what is configured), context (which call a line belongs to), format (TEXT / JSON,
rotation), access (the per-call lines), gateway_process and replica (the two kinds of
process), profiling (memray).
"""
