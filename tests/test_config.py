"""Config files: validation errors name the file, the key path and what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env or {})
    msg = str(e.value)
    assert msg.startswith(str(path))
    return msg


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "examples" / "serve_config.yaml", env={})
    assert (cfg.proxy.host, cfg.proxy.port) == ("127.0.0.1", 9000)
    iris = cfg.application("classifier")
    assert iris is not None
    dep = iris.ingress_deployment
    assert (dep.name, dep.num_replicas, dep.max_ongoing_requests) == ("Iris", 2, 5)
    assert dep.user_config == {"threshold": 0.5}


def test_issue_example_shape_with_external_targets(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
proxy: {host: 127.0.0.1, port: 9000}
applications:
  - name: classifier
    deployments:
      - name: Iris
        import_path: examples.models:Iris
        num_replicas: 2
        max_ongoing_requests: 5
        user_config: {threshold: 0.5}
  - name: external
    deployments:
      - name: Remote
        targets: ["127.0.0.1:50051"]
"""), env={})
    ext = cfg.application("external")
    assert ext is not None and ext.ingress_deployment.targets == ["127.0.0.1:50051"]
    assert not ext.ingress_deployment.is_local


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "proxy:\n  port: [1,\n")
    assert "invalid YAML" in msg and "line" in msg


def test_wrong_type_names_key_path(tmp_path: Path) -> None:
    msg = error_of(tmp_path, """
applications:
  - name: a
    deployments:
      - name: D
        import_path: m:C
        num_replicas: many
""")
    assert "applications[0].deployments[0].num_replicas" in msg
    assert "integer" in msg


def test_unknown_key_and_missing_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, """
proxy: {prot: 9000}
applications:
  - name: a
    deployments: [{name: D}]
""")
    assert "proxy.prot: unknown key" in msg
    assert "applications[0].deployments[0]: set exactly one of 'import_path'" in msg


def test_duplicates_and_bad_values(tmp_path: Path) -> None:
    msg = error_of(tmp_path, """
proxy: {port: 70000}
applications:
  - {name: a, deployments: [{name: D, targets: ["127.0.0.1:1"]}]}
  - {name: a, deployments: [{name: D, import_path: "nocolon"}]}
""")
    assert "proxy.port" in msg
    assert "import_path 'nocolon' must look like 'module:Class'" in msg


def test_duplicate_application_names(tmp_path: Path) -> None:
    msg = error_of(tmp_path, """
applications:
  - {name: a, deployments: [{name: D, targets: ["127.0.0.1:1"]}]}
  - {name: a, deployments: [{name: D, targets: ["127.0.0.1:2"]}]}
""")
    assert "duplicate application names: ['a']" in msg


