"""Property-based fuzzing of the config schema: a valid config with one field broken (a wrong
type, an out-of-range number, an unknown key, a required key removed, a `${VAR}` that is
not set, control characters) gets exit 2 from `gateway check`, with the file and the path of
the bad field in the message, and never a traceback."""

from __future__ import annotations

import copy
import io
import math
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import EXIT_OK, EXIT_USAGE, main

BASE: dict[str, Any] = {
    "proxy": {"host": "127.0.0.1", "port": 9000, "max_message_bytes": 4194304,
              "request_timeout_s": 30.0, "retries": 2, "graceful_shutdown_timeout_s": 5.0,
              "local_transport": "mux"},
    "admin": {"host": "127.0.0.1", "port": 9001, "token": "s3cret"},
    "metrics": {"enabled": True, "prometheus": {"enabled": True, "port": 8080},
                "otlp": {"enabled": False, "endpoint": "http://127.0.0.1:4317",
                         "interval_s": 10.0},
                "latency_buckets_ms": [1, 5, 10, 100]},
    "logging_config": {"log_level": "INFO", "encoding": "TEXT", "logs_dir": "logs",
                       "max_bytes": 1000000, "backup_count": 2},
    "records": {"queue_size": 1000, "batch_size": 50, "flush_interval_s": 1.0},
    "applications": [
        {"name": "text",
         "deployments": [{"name": "TextModel", "import_path": "examples.models:TextModel",
                          "num_replicas": 2, "max_ongoing_requests": 5,
                          "health_check_period_s": 2.0, "user_config": {"prefix": "x"}}],
         "prediction_records": {"enabled": True, "sample_rate": 0.5,
                                "field_mapping": {"features": ["text"],
                                                  "prediction_label": "label"}}},
        {"name": "remote",
         "deployments": [{"name": "Ext", "targets": ["127.0.0.1:7000"],
                          "health_check_timeout_s": 1.0}]},
    ],
}

# Values that are wrong for (almost) any field of the schema above.
BAD_VALUES = st.one_of(
    st.sampled_from([None, -1, -(2**40), 2**63, math.nan, math.inf, "", "\x00\x1b[2J",
                     "${GATEWAY_FUZZ_UNSET_VAR}", [], [1, "a", None], {}, {"?": 1}, True,
                     "not a number", 1e308, "127.0.0.1:notaport"]),
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.lists(st.integers(), max_size=3),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(BASE)


def _loc(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _set(data: Any, path: tuple[Any, ...], value: Any, op: str) -> None:
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "unknown_key" and isinstance(parent, dict):
        parent[f"{last}_typo"] = value


def check(tmp: Path, data: Any) -> tuple[int, str]:
    path = tmp / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            rc = main(["check", str(path)])
        except SystemExit as e:  # argparse; never expected here
            rc = int(e.code or 0)
    return rc, err.getvalue()


def test_the_base_config_is_valid(tmp_path: Path) -> None:
    rc, err = check(tmp_path, BASE)
    assert rc == EXIT_OK, err


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=BAD_VALUES,
       op=st.sampled_from(["replace", "replace", "replace", "delete", "unknown_key"]))
def test_every_invalid_config_exits_2_with_the_bad_fields_path(
        tmp_path: Path, path: tuple[Any, ...], value: Any, op: str) -> None:
    data = copy.deepcopy(BASE)
    _set(data, path, value, op)
    rc, err = check(tmp_path, data)
    assert "Traceback" not in err, err
    if rc == EXIT_OK:
        return  # the change happened to be valid (a string that is a fine name, ...)
    assert rc == EXIT_USAGE, (rc, err)
    assert "invalid config" in err and "fuzz.yaml" in err, err
    target = _loc((*path[:-1], f"{path[-1]}_typo") if op == "unknown_key" else path)
    locs = re.findall(r"fuzz\.yaml: ([^:\s]+)", err)
    # The message points at the field, at the object that holds it (a rule across its
    # fields), or inside it (a list or mapping put where a value belongs). Rules across the
    # whole file (two listeners on one port) name the file's root.
    related = [loc for loc in locs
               if loc == "<root>" or target.startswith(loc) or loc.startswith(target)]
    assert related, f"{target}: {err}"
    assert "s3cret" not in err
