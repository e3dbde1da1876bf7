"""The Grafana dashboards of this folder, written as Python: the one source of truth.

`python deploy/grafana/dashboards.py` rewrites the `*.json` files beside it (ready to import
into Grafana 10 or later); `--check` only says whether they are current (exit 1 if not).
tests/test_deploy_dashboards.py checks that they are, that they are well-formed dashboards, and
evaluates every query against a real Prometheus scraping a real gateway.

Metric names and labels are Ray Serve 2.60's (see README "Metrics"), so the panels marked
`ray=True` also work against a Ray Serve cluster.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10.4 / 11: older schemas are migrated on import, newer ones not
DS = {"type": "prometheus", "uid": "${datasource}"}
TAG = "grpc-gateway"
RI = "$__rate_interval"

# Label filters of the template variables ("All" is `.*`).
APP = 'application=~"$application"'
DEP = 'deployment=~"$deployment"'
METHOD = 'method=~"$method"'
SERVER_CODE_NAMES = "UNKNOWN|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|INTERNAL|UNAVAILABLE|DATA_LOSS"
"""gRPC codes that are the server's fault (as in alerts.yaml): the error-ratio panels."""
SERVER_CODES = f"(StatusCode[.])?({SERVER_CODE_NAMES})"
"""Their error_code values: the gateway's `UNAVAILABLE`, Ray Serve's `StatusCode.UNAVAILABLE`."""
REPLICA_COMPONENT = 'Component=~"ray::ServeReplica:$application:$deployment"'
GATEWAY_COMPONENT = 'Component="ray::ProxyActor"'


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    description: str = ""
    ray: bool = True
    """Also fills against a Ray Serve cluster (same metric names and labels)."""
    width: int = 12
    kind: str = "timeseries"


@dataclass
class Row:
    title: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[str]
    items: list[Panel | Row] = field(default_factory=list)


def quantiles(metric: str, by: str, match: str, legend: str) -> list[tuple[str, str]]:
    """P50, P90 and P99 of a histogram, grouped by `by` (plus `le`)."""
    return [
        (f"histogram_quantile({q}, sum by ({by}, le) "
         f"(rate({metric}_bucket{{{match}}}[{RI}])))", f"P{int(q * 100)} {legend}")
        for q in (0.5, 0.9, 0.99)
    ]


def rate(metric: str, by: str, match: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{match}}}[{RI}]))"


def dropped_in_10m(by: str, match: str) -> str:
    """Drops in the last 10 minutes, as GatewayRecordsDropped counts them: a series born in
    the window (a reason counted from its first drop) counts whole, where increase() sees 0."""
    m = f"grpc_gateway_records_dropped_total{{{match}}}"
    return f"sum by ({by}) (({m} unless {m} offset 10m) or increase({m}[10m]))"


def restarts_in_10m(match: str) -> str:
    """Restarts per replica in the last 10 minutes as GatewayReplicaRestarts counts them: the
    counter now minus 10 minutes ago (a replica first seen since: minus its first start), a
    whole number where increase() would extrapolate between scrapes."""
    m = f"ray_serve_deployment_replica_starts_total{{{match}}}"
    return (f"sum by (instance, application, deployment, replica) "
            f"(({m} - {m} offset 10m) or ({m} - 1 unless {m} offset 10m))")


def per_call(histogram: str, match: str) -> str:
    """The average observation of a histogram per method (its sum over its count)."""
    return (f"{rate(histogram + '_sum', 'grpc_method', match)} / "
            f"{rate(histogram + '_count', 'grpc_method', match)}")


