"""TLS and mTLS on the gRPC listener, the admin service, HTTP contexts and to external replicas,
with certificates made at run time (tests/tls_support.py)."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from examples.models import TextModel
from gateway.admin.client import status as gateway_status
from gateway.admin.service import AdminUnreachable
from gateway.admin.status import build_status
from gateway.config import ConfigError, parse_config
from gateway.tls import ClientTLSConfig, ServerTLSConfig, reload_all, server_ssl_context
from tests.conftest import TEXT_APP, external_replica, gateway_config, md, running_gateway
from tests.test_admin import cli
from tests.tls_support import CA, Pair, key_body, overwrite, read

PredictRequest = __import__("gateway.pb.text_model_pb2", fromlist=["x"]).PredictRequest


def tls_channel(address: str, ca: CA | None, client: Pair | None = None,
                server_name: str | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        ca.pem if ca else None,
        read(client.key_file) if client else None,
        read(client.cert_file) if client else None)
    opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(address, creds, options=opts)


async def predict(channel: grpc.aio.Channel, timeout: float = 5.0) -> str:
    from gateway.pb import text_model_pb2_grpc

    stub = text_model_pb2_grpc.TextModelStub(channel)
    resp = await stub.Predict(PredictRequest(text="hello"), metadata=md("text"),
                              timeout=timeout)
    return str(resp.label)


async def refused(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await predict(channel)
    await channel.close()
    return err.value


def with_tls(tmp: Path, **top: Any) -> Any:
    return gateway_config([TEXT_APP], tmp, **top)


async def test_tls_call_succeeds_and_a_plaintext_client_fails_fast(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    config = with_tls(tmp_path, proxy={"port": 0, "tls": {"cert_file": server.cert_file,
                                                         "key_file": server.key_file}})
    async with running_gateway(config, tmp_path) as gw:
        assert gw.tls is not None and not gw.tls.mutual
        async with tls_channel(gw.address, ca) as ch:
            assert (await predict(ch)).startswith("")
        start = time.monotonic()
        async with grpc.aio.insecure_channel(gw.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await predict(plain, timeout=10)
        took = time.monotonic() - start
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
        assert took < 5, f"a plaintext client waited {took:.1f}s for its error"
        # A client that does not trust the CA is refused at the handshake.
        other = CA(tmp_path / "other")
        err2 = await refused(tls_channel(gw.address, other))
        assert err2.code() is grpc.StatusCode.UNAVAILABLE
        # The gateway still serves after all that.
        async with tls_channel(gw.address, ca) as ch:
            await predict(ch)


async def test_mtls_refuses_no_certificate_and_another_cas(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    good = ca.issue("client", names=("client-a",), client=True)
    stranger = CA(tmp_path / "stranger", "stranger-ca").issue("intruder", ("intruder",),
                                                              client=True)
    config = with_tls(tmp_path, proxy={"port": 0, "tls": {
        "cert_file": server.cert_file, "key_file": server.key_file,
        "client_ca_file": ca.ca_file}})
    async with running_gateway(config, tmp_path) as gw:
        assert gw.tls is not None and gw.tls.mutual
        async with tls_channel(gw.address, ca, good) as ch:
            await predict(ch)
        no_cert = await refused(tls_channel(gw.address, ca))
        assert no_cert.code() is grpc.StatusCode.UNAVAILABLE
        wrong_ca = await refused(tls_channel(gw.address, ca, stranger))
        assert wrong_ca.code() is grpc.StatusCode.UNAVAILABLE
        async with tls_channel(gw.address, ca, good) as ch:
            await predict(ch)


async def test_rotation_picks_up_a_new_certificate_without_a_restart(tmp_path: Path) -> None:
    old_ca, new_ca = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    server = old_ca.issue("server")
    config = with_tls(tmp_path, proxy={"port": 0, "tls": {"cert_file": server.cert_file,
                                                         "key_file": server.key_file}})
    async with running_gateway(config, tmp_path) as gw:
        assert gw.tls is not None
        async with tls_channel(gw.address, old_ca) as ch:
            await predict(ch)
        # Rotate in place: same paths, a certificate from another CA.
        new_ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        async with tls_channel(gw.address, new_ca) as ch:
            await predict(ch)
        assert gw.tls.reloads == 1
        err = await refused(tls_channel(gw.address, old_ca))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        # A broken rotation (a key that does not match) keeps the last good certificate.
        other = new_ca.issue("other")
        overwrite(server.key_file, read(other.key_file))
        async with tls_channel(gw.address, new_ca) as ch:
            await predict(ch)
        assert gw.tls.reload_failures == 1
        # SIGHUP's path: a forced re-read; the files are fixed now.
        new_ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        assert reload_all() >= 1
        assert gw.tls.reloads == 2
        async with tls_channel(gw.address, new_ca) as ch:
            await predict(ch)


async def test_an_expired_certificate_is_refused_by_the_client(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    expired = ca.issue("server", expired=True)
    config = with_tls(tmp_path, proxy={"port": 0, "tls": {"cert_file": expired.cert_file,
                                                         "key_file": expired.key_file}})
    async with running_gateway(config, tmp_path) as gw:
        err = await refused(tls_channel(gw.address, ca))
        assert err.code() is grpc.StatusCode.UNAVAILABLE


async def test_external_replica_over_mtls_with_server_name(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    replica_cert = ca.issue("replica", names=("replica.internal",))
    gw_client = ca.issue("gateway-client", names=("gateway",), client=True)
    creds = grpc.ssl_server_credentials(
        [(read(replica_cert.key_file), read(replica_cert.cert_file))],
        root_certificates=ca.pem, require_client_auth=True)
    async with external_replica(TextModel(), tls=creds) as (_, port):
        dep = {"name": "Ext", "targets": [f"127.0.0.1:{port}"],
               "health_check_period_s": 0.2,
               "tls": {"ca_file": ca.ca_file, "cert_file": gw_client.cert_file,
                       "key_file": gw_client.key_file, "server_name": "replica.internal"}}
        config = gateway_config([{"name": "text", "deployments": [dep]}], tmp_path)
        async with running_gateway(config, tmp_path) as gw:
            async with grpc.aio.insecure_channel(gw.address) as ch:
                await predict(ch)
            # Without the name override, 127.0.0.1 is not in the certificate: the new
            # replica never becomes healthy, the roll stops, the old one keeps serving.
            bad = {**dep, "tls": {**dep["tls"], "server_name": None}}
            problems = await gw.apply(gateway_config([{"name": "text", "deployments": [bad]}],
                                                     tmp_path))
            assert any("Hostname Verification" in p for p in problems), problems
            async with grpc.aio.insecure_channel(gw.address) as ch:
                await predict(ch)
        # Without the gateway's client certificate the replica refuses the gateway.
        anon = {**dep, "tls": {"ca_file": ca.ca_file, "server_name": "replica.internal"}}
        config = gateway_config([{"name": "text", "deployments": [anon]}], tmp_path)
        async with running_gateway(config, tmp_path) as gw:
            slot = gw.controller.apps["text"].ingress.slots[0]
            assert slot.state.name == "UNHEALTHY" and "UNAVAILABLE" in slot.message


async def test_admin_over_mtls_with_the_cli_and_gateway_status(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    client = ca.issue("operator", names=("operator",), client=True)
    config = with_tls(tmp_path, admin={"port": 0, "tls": {
        "cert_file": server.cert_file, "key_file": server.key_file,
        "client_ca_file": ca.ca_file}})
    async with running_gateway(config, tmp_path) as gw:
        address = f"127.0.0.1:{gw.admin_port}"
        tls = ClientTLSConfig(ca_file=ca.ca_file, cert_file=client.cert_file,
                              key_file=client.key_file)
        st = await asyncio.to_thread(gateway_status, address, None, 10.0, tls)
        assert st.applications["text"].status == "RUNNING"
        with pytest.raises(AdminUnreachable):
            await asyncio.to_thread(gateway_status, address, None, 5.0)
        rc, out, err = await cli("status", "--address", address, "--ca-file", ca.ca_file,
                                 "--cert-file", client.cert_file, "--key-file",
                                 client.key_file)
        assert rc == 0, err
        assert "text" in out
        rc, out, err = await cli("status", "--address", address, "--timeout", "5")
        assert rc == 3 and "--ca-file" in err
        rc, out, err = await cli("config", "--address", address, "--ca-file", ca.ca_file,
                                 "--cert-file", client.cert_file, "--key-file",
                                 client.key_file)
        assert rc == 0, err
        dumped = out + yaml.safe_dump(gw.config.redacted())
        assert server.key_file in dumped  # the path is shown...
        for line in key_body(server):  # ...never the key
            assert line not in dumped


def test_tls_config_rules(tmp_path: Path) -> None:
    tls = {"cert_file": "/x/cert.pem", "key_file": "/x/key.pem"}
    # The admin service beyond loopback: a token, or client certificates (mTLS).
    parse_config({"admin": {"host": "10.1.2.3", "tls": {**tls, "client_ca_file": "/x/ca"}}})
    parse_config({"admin": {"host": "10.1.2.3", "token": "t", "tls": tls}})
    with pytest.raises(ConfigError, match=r"admin: .*needs a token or tls.client_ca_file"):
        parse_config({"admin": {"host": "10.1.2.3", "tls": tls}})
    with pytest.raises(ConfigError, match=r"proxy.tls.key_file: Field required"):
        parse_config({"proxy": {"tls": {"cert_file": "/x"}}})
    local = {"name": "a", "deployments": [{"name": "d", "import_path": "m:C",
                                           "tls": {"ca_file": "/x"}}]}
    with pytest.raises(ConfigError, match=r"'tls' is for external replicas"):
        parse_config({"applications": [local]})
    half = {"name": "a", "deployments": [{"name": "d", "targets": ["h:1"],
                                          "tls": {"cert_file": "/x"}}]}
    with pytest.raises(ConfigError, match=r"both 'cert_file' and 'key_file'"):
        parse_config({"applications": [half]})


async def test_gateway_check_and_start_name_unusable_files_without_quoting_them(
        tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server, other = ca.issue("server"), ca.issue("other")
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"proxy": {"tls": {"cert_file": server.cert_file,
                                                      "key_file": other.key_file}}}))
    rc, out, err = await cli("check", str(path))
    assert rc == 2 and "proxy.tls" in err and other.key_file in err, err
    assert "Traceback" not in err
    for line in key_body(other):
        assert line not in err + out
    path.write_text(yaml.safe_dump({"proxy": {"tls": {"cert_file": str(tmp_path / "nope"),
                                                      "key_file": other.key_file}}}))
    rc, _, err = await cli("check", str(path))
    assert rc == 2 and "nope" in err
    config = with_tls(tmp_path, proxy={"port": 0, "tls": {"cert_file": server.cert_file,
                                                         "key_file": other.key_file}})
    from gateway.app import Gateway

    gw = Gateway(config, logs_dir=tmp_path / "logs")
    with pytest.raises(OSError, match=r"proxy\.tls"):
        await gw.start(ready_timeout=5)


async def test_key_material_is_in_no_log_line_or_status(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    config = with_tls(tmp_path, proxy={"port": 0, "tls": {
        "cert_file": server.cert_file, "key_file": server.key_file,
        "client_ca_file": ca.ca_file}})
    async with running_gateway(config, tmp_path) as gw:
        # A failed and a good rotation: both are logged.
        overwrite(server.key_file, b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
        await refused(tls_channel(gw.address, ca))
        ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        reload_all()
        text = build_status(gw).to_yaml(verbose=True) + yaml.safe_dump(gw.config.redacted())
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*")
                   if p.is_file())
    assert "keeping the current certificate" in logs
    for line in [*key_body(server), "garbage"]:
        assert line not in logs and line not in text


async def test_http_ssl_context_serves_mtls_and_follows_rotation(tmp_path: Path) -> None:
    """The context an HTTP server (aiohttp) gets: checked here with asyncio's TLS server."""
    ca, new_ca = CA(tmp_path / "pki"), CA(tmp_path / "new", "new-ca")
    server = ca.issue("server")
    client = ca.issue("client", ("client",), client=True)
    ctx = server_ssl_context(ServerTLSConfig(cert_file=server.cert_file,
                                             key_file=server.key_file,
                                             client_ca_file=ca.ca_file), "http.tls")

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"ok")
        await w.drain()
        w.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]

    async def fetch(trust: CA, cert: Pair | None) -> bytes:
        c = ssl.create_default_context(cafile=trust.ca_file)
        if cert is not None:
            c.load_cert_chain(cert.cert_file, cert.key_file)
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="localhost"), 5)
        try:
            return await asyncio.wait_for(r.read(), 5)
        finally:
            w.close()

    try:
        assert await fetch(ca, client) == b"ok"
        # No client certificate: refused. TLS 1.3 clients learn it after their side of the
        # handshake, as an alert or the connection closing, before any answer.
        try:
            assert await fetch(ca, None) == b""
        except (ssl.SSLError, ConnectionError):
            pass
        new_ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        assert await fetch(new_ca, client) == b"ok"
        with pytest.raises(ssl.SSLError):
            await fetch(ca, client)  # the old certificate is gone
        try:  # and client certificates are still required on the new context
            assert await fetch(new_ca, None) == b""
        except (ssl.SSLError, ConnectionError):
            pass
    finally:
        srv.close()
        await srv.wait_closed()


