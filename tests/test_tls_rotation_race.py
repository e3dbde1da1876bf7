"""A rotation racing a re-read never leaves a key that does not match the certificate."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.tls import ServerTLS, ServerTLSConfig
from tests.tls_support import CA, read


def _atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def _matches(cert: bytes, key: bytes) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = x509.load_pem_x509_certificate(cert).public_key().public_bytes(*spki)
    priv = serialization.load_pem_private_key(key, None)
    return pub == priv.public_key().public_bytes(*spki)


def test_reload_during_rotation_keeps_a_matching_pair(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    live = ca.issue("server")
    pairs = [(read(p.key_file), read(p.cert_file)) for p in (ca.issue("a"), ca.issue("b"))]
    tls = ServerTLS(ServerTLSConfig(cert_file=live.cert_file, key_file=live.key_file),
                    "proxy.tls")
    stop = threading.Event()

    def rotate() -> None:
        i = 0
        while not stop.is_set() and i < 200_000:
            key, cert = pairs[i % 2]
            _atomic(live.key_file, key)  # key first: a window with a mismatched pair
            _atomic(live.cert_file, cert)
            i += 1

    th = threading.Thread(target=rotate)
    th.start()
    bad = 0
    try:
        end = time.monotonic() + 3
        n = 0
        while time.monotonic() < end and n < 5000:
            tls.reload()
            n += 1
            cert, key, _ = tls._material
            bad += not _matches(cert, key)
            ctx = tls._build_ssl()  # the HTTP side loads the same bytes
            assert ctx is not None
    finally:
        stop.set()
        th.join(10)
    assert bad == 0
