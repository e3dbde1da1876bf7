"""HTTP ingress settings: the `http` block, `route_prefix`, the demo config, `gateway status`,
`gateway run` printing the address, a deploy changing prefixes, the port taken."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

import gateway
from gateway.config import ConfigError, load_config
from tests.http_support import HTTP, PREDICT, call, text, url
from tests.ops_support import REPO, GatewayProcess
from tests.test_admin import admin_address, cli


def error_of(tmp_path: Path, text: str) -> str:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    return str(e.value)


APPS = """
applications:
  - name: a
    route_prefix: {a}
    deployments: [{{name: D, import_path: "examples.models:TextModel"}}]
  - name: b
    route_prefix: {b}
    deployments: [{{name: D, import_path: "examples.models:TextModel"}}]
"""


def test_http_block_and_route_prefix_validation(tmp_path: Path) -> None:
    cfg = load_config(REPO / "examples" / "serve_config.yaml", env={})
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port) == (True, "127.0.0.1", 8000)
    assert {a.name: a.route_prefix for a in cfg.applications} == {
        "classifier": "/classifier", "text": "/text", "tenants": None}
    p = tmp_path / "d.yaml"
    p.write_text("{}\n")
    default = load_config(p, env={}).http
    assert (default.enabled, default.host, default.port) == (False, "127.0.0.1", 8000)
    msg = error_of(tmp_path, "proxy: {port: 8000}\nhttp: {enabled: true}\n")
    assert "http.port 8000 is also proxy.port" in msg
    # Off, its port is not taken.
    p.write_text("proxy: {port: 8000}\nhttp: {enabled: false}\n")
    load_config(p, env={})
    assert "duplicate route_prefix values: ['/x']" in error_of(
        tmp_path, APPS.format(a="/x", b="/x"))
    for bad in ("x", "/x/", "/a b", "//x", "/{model}"):
        msg = error_of(tmp_path, APPS.format(a=f'"{bad}"', b="/ok"))
        assert "route_prefix" in msg and "must start with '/'" in msg, bad
    p.write_text(APPS.format(a="/", b="/b/c"))
    load_config(p, env={})


async def test_status_lists_the_http_proxy(start_gateway: Any) -> None:
    async with start_gateway([text(None)], http=HTTP) as gw:
        st = await asyncio.to_thread(gateway.status, admin_address(gw))
        assert gw.http is not None
        assert {p.address: p.status for p in st.proxies.values()} == {
            gw.address: "HEALTHY", f"http://127.0.0.1:{gw.http.port}": "HEALTHY"}
        assert any(node.endswith("/http") for node in st.proxies)
        rc, out, _ = await cli("status", "-a", admin_address(gw))
        assert rc == 0 and list(yaml.safe_load(out)["proxies"].values()) == ["HEALTHY"] * 2


async def test_a_deploy_changes_route_prefixes(start_gateway: Any, tmp_path: Path) -> None:
    async with start_gateway([text("/old")], http=HTTP) as gw:
        assert (await call("POST", url(gw, "/old" + PREDICT), json={})).status_code == 200
        new = gw.config.model_copy(update={"applications": [
            a.model_copy(update={"route_prefix": "/new"}) for a in gw.config.applications]})
        assert await gw.apply(new) == []
        assert (await call("POST", url(gw, "/new" + PREDICT), json={})).status_code == 200
        # One application: no prefix needed either.
        assert (await call("POST", url(gw, PREDICT), json={})).status_code == 200
        assert (await call("POST", url(gw, "/old" + PREDICT), json={})).status_code == 404


async def test_a_taken_http_port_fails_the_start_clearly(
    start_gateway: Any, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(http\\)"):
            async with start_gateway([text(None)], http={"enabled": True, "port": port}):
                pass


def test_gateway_run_prints_the_http_address(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "proxy": {"port": 0}, "admin": {"port": 0}, "metrics": {"enabled": False},
        "http": {"enabled": True, "port": 0},
        "logging_config": {"logs_dir": str(tmp_path / "logs")},
        "applications": [text("/t")]}))
    proc = GatewayProcess(cfg)
    try:
        address = proc.wait_for(r"serving HTTP on (http://\S+)", 30)
        assert address.startswith("http://127.0.0.1:")
    finally:
        proc.proc.terminate()
        proc.wait(30)