def test_sighup_rereads_the_certificates_of_a_running_gateway(tmp_path: Path) -> None:
    import signal

    from tests.ops_support import GatewayProcess

    old_ca, new_ca = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    server = old_ca.issue("server")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "proxy": {"port": 0, "tls": {"cert_file": server.cert_file,
                                     "key_file": server.key_file}},
        "admin": {"port": 0}, "metrics": {"prometheus": {"port": 0}},
        "logging_config": {"logs_dir": str(tmp_path / "logs")},
        "applications": [TEXT_APP]}))
    gp = GatewayProcess(cfg)
    try:
        assert "(TLS)" in gp.console()

        def call(ca: CA) -> str:
            creds = grpc.ssl_channel_credentials(ca.pem)
            from gateway.pb import text_model_pb2_grpc

            with grpc.secure_channel(gp.address, creds) as ch:
                return str(text_model_pb2_grpc.TextModelStub(ch).Predict(
                    PredictRequest(text="good"), metadata=md("text"), timeout=10).label)

        assert call(old_ca) == "positive"
        new_ca.issue("server", cert_path=Path(server.cert_file), key_path=Path(server.key_file))
        gp.proc.send_signal(signal.SIGHUP)
        gp.wait_for(r"proxy\.tls: certificate files (re-read)", 10)
        assert gp.proc.poll() is None  # SIGHUP does not stop it
        assert call(new_ca) == "positive"
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait(30) == 0
    finally:
        gp.kill()
    for line in key_body(server):
        assert line not in gp.console()