OVERVIEW = Dashboard(
    "grpc-gateway-overview", "Serve overview (grpc-gateway)",
    "Calls, errors and latency per application and method, gRPC and HTTP side by side; "
    "ongoing calls, healthy replicas and queued calls.",
    ["application", "deployment", "method"],
    [
        Row("Calls"),
        Panel("gRPC calls/s", [(rate("ray_serve_num_grpc_requests_total",
                                     "application, method", f"{APP}, {METHOD}"),
                                "{{application}} {{method}}")], "reqps"),
        Panel("HTTP calls/s", [(rate("ray_serve_num_http_requests_total",
                                     "application, route", APP),
                                "{{application}} {{route}}")], "reqps",
              "HTTP calls by route (the method variable is a gRPC method: not applied)."),
        Panel("gRPC errors/s by code", [(rate("ray_serve_num_grpc_error_requests_total",
                                              "application, error_code", f"{APP}, {METHOD}"),
                                         "{{application}} {{error_code}}")], "reqps",
              "Every non-OK status, the caller's (CANCELLED, INVALID_ARGUMENT, NOT_FOUND...) "
              "included. Calls to an application that does not exist are `unknown`."),
        Panel("HTTP errors/s by code", [(rate("ray_serve_num_http_error_requests_total",
                                              "application, error_code", APP),
                                         "{{application}} {{error_code}}")], "reqps",
              "Every non-200 answer."),
        Panel("gRPC error ratio (server-side codes)", [(
            f'sum by (application) (rate(ray_serve_num_grpc_error_requests_total{{{APP}, '
            f'{METHOD}, error_code=~"{SERVER_CODES}"}}[{RI}])) / sum by (application) '
            f'(rate(ray_serve_num_grpc_requests_total{{{APP}, {METHOD}}}[{RI}]))',
            "{{application}}")], "percentunit",
            f"Calls that failed with {SERVER_CODE_NAMES.replace('|', ', ')}, over all calls: what "
            "the GatewayHighErrorRatio alert watches (5% for 5 minutes by default)."),
        Panel("HTTP error ratio (5xx)", [(
            f'sum by (application) (rate(ray_serve_num_http_error_requests_total{{{APP}, '
            f'error_code=~"5.."}}[{RI}])) / sum by (application) '
            f'(rate(ray_serve_num_http_requests_total{{{APP}}}[{RI}]))',
            "{{application}}")], "percentunit"),
        Panel("gRPC latency", quantiles("ray_serve_grpc_request_latency_ms",
                                        "application, method", f"{APP}, {METHOD}",
                                        "{{application}} {{method}}"), "ms",
              "End to end, measured by the gateway, per application and method; a streaming "
              "call counts from its start to its last message (alert GatewayHighLatencyP99 "
              "watches streaming methods apart)."),
        Panel("HTTP latency", quantiles("ray_serve_http_request_latency_ms",
                                        "application, route", APP,
                                        "{{application}} {{route}}"), "ms"),
        Panel("Ongoing gRPC calls", [("sum by (instance) (ray_serve_num_ongoing_grpc_requests)",
                                      "{{instance}}")], "short",
              "Calls in the gateway (the gRPC proxy) right now, per gateway."),
        Panel("Ongoing HTTP calls", [("sum by (instance) (ray_serve_num_ongoing_http_requests)",
                                      "{{instance}}")], "short"),
        Row("Deployments"),
        Panel("Healthy replicas per deployment", [(
            f"sum by (application, deployment) "
            f"(ray_serve_deployment_replica_healthy{{{APP}, {DEP}}})",
            "{{application}}/{{deployment}}")], "short",
            "Replicas passing their health checks; 0 means every call of the deployment gets "
            "UNAVAILABLE (alert GatewayNoHealthyReplica)."),
        Panel("Queued calls per deployment", [(
            f"sum by (application, deployment) "
            f"(ray_serve_deployment_queued_queries{{{APP}, {DEP}}})",
            "{{application}}/{{deployment}}")], "short",
            "Calls waiting for a replica because every replica has max_ongoing_requests in "
            "flight; past max_queued_requests calls get RESOURCE_EXHAUSTED."),
    ],
)