def test_env_expansion_and_missing_variable(tmp_path: Path) -> None:
    text = """
records:
  arize: {api_key: "${ARIZE_API_KEY}", space_id: "${SPACE:-default-space}"}
applications:
  - {name: a, deployments: [{name: D, targets: ["127.0.0.1:${PORT}"]}]}
"""
    cfg = load_config(write(tmp_path, text), env={"ARIZE_API_KEY": "k-123", "PORT": "5005"})
    assert cfg.records.arize.api_key is not None
    assert cfg.records.arize.api_key.get_secret_value() == "k-123"
    assert cfg.records.arize.space_id is not None
    assert cfg.records.arize.space_id.get_secret_value() == "default-space"
    assert cfg.applications[0].deployments[0].targets == ["127.0.0.1:5005"]
    # Secrets stay out of dumps.
    assert "k-123" not in str(cfg.redacted()) and "k-123" not in repr(cfg)

    msg = error_of(tmp_path, text, env={"ARIZE_API_KEY": "k"})
    assert "applications[0].deployments[0].targets[0]" in msg
    assert "${PORT} is not set" in msg


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["a"], "x.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_cli_check_reports_errors_with_exit_code(tmp_path: Path) -> None:
    bad = write(tmp_path, "applications: [{name: a, deployments: []}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(bad)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert out.returncode == 2
    assert "applications[0].deployments" in out.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(REPO / "examples/serve_config.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout


def test_default_applies_to_a_variable_set_but_empty(tmp_path: Path) -> None:
    text = 'admin: {token: "${TOKEN:-fallback}"}\n'
    cfg = load_config(write(tmp_path, text), env={"TOKEN": ""})
    assert cfg.admin.token is not None and cfg.admin.token.get_secret_value() == "fallback"
    # Plain ${VAR} keeps an empty value, as a shell does: here that is an empty token.
    msg = error_of(tmp_path, 'admin: {token: "${TOKEN}"}\n', env={"TOKEN": ""})
    assert "admin.token is empty" in msg


def test_admin_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "admin: {host: 0.0.0.0}\n")
    assert "needs a token" in msg
    cfg = load_config(write(tmp_path, "admin: {host: 0.0.0.0, token: t0k3n}\n"), env={})
    assert cfg.admin.host == "0.0.0.0"


def test_listeners_need_distinct_ports(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "proxy: {port: 9100}\nadmin: {port: 9100}\n")
    assert "admin.port 9100 is also proxy.port" in msg
    msg = error_of(tmp_path, "admin: {port: 9200}\nmetrics: {prometheus: {port: 9200}}\n")
    assert "metrics.prometheus.port 9200 is also admin.port" in msg
    # Port 0 (any free port) several times is fine.
    load_config(write(tmp_path, "proxy: {port: 0}\nadmin: {port: 0}\n"), env={})


def test_an_expanded_value_is_never_echoed_in_an_error(tmp_path: Path) -> None:
    text = """
applications:
  - name: t
    ingress: "${ARIZE_API_KEY}"
    deployments: [{name: D, import_path: "examples.models:TextModel"}]
"""
    msg = error_of(tmp_path, text, env={"ARIZE_API_KEY": "sk-live-SECRET-1234"})
    assert "sk-live-SECRET-1234" not in msg
    assert "${ARIZE_API_KEY}" in msg


def test_values_that_cannot_run_are_refused_by_check(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "proxy: {max_message_bytes: 3000000000}\n")
    assert "proxy.max_message_bytes" in msg
    msg = error_of(tmp_path, "metrics: {latency_buckets_ms: [100, 5, 1]}\n")
    assert "strictly increasing" in msg
    msg = error_of(tmp_path, """
applications:
  - {name: t, deployments: [{name: D, targets: ["", "no port here"]}]}
""")
    assert "target '' must look like 'host:port'" in msg
    msg = error_of(tmp_path, """
applications:
  - {name: t, deployments: [{name: D, targets: ["127.0.0.1:1"], num_replicas: 5}]}
""")
    assert "num_replicas 5 would be ignored" in msg
    for bad in (":", "mod:", ":Cls", "a b:C"):
        msg = error_of(tmp_path, f"""
applications:
  - {{name: t, deployments: [{{name: D, import_path: "{bad}"}}]}}
""")
        assert "must look like 'module:Class'" in msg
    msg = error_of(tmp_path, """
applications:
  - {name: "x\\ny", deployments: [{name: D, import_path: "m:C"}]}
""")
    assert "contains control characters" in msg


def test_cli_check_finds_a_module_that_does_not_exist(tmp_path: Path) -> None:
    bad = write(tmp_path, """
applications:
  - {name: t, deployments: [{name: D, import_path: "no.such.module:Nope"}]}
""")
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(bad)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert "module 'no.such.module' not found" in out.stderr


def test_escaped_forms_of_an_expanded_value_are_masked_and_dollar_brace_escapes() -> None:
    from gateway.config_source import hide_values

    used = {"K": "sk-Abc\\d3f'SECRET\t\u00e9"}
    for message in (repr(used["K"]), ascii(used["K"]), json.dumps(used["K"]), used["K"]):
        masked = hide_values(f"bad value {message} here", used)
        assert "SECRET" not in masked and "${K}" in masked, masked
    cfg = parse_config({"admin": {"token": "$${NOT_A_VAR}x"}}, env={})
    assert cfg.admin.token is not None
    assert cfg.admin.token.get_secret_value() == "${NOT_A_VAR}x"


def test_cli_check_masks_values_in_module_errors_and_reports_a_raising_package(
        tmp_path: Path) -> None:
    pkg = tmp_path / "raisingpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('broken package init')\n")
    path = write(tmp_path, """
proto_modules: ["${MOD}"]
applications:
  - {name: t, deployments: [{name: D, import_path: "raisingpkg.models:Model"}]}
""")
    env = {**os.environ, "MOD": "sk-AbcdSECRET", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(path)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "SECRET" not in out.stderr and "module '${MOD}' not found" in out.stderr
    assert "deployment 'D': import_path" in out.stderr
    assert "RuntimeError: broken package init" in out.stderr


def test_loopback_is_an_address_not_a_prefix_and_ports_collide_per_host(
        tmp_path: Path) -> None:
    for host in ("localhost.evil.example", "127.evil.example", "::", "0.0.0.0", "::ffff:1"):
        assert "needs a token" in error_of(tmp_path, f'admin: {{host: "{host}"}}\n'), host
    for host, bare in (("[::1]", "::1"), ("::1", "::1"), ("127.0.0.2", "127.0.0.2"),
                       ("localhost", "localhost")):
        cfg = load_config(write(tmp_path, f'admin: {{host: "{host}"}}\n'), env={})
        assert cfg.admin.host == bare
    # The same port on two different addresses is two listeners; all interfaces is not.
    load_config(write(tmp_path, 'proxy: {host: 127.0.0.1, port: 9300}\n'
                                'admin: {host: 127.0.0.2, port: 9300}\n'), env={})
    msg = error_of(tmp_path, 'proxy: {host: 0.0.0.0, port: 9300, }\n'
                             'admin: {host: 127.0.0.2, port: 9300}\n')
    assert "admin.port 9300 is also proxy.port" in msg
    msg = error_of(tmp_path, 'proxy: {host: "[::1]", port: 9300}\n'
                             'admin: {host: "::1", port: 9300}\n')
    assert "admin.port 9300 is also proxy.port" in msg


def test_user_config_must_be_plain_json() -> None:
    """It reaches replicas as JSON: a YAML date was accepted, then failed every start and
    reconfigure of the deployment."""
    import datetime

    dep = {"name": "M", "import_path": "examples.models:TextModel"}
    for bad in ({"since": datetime.date(2026, 1, 2)}, {"tags": {1, 2}}):
        with pytest.raises(ConfigError, match="user_config must be plain JSON data"):
            parse_config({"applications": [{"name": "a", "deployments": [
                {**dep, "user_config": bad}]}]})
    ok = parse_config({"applications": [{"name": "a", "deployments": [
        {**dep, "user_config": {"n": 1, "xs": [1.5, "a", None, True]}}]}]})
    assert ok.applications[0].deployments[0].user_config == {"n": 1,
                                                             "xs": [1.5, "a", None, True]}


def test_user_config_keys_must_be_strings_at_any_depth() -> None:
    """JSON turns 0 into "0": a model looking up labels[0] would not find it."""
    dep = {"name": "M", "import_path": "examples.models:TextModel"}
    for bad in ({"labels": {0: "cat", 1: "dog"}}, {"flags": [{True: "on"}]},
                {"a": {"b": {"c": {2.5: "x"}}}}):
        with pytest.raises(ConfigError, match="is not a string"):
            parse_config({"applications": [{"name": "a", "deployments": [
                {**dep, "user_config": bad}]}]})
    # Too deep: a clear error, not a RecursionError traceback from `gateway check`.
    for depth, says in ((150, "plain JSON data"), (2000, "nested too deeply")):
        deep: dict[str, object] = {}
        node = deep
        for _ in range(depth):
            node["k"] = {}
            node = node["k"]  # type: ignore[assignment]
        with pytest.raises(ConfigError, match=says):
            parse_config({"applications": [{"name": "a", "deployments": [
                {**dep, "user_config": deep}]}]})
