"""Failed TLS handshakes (plaintext clients, scanners) do not flood the gateway's stderr."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.tls_support import CA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plaintext_connections_to_a_tls_port_add_no_stderr_lines(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server")
    port = _free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"""
proxy: {{port: {port}, tls: {{cert_file: {server.cert_file}, key_file: {server.key_file}}}}}
admin: {{port: 0}}
metrics: {{enabled: false}}
logging_config: {{logs_dir: {tmp_path}/logs}}
applications: []
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    err_path, out_path = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(cfg)],
                                stdout=out, stderr=err, env=env,
                                cwd=Path(__file__).parents[1])
        try:
            for _ in range(300):
                if b"gateway listening" in out_path.read_bytes() + err_path.read_bytes():
                    break
                assert proc.poll() is None, err_path.read_text()
                time.sleep(0.1)
            else:
                raise AssertionError("the gateway did not start: " + err_path.read_text())
            time.sleep(0.3)
            before = err_path.read_bytes().count(b"\n")
            for _ in range(200):
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    c.settimeout(1)
                    try:
                        c.recv(100)
                    except OSError:
                        pass
            time.sleep(1)
            data = err_path.read_bytes()
            added = data.count(b"\n") - before
            assert added <= 2, data.decode(errors="replace")[-2000:]
        finally:
            proc.terminate()
            proc.wait(30)