_REPLICA = f"{APP}, {DEP}"
DEPLOYMENT = Dashboard(
    "grpc-gateway-deployment", "Deployment and replica (grpc-gateway)",
    "Per replica: calls, errors, processing latency, calls in flight, health, restarts, "
    "memory, multiplexed models.",
    ["application", "deployment"],
    [
        Row("Traffic"),
        Panel("Calls/s per replica", [(rate("ray_serve_deployment_request_counter_total",
                                            "application, deployment, replica", _REPLICA),
                                       "{{replica}}")], "reqps"),
        Panel("Replica errors/s", [(rate("ray_serve_deployment_error_counter_total",
                                         "application, deployment, replica", _REPLICA),
                                    "{{replica}}")], "reqps",
              "Calls the replica failed (not the caller's cancels or deadlines)."),
        Panel("gRPC errors/s by code per deployment", [(
            rate("ray_serve_num_deployment_grpc_error_requests_total",
                 "application, deployment, error_code", _REPLICA),
            "{{application}}/{{deployment}} {{error_code}}")], "reqps"),
        Panel("Processing latency per replica", quantiles(
            "ray_serve_deployment_processing_latency_ms", "application, deployment, replica",
            _REPLICA, "{{replica}}"), "ms"),
        Row("Replicas"),
        Panel("Calls in flight per replica", [
            (f"sum by (application, deployment, replica) "
             f"(ray_serve_replica_processing_queries{{{_REPLICA}}})", "processing {{replica}}"),
            (f"sum by (application, deployment, replica) "
             f"(ray_serve_replica_pending_queries{{{_REPLICA}}})", "pending {{replica}}"),
        ], "short"),
        Panel("Replica health", [(
            f"sum by (application, deployment, replica) "
            f"(ray_serve_deployment_replica_healthy{{{_REPLICA}}})", "{{replica}}")], "short",
            "1 healthy, 0 failing its health checks or (re)starting."),
        Panel("Restarts in 10 minutes", [(restarts_in_10m(_REPLICA), "{{replica}}")], "short",
              "What the GatewayReplicaRestarts alert watches (more than 3 by default), counted "
              "exactly. Ray Serve gives a restarted replica a new id, so there this stays at 0."),
        Panel("Memory per replica", [
            (f"sum by (instance, Component, pid) "
             f"(ray_component_rss_mb{{{REPLICA_COMPONENT}}}) * 1e6",
             "RSS {{Component}} pid {{pid}} {{instance}}"),
            (f"sum by (instance, Component, pid) (ray_component_rss_mb{{{REPLICA_COMPONENT}}} "
             f"* 1e6 - ray_component_mem_shared_bytes{{{REPLICA_COMPONENT}}})",
             "RSS - shared {{Component}} pid {{pid}} {{instance}}"),
        ], "bytes", "Local replica processes, per gateway (pids repeat across containers): "
                    "resident set size, and without shared memory (what the process itself "
                    "holds)."),
        Row("Multiplexed models"),
        Panel("Multiplexed models loaded", [(
            f"sum by (application, deployment, replica) "
            f"(ray_serve_num_multiplexed_models{{{_REPLICA}}})", "{{replica}}")], "short"),
        Panel("Model loads and unloads/s", [
            (rate("ray_serve_multiplexed_models_load_counter_total",
                  "application, deployment, replica", _REPLICA), "load {{replica}}"),
            (rate("ray_serve_multiplexed_models_unload_counter_total",
                  "application, deployment, replica", _REPLICA), "unload {{replica}}"),
        ], "ops"),
        Panel("Model load latency", quantiles(
            "ray_serve_multiplexed_model_load_latency_ms", "application, deployment",
            _REPLICA, "{{application}}/{{deployment}}"), "ms"),
    ],
)