def test_an_encrypted_key_is_refused_with_a_message_not_a_passphrase_prompt(
        tmp_path: Path) -> None:
    """OpenSSL's default is to prompt on the terminal: `gateway run` from a shell hung."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from gateway.tls import files_problems

    ca = CA(tmp_path / "pki")
    pair = ca.issue("server")
    key = load_pem_private_key(read(pair.key_file), None)
    overwrite(pair.key_file, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    server = ServerTLSConfig(cert_file=pair.cert_file, key_file=pair.key_file)
    client = ClientTLSConfig(ca_file=ca.ca_file, cert_file=pair.cert_file,
                             key_file=pair.key_file)
    for problems in (files_problems(server, "proxy.tls"), files_problems(client, "x.tls")):
        assert len(problems) == 1 and "is encrypted" in problems[0], problems
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    (problem,) = files_problems(ClientTLSConfig(ca_file=str(not_pem)), "x.tls")
    assert "x.tls.ca_file" in problem and "no PEM" in problem


async def test_a_deploy_with_unreadable_tls_files_changes_nothing(tmp_path: Path) -> None:
    from gateway.config_source import DeployError

    config = gateway_config([TEXT_APP], tmp_path)
    async with running_gateway(config, tmp_path) as gw:
        ext = {"name": "text", "deployments": [{
            "name": "Ext", "targets": ["127.0.0.1:1"],
            "tls": {"ca_file": str(tmp_path / "missing-ca.pem")}}]}
        with pytest.raises(DeployError, match=r"deployments\[0\]\.tls\.ca_file: cannot read"):
            await gw.apply(gateway_config([ext], tmp_path))
        assert gw.config is config
        async with grpc.aio.insecure_channel(gw.address) as ch:
            await predict(ch)
