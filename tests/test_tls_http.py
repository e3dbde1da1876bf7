"""TLS and mTLS on the HTTP ingress (`http.tls`) and the dashboard (`dashboard.tls`), with real
clients (requests, curl) and certificates made at run time (tests/tls_support.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from examples.models import classify
from gateway.admin.status import build_status
from gateway.config import ConfigError, parse_config
from tests.http_support import ROWS, call, infer_body, iris, text
from tests.test_admin import cli
from tests.tls_support import CA, Pair, key_body

INFER = "/iris/v2/models/iris/infer"


def https(gw: Any, path: str) -> str:
    assert gw.http is not None and gw.http.port
    return f"https://localhost:{gw.http.port}{path}"


def tls_block(server: Pair, ca: CA | None = None) -> dict[str, str]:
    out = {"cert_file": server.cert_file, "key_file": server.key_file}
    if ca is not None:
        out["client_ca_file"] = ca.ca_file
    return out


async def refused_by(address: str, **kw: Any) -> Exception:
    """The request fails at the connection (the handshake), never with an HTTP answer."""
    try:
        r = await call("GET", address, **kw)
    except (requests.exceptions.SSLError, requests.exceptions.ConnectionError) as e:
        return e
    raise AssertionError(f"answered {r.status_code}: {r.text[:200]}")


async def test_https_rest_infer_and_a_plaintext_client_fails_fast(
        start_gateway: Any, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    http = {"enabled": True, "port": 0, "tls": tls_block(server)}
    async with start_gateway([iris(), text()], http=http) as gw:
        assert gw.http.tls is not None and not gw.http.tls.mutual
        assert gw.http.address == f"https://127.0.0.1:{gw.http.port}"
        r = await call("POST", https(gw, INFER), json=infer_body(), verify=ca.ca_file)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [classify(row)[0] for row in ROWS]
        # A plaintext request on the TLS port: an error at once, not a hang.
        start = time.monotonic()
        try:
            r = await call("GET", f"http://127.0.0.1:{gw.http.port}/v2/health/ready")
            assert r.status_code >= 400
        except requests.exceptions.ConnectionError:
            pass
        assert time.monotonic() - start < 5
        # A client that does not trust the CA refuses the server.
        other = CA(tmp_path / "other", "other-ca")
        await refused_by(https(gw, "/v2/health/ready"), verify=other.ca_file)
        # The status lists the HTTP ingress under its https URL.
        proxies = build_status(gw).to_dict(verbose=True)["proxies"]
        assert any(p["address"] == gw.http.address for p in proxies.values()), proxies
        r = await call("GET", https(gw, "/v2/health/ready"), verify=ca.ca_file)
        assert r.status_code == 200


async def test_https_mtls_refuses_no_certificate_and_another_cas(
        start_gateway: Any, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    good = ca.issue("client", names=("client-a",), client=True)
    stranger = CA(tmp_path / "stranger", "stranger-ca").issue("intruder", ("intruder",),
                                                              client=True)
    http = {"enabled": True, "port": 0, "tls": tls_block(server, ca)}
    async with start_gateway([iris()], http=http) as gw:
        assert gw.http.tls is not None and gw.http.tls.mutual
        ready = https(gw, "/v2/health/ready")
        r = await call("POST", https(gw, INFER), json=infer_body(), verify=ca.ca_file,
                       cert=(good.cert_file, good.key_file))
        assert r.status_code == 200, r.text
        await refused_by(ready, verify=ca.ca_file)
        await refused_by(ready, verify=ca.ca_file, cert=(stranger.cert_file,
                                                         stranger.key_file))
        r = await call("GET", ready, verify=ca.ca_file, cert=(good.cert_file, good.key_file))
        assert r.status_code == 200


async def test_https_rotation_is_picked_up_without_a_restart(
        start_gateway: Any, tmp_path: Path) -> None:
    old_ca, new_ca = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    server = old_ca.issue("server")
    http = {"enabled": True, "port": 0, "tls": tls_block(server)}
    async with start_gateway([iris()], http=http) as gw:
        ready = https(gw, "/v2/health/ready")
        assert (await call("GET", ready, verify=old_ca.ca_file)).status_code == 200
        new_ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        # Each new connection (requests opens one per call here) sees the new files.
        assert (await call("GET", ready, verify=new_ca.ca_file)).status_code == 200
        assert gw.http.tls.reloads == 1
        await refused_by(ready, verify=old_ca.ca_file)


async def test_dashboard_over_mtls_beyond_loopback_host_names(
        start_gateway: Any, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    browser = ca.issue("browser", names=("ops",), client=True)
    dash = {"enabled": True, "port": 0, "tls": tls_block(server, ca)}
    http = {"enabled": True, "port": 0, "tls": tls_block(server)}
    async with start_gateway([iris()], http=http, dashboard=dash) as gw:
        d = gw.dashboard
        assert d is not None and d.server.tls is not None and d.server.tls.mutual
        assert d.url == f"https://127.0.0.1:{d.port}"
        base = f"https://localhost:{d.port}"
        mine = {"verify": ca.ca_file, "cert": (browser.cert_file, browser.key_file)}
        r = await call("GET", base + "/api/gateway/overview", **mine)
        assert r.status_code == 200, r.text
        assert r.json()["addresses"]["http"] == gw.http.address
        assert gw.http.address.startswith("https://")
        # mTLS is the check: a Host name that is not loopback (behind a name) is answered.
        r = await call("GET", base + "/", headers={"Host": "gateway.example.com"}, **mine)
        assert r.status_code == 200 and "<html" in r.text.lower()
        await refused_by(base + "/api/gateway/overview", verify=ca.ca_file)
        # The gateway log as the dashboard serves it carries no key material.
        r = await call("GET", base + "/api/gateway/logs?component=gateway&limit=500", **mine)
        assert r.status_code == 200
        page = r.text + (await call("GET", base + "/", **mine)).text
    for line in key_body(server) + key_body(browser):
        assert line not in page


async def test_dashboard_over_tls_with_a_token_sets_a_secure_cookie(
        start_gateway: Any, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    token = "s3cret-dashboard-token"
    dash = {"enabled": True, "port": 0, "tls": tls_block(server)}
    async with start_gateway([iris()], admin={"port": 0, "token": token},
                             dashboard=dash) as gw:
        base = f"https://localhost:{gw.dashboard.port}"
        r = await call("GET", base + "/api/gateway/overview", verify=ca.ca_file)
        assert r.status_code == 401
        r = await call("GET", base + "/api/gateway/overview", verify=ca.ca_file,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        r = await call("POST", base + "/login", data={"token": token, "next": "/"},
                       verify=ca.ca_file, allow_redirects=False)
        assert r.status_code == 302
        cookie = r.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and token not in cookie


def test_tls_rules_for_the_http_and_dashboard_ports() -> None:
    tls = {"cert_file": "/x/cert.pem", "key_file": "/x/key.pem"}
    mutual = {**tls, "client_ca_file": "/x/ca.pem"}
    # The dashboard beyond loopback: admin.token, or client certificates (mTLS).
    parse_config({"dashboard": {"enabled": True, "host": "0.0.0.0", "tls": mutual}})
    parse_config({"admin": {"token": "t"},
                  "dashboard": {"enabled": True, "host": "0.0.0.0", "tls": tls}})
    with pytest.raises(ConfigError, match=r"needs admin.token or dashboard.tls.client_ca_file"):
        parse_config({"dashboard": {"enabled": True, "host": "0.0.0.0", "tls": tls}})
    with pytest.raises(ConfigError, match=r"http.tls.key_file: Field required"):
        parse_config({"http": {"enabled": True, "tls": {"cert_file": "/x"}}})
    with pytest.raises(ConfigError, match=r"dashboard.tls.nope"):
        parse_config({"dashboard": {"tls": {**tls, "nope": 1}}})
    # Loopback stays the default for both.
    cfg = parse_config({"http": {"enabled": True, "tls": tls},
                        "dashboard": {"enabled": True, "tls": tls}})
    assert cfg.http.host == "127.0.0.1" and cfg.dashboard.host == "127.0.0.1"


async def test_gateway_check_names_unusable_http_and_dashboard_files(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server, other = ca.issue("server"), ca.issue("other")
    path = tmp_path / "gw.yaml"
    mismatched = {"cert_file": server.cert_file, "key_file": other.key_file}
    path.write_text(yaml.safe_dump({"http": {"enabled": True, "tls": mismatched},
                                    "dashboard": {"enabled": True,
                                                  "tls": {**tls_block(server),
                                                          "client_ca_file": str(tmp_path)}}}))
    rc, out, err = await cli("check", str(path))
    assert rc == 2, (out, err)
    assert "http.tls" in err and "dashboard.tls.client_ca_file" in err, err
    assert "Traceback" not in err
    for line in key_body(other) + key_body(server):
        assert line not in err + out
    path.write_text(yaml.safe_dump({"http": {"enabled": True, "tls": tls_block(server)},
                                    "dashboard": {"enabled": True,
                                                  "tls": tls_block(server, ca)}}))
    rc, out, err = await cli("check", str(path))
    assert rc == 0, err


def test_gateway_run_says_https_and_serves_curl_and_sighup(tmp_path: Path) -> None:
    from tests.ops_support import GatewayProcess

    ca, new_ca = CA(tmp_path / "pki"), CA(tmp_path / "new", "new-ca")
    server = ca.issue("server")
    browser = ca.issue("browser", names=("ops",), client=True)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "proxy": {"port": 0}, "admin": {"port": 0}, "metrics": {"prometheus": {"port": 0}},
        "http": {"enabled": True, "port": 0, "tls": tls_block(server)},
        "dashboard": {"enabled": True, "port": 0, "tls": tls_block(server, ca)},
        "logging_config": {"logs_dir": str(tmp_path / "logs")},
        "applications": [iris()]}))
    gp = GatewayProcess(cfg)
    try:
        http = gp.wait_for(r"serving HTTP on (https://127\.0\.0\.1:\d+) \(TLS\)", 10)
        dash = gp.wait_for(r"dashboard on (https://127\.0\.0\.1:\d+) \(mTLS\)", 10)

        def curl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["curl", "-sS", "-m", "10", *args], capture_output=True,
                                  text=True, timeout=20, check=False)

        port = http.rsplit(":", 1)[1]
        base = f"https://localhost:{port}"
        out = curl("--cacert", ca.ca_file, "-X", "POST", base + INFER,
                   "-H", "Content-Type: application/json", "-d", json.dumps(infer_body()))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["outputs"][0]["data"] == [classify(r)[0] for r in ROWS]
        dport = dash.rsplit(":", 1)[1]
        out = curl("--cacert", ca.ca_file, f"https://localhost:{dport}/api/gateway/overview")
        assert out.returncode != 0  # no client certificate: refused at the handshake
        out = curl("--cacert", ca.ca_file, "--cert", browser.cert_file, "--key",
                   browser.key_file, f"https://localhost:{dport}/api/gateway/overview")
        assert out.returncode == 0 and json.loads(out.stdout)["addresses"]["http"] == http
        # SIGHUP re-reads both listeners' files at once.
        new_ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        gp.proc.send_signal(signal.SIGHUP)
        gp.wait_for(r"http\.tls: certificate files (re-read)", 10)
        gp.wait_for(r"dashboard\.tls: certificate files (re-read)", 10)
        out = curl("--cacert", new_ca.ca_file, base + "/v2/health/ready")
        assert out.returncode == 0, out.stderr
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait(30) == 0
    finally:
        gp.kill()
    logs = gp.console() + "".join(p.read_text(errors="replace")
                                  for p in (tmp_path / "logs").rglob("*") if p.is_file())
    for line in key_body(server) + key_body(browser):
        assert line not in logs


async def test_a_dashboard_with_unusable_tls_files_does_not_start(
        start_gateway: Any, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server, other = ca.issue("server"), ca.issue("other")
    dash = {"enabled": True, "port": 0,
            "tls": {"cert_file": server.cert_file, "key_file": other.key_file}}
    with pytest.raises(OSError, match=r"dashboard\.tls"):
        async with start_gateway([iris()], dashboard=dash):
            pass
    await asyncio.sleep(0)