_EXP = 'exporter=~"$exporter"'
RECORDS = Dashboard(
    "grpc-gateway-records", "Prediction records (grpc-gateway)",
    "Prediction records on their way to Arize (or JSONL): exported, failed, retried and dropped "
    "by exporter and reason; queue and intake depth.",
    ["exporter"],
    [
        Row("Delivery"),
        Panel("Records exported/s", [(rate("grpc_gateway_records_exported_total", "exporter",
                                           _EXP), "{{exporter}}")], "ops", ray=False),
        Panel("Records failed/s", [(rate("grpc_gateway_records_failed_total", "exporter", _EXP),
                                    "{{exporter}}")], "ops",
              "Refused by the destination, or retries ran out (alert GatewayRecordsFailing).",
              ray=False),
        Panel("Delivery retries/s", [(rate("grpc_gateway_records_retries_total", "exporter",
                                           _EXP), "{{exporter}}")], "ops",
              "Extra attempts after connection errors, 429 and 5xx: a slow or failing "
              "destination shows here first.", ray=False),
        Panel("Records dropped in 10 minutes by exporter and reason", [(
            dropped_in_10m("exporter, reason", f'{_EXP}, exporter!=""'),
            "{{exporter}} {{reason}}")], "short",
            "Records an exporter never sent (queue_full, shutdown, exporter_unavailable, "
            "invalid): what the GatewayRecordsDropped alert counts.", ray=False),
        Panel("Sampled calls dropped in 10 minutes before any exporter, by reason", [(
            dropped_in_10m("reason", 'exporter=""'), "{{reason}}")], "short",
            "Sampled calls that made no record, or lost rows (payload_too_large, queue_full of "
            "the intake, decode_error, mapper_error, too_many_rows): what the "
            "GatewayRecordsDropped alert counts.", ray=False),
        Row("Queues"),
        Panel("Exporter queue depth", [(
            f"max by (instance, exporter) (grpc_gateway_records_queue_depth{{{_EXP}}})",
            "{{exporter}} {{instance}}")], "short",
            "Records waiting for their exporter; at queue_size new records are dropped.",
            ray=False),
        Panel("Intake depth", [("max by (instance) (grpc_gateway_records_intake_depth)",
                                "{{instance}}")], "short",
              "Sampled calls waiting to be decoded into records; at records.queue_size calls "
              "are dropped.", ray=False),
    ],
)

_GM = 'grpc_method=~"$method"'
PROCESS = Dashboard(
    "grpc-gateway-process", "Gateway process (grpc-gateway)",
    "The gateway process itself: CPU, memory, and the standard gRPC server metrics of gRFC A66.",
    ["method"],
    [
        Row("Process"),
        Panel("CPU", [(f"sum by (instance, pid) (ray_component_cpu_percentage"
                       f"{{{GATEWAY_COMPONENT}}})", "{{instance}} pid {{pid}}")], "percent",
              "CPU of the gateway process (100% = one core)."),
        Panel("Memory", [
            (f"sum by (instance, pid) (ray_component_rss_mb{{{GATEWAY_COMPONENT}}}) * 1e6",
             "RSS {{instance}} pid {{pid}}"),
            (f"sum by (instance, pid) (ray_component_rss_mb{{{GATEWAY_COMPONENT}}} * 1e6 - "
             f"ray_component_mem_shared_bytes{{{GATEWAY_COMPONENT}}})",
             "RSS - shared {{instance}} pid {{pid}}"),
        ], "bytes"),
        Row("gRPC server (gRFC A66)"),
        Panel("Calls started/s", [(rate("grpc_server_call_started_total", "grpc_method", _GM),
                                   "{{grpc_method}}")], "reqps", ray=False),
        Panel("Calls/s by status", [(rate("grpc_server_call_duration_seconds_count",
                                          "grpc_method, grpc_status", _GM),
                                     "{{grpc_method}} {{grpc_status}}")], "reqps", ray=False),
        Panel("Call duration", quantiles("grpc_server_call_duration_seconds", "grpc_method", _GM,
                                         "{{grpc_method}}"), "s", ray=False),
        Panel("Message bytes per call", [
            (per_call("grpc_server_call_rcvd_total_compressed_message_size_bytes", _GM),
             "received {{grpc_method}}"),
            (per_call("grpc_server_call_sent_total_compressed_message_size_bytes", _GM),
             "sent {{grpc_method}}"),
        ], "bytes", "Average bytes of the request and response messages of a call.", ray=False),
    ],
)

