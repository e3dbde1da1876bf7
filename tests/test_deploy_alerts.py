"""deploy/prometheus/: the alerting rules pass `promtool check rules`, their unit tests pass
`promtool test rules` and cover every alert both firing and not firing, and the example
prometheus.yml is a valid config that loads them. (That the metrics they name are the ones a
real gateway exports is checked in test_deploy_dashboards.py, against a real scrape.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yaml"
UNIT_TESTS = PROM_DIR / "alerts_test.yaml"
CONFIG = PROM_DIR / "prometheus.yml"
PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None
)
# Under CI the binary is installed by .ci/run: a missing one must fail, never skip.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool is not installed (apt-get install prometheus)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool missing (CI installs the Debian package)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=PROM_DIR)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def metrics_of(expr: str) -> set[str]:
    """Metric names (not label names: those are followed by a matcher)."""
    return set(re.findall(r"\b(?:ray_\w+|grpc_\w+)\b(?!\s*[=!])|\bup\b(?=\s*[{\[)])", expr))


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    r = promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    r = promtool("test", "rules", str(UNIT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    """For each rule (an alert name may have several, told apart by their labels: protocol,
    calls): a case where it fires, and one where the series it reads are there and it must
    not."""
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yaml"]
    for rule in rules():
        name = rule["alert"]
        kind = {k: v for k, v in rule["labels"].items() if k != "severity"}
        wanted = metrics_of(rule["expr"])
        assert wanted, rule["expr"]
        fires = silent = False
        for group in tests["tests"]:
            series = {s["series"].split("{")[0] for s in group["input_series"]}
            if not wanted & series:
                continue
            for case in group.get("alert_rule_test", []):
                if case["alertname"] != name:
                    continue
                mine = [a for a in case["exp_alerts"]
                        if all(a["exp_labels"].get(k) == v for k, v in kind.items())]
                fires |= bool(mine) and all(
                    a["exp_labels"]["severity"] == rule["labels"]["severity"] for a in mine)
                silent |= not case["exp_alerts"] and (wanted <= series)
        assert fires, f"{name} {kind} has no unit test where it fires"
        assert silent, f"{name} {kind} has no unit test where its series do not fire it"


def test_every_alert_has_a_severity_and_runbook_text() -> None:
    names = set()
    for rule in rules():
        names.add(rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert len(rule["annotations"].get(key, "").strip()) > 20, (rule["alert"], key)
    assert names == {
        "GatewayHighErrorRatio", "GatewayHighLatencyP99", "GatewayNoHealthyReplica",
        "GatewayReplicaRestarts", "GatewayRecordsFailing", "GatewayRecordsDropped",
        "GatewayTargetDown", "GatewayTargetMissing",
    }


@needs_promtool
def test_example_prometheus_config_is_valid_and_loads_the_rules() -> None:
    r = promtool("check", "config", str(CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "grpc-gateway"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert len(targets) > 1  # the example shows several gateways
    # The scrape-target alerts name the example's job.
    jobs = {m for rule in rules() for m in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert jobs == {"grpc-gateway"}


def test_readme_lists_every_alert_and_dashboard() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Dashboards and alerts", 1)[1].split("\n## ", 1)[0]
    for name in {r["alert"] for r in rules()}:
        assert f"`{name}`" in section, name
    for path in (ROOT / "deploy" / "grafana").glob("*.json"):
        assert path.name in section, path.name


# Drop reasons at the time of writing; any other `dropped["..."]` in the code counts too.
KNOWN_DROP_REASONS = {"queue_full", "shutdown", "exporter_unavailable", "invalid",
                      "payload_too_large", "decode_error", "mapper_error", "too_many_rows",
                      "too_many_messages", "capture_budget"}


def test_records_dropped_runbook_explains_every_reason_the_gateway_emits() -> None:
    emitted = set(KNOWN_DROP_REASONS)
    for path in [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "exporters").rglob("*.py")]:
        emitted |= set(re.findall(r"""dropped\[\s*["'](\w+)["']\s*\]""", path.read_text()))
    (rule,) = [r for r in rules() if r["alert"] == "GatewayRecordsDropped"]
    runbook = rule["annotations"]["runbook"]
    readme = (ROOT / "README.md").read_text()
    (row,) = [line for line in readme.split("## Dashboards and alerts", 1)[1].splitlines()
              if line.startswith("| `GatewayRecordsDropped`")]
    for reason in sorted(emitted):
        assert re.search(rf"\b{reason}:", runbook), f"runbook lacks {reason}"
        assert f"`{reason}`" in row, f"README lacks {reason}"
    # The intake's queue is records.queue_size, and it fills because decoding is too slow.
    intake = runbook.split("Without an exporter", 1)[1]
    assert "records.queue_size" in intake and "decoding" in intake