DASHBOARDS = [OVERVIEW, DEPLOYMENT, RECORDS, PROCESS]

VARIABLE_QUERIES = {
    "application": "label_values(ray_serve_deployment_replica_healthy, application)",
    "deployment": 'label_values(ray_serve_deployment_replica_healthy{application=~"$application"}, '
                  "deployment)",
    "method": "label_values(ray_serve_num_grpc_requests_total{application=~\"$application\"}, "
              "method)",
    "exporter": "label_values(grpc_gateway_records_exported_total, exporter)",
}
"""Where each variable's values come from (the process dashboard's `method` is A66's)."""
PROCESS_METHOD_QUERY = "label_values(grpc_server_call_started_total, grpc_method)"


# -- JSON ---------------------------------------------------------------------------------------


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": name.capitalize(), "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
        "includeAll": True, "allValue": ".*", "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "refresh": 2, "regex": "", "sort": 1, "hide": 0, "skipUrlSync": False,
    }


def _templating(d: Dashboard) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{
        "name": "datasource", "label": "Data source", "type": "datasource",
        "query": "prometheus", "current": {}, "options": [], "refresh": 1, "regex": "",
        "hide": 0, "includeAll": False, "multi": False, "skipUrlSync": False,
    }]
    for name in d.variables:
        query = VARIABLE_QUERIES[name]
        if d is PROCESS and name == "method":
            query = PROCESS_METHOD_QUERY
        out.append(_variable(name, query))
    return out


def _panel(p: Panel, pid: int, x: int, y: int, height: int) -> dict[str, Any]:
    description = p.description
    if p.ray:
        description = (description + " " if description else "") + "Also fills on Ray Serve."
    return {
        "id": pid, "type": p.kind, "title": p.title, "description": description,
        "datasource": DS, "gridPos": {"h": height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": p.unit, "min": 0,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                           "showPoints": "never", "spanNulls": False},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
             "range": True, "instant": False, "editorMode": "code"}
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def build(d: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model of `d` (ids and grid positions assigned in order)."""
    panels: list[dict[str, Any]] = []
    x = y = 0
    height = 8
    for pid, item in enumerate(d.items, start=1):
        if isinstance(item, Row):
            if x:
                x, y = 0, y + height
            panels.append({"id": pid, "type": "row", "title": item.title, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
            continue
        if x + item.width > 24:
            x, y = 0, y + height
        panels.append(_panel(item, pid, x, y, height))
        x += item.width
    kinds = sorted({p["type"] for p in panels if p["type"] != "row"})
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": k, "name": k, "version": ""} for k in kinds),
        ],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "description": d.description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"type": "dashboards", "title": "Gateway dashboards", "tags": [TAG],
                   "asDropdown": True, "includeVars": True, "keepTime": True,
                   "icon": "external link", "targetBlank": False, "tooltip": "", "url": ""}],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": [TAG, "ray-serve"],
        "templating": {"list": _templating(d)},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": d.title,
        "uid": d.uid,
        "version": 1,
        "weekStart": "",
    }


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{d.uid}.json": json.dumps(build(d), indent=2) + "\n" for d in DASHBOARDS}


def main(argv: list[str]) -> int:
    stale = [name for name, text in rendered().items()
             if not (HERE / name).exists() or (HERE / name).read_text() != text]
    if "--check" in argv:
        for name in stale:
            print(f"{name} is stale: run python deploy/grafana/dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    for name, text in rendered().items():
        (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
