"""TLS for every listener and for calls to external replicas: one config model, re-read files.

Server side (`tls: {cert_file, key_file, client_ca_file}`), one `ServerTLS` per listener:
- `grpc_credentials()` for a grpc server: grpc's dynamic credentials, whose fetcher runs on
  each new connection's handshake (in a grpc core thread) and hands grpc the files' new
  contents once they changed (a `stat` per handshake; nothing per call).
- `ssl_context()` for an HTTP server (aiohttp `web.TCPSite(..., ssl_context=...)`): its SNI
  callback, run on each handshake, switches the connection to a context built from the new
  files once they changed.
- `reload()` re-reads at once (SIGHUP: `reload_all()`). A rotation that leaves the files
  unreadable or mismatched (a key written before its certificate) is logged and the last good
  material keeps serving; the next change is tried again.
With `client_ca_file` the listener requires a client certificate signed by that CA (mTLS).

Client side (`tls: {ca_file, cert_file, key_file, server_name}`): `ClientTLS` gives grpc
channel credentials and options, read when the channel is made.

Key material is read into memory only: never logged, never in an exception or a status (the
paths are; a path is not a secret).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import weakref
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.dataplane.listen_address import grpc_address, is_loopback

log = logging.getLogger("gateway.tls")


class TLSError(OSError):
    """TLS files that cannot be used; the message names the config key and the path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerTLSConfig(_Model):
    """TLS on a listener (`proxy.tls`, `admin.tls`, `http.tls`, `dashboard.tls`)."""

    cert_file: str = Field(min_length=1)
    """PEM certificate chain the listener presents (leaf first)."""
    key_file: str = Field(min_length=1)
    """PEM private key of that certificate."""
    client_ca_file: str | None = Field(default=None, min_length=1)
    """PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."""


class ClientTLSConfig(_Model):
    """TLS to an upstream (per deployment, for external replicas; the admin client)."""

    ca_file: str | None = Field(default=None, min_length=1)
    """PEM CA bundle that verifies the server (default: the system's roots)."""
    cert_file: str | None = Field(default=None, min_length=1)
    """Client certificate chain for mTLS (with key_file)."""
    key_file: str | None = Field(default=None, min_length=1)
    server_name: str | None = Field(default=None, min_length=1)
    """Name checked against the server's certificate instead of the target's host."""

    @model_validator(mode="after")
    def _pair(self) -> ClientTLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both 'cert_file' and 'key_file' (a client certificate), "
                             "or neither")
        return self


def _read(where: str, key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSError(f"{where}.{key}: cannot read {path}: {e.strerror or type(e).__name__}"
                       ) from None
    if b"-----BEGIN" not in data:
        raise TLSError(f"{where}.{key}: {path} holds no PEM data")
    return data


def file_stamp(paths: list[str]) -> tuple[Any, ...]:
    """What tells a file changed: inode, size and mtime (None for a file that is gone)."""
    return _stamp(paths)


def _stamp(paths: list[str]) -> tuple[Any, ...]:
    out: list[Any] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    # Without a callback OpenSSL prompts for the passphrase on the terminal: a gateway
    # started from a shell would hang at start-up (or at a rotation) waiting for it.
    raise _Encrypted


def _load_pair(ctx: ssl.SSLContext, where: str, cert_file: str, key_file: str,
               from_files: tuple[str, str] | None = None) -> None:
    """Certificate and key load and match (ssl says so without quoting either).
    `from_files`: load these instead (the same contents); messages name the configured paths."""
    load_cert, load_key = from_files or (cert_file, key_file)
    try:
        ctx.load_cert_chain(load_cert, load_key, password=_no_passphrase)
    except _Encrypted:
        raise TLSError(f"{where}.key_file: {key_file} is encrypted; the gateway takes "
                       "an unencrypted key (protect the file instead)") from None
    except ssl.SSLError as e:
        raise TLSError(f"{where}: {cert_file} and {key_file} are not a usable "
                       f"certificate and key ({e.reason or 'unreadable'})") from None
    except OSError as e:
        raise TLSError(f"{where}: cannot load {cert_file} / {key_file}: "
                       f"{e.strerror or type(e).__name__}") from None


def _memory_file(data: bytes) -> int:
    """An anonymous in-memory file holding `data` (Linux memfd): never on disk."""
    fd = os.memfd_create("gateway-tls", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def _load_material_pair(ctx: ssl.SSLContext, where: str, cfg: ServerTLSConfig, cert: bytes,
                        key: bytes) -> None:
    """Load `cert` and `key` (bytes already read) into `ctx` (the files where there is no
    memfd)."""
    if not hasattr(os, "memfd_create"):
        _load_pair(ctx, where, cfg.cert_file, cfg.key_file)
        return
    fds = [_memory_file(cert), _memory_file(key)]
    try:
        _load_pair(ctx, where, cfg.cert_file, cfg.key_file,
                   from_files=(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"))
    finally:
        for fd in fds:
            os.close(fd)


def _check_material(where: str, cfg: ServerTLSConfig,
                    material: tuple[bytes, bytes, bytes | None]) -> None:
    """`_check_pair` on the very bytes that will be used: a rotation between checking and
    reading cannot leave a key that does not match the certificate in use."""
    if not hasattr(os, "memfd_create"):  # not Linux: the files, as read just before
        _check_pair(where, cfg)
        return
    cert, key, ca = material
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_material_pair(ctx, where, cfg, cert, key)
    if ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as e:
            why = getattr(e, "reason", None) or "unreadable"
            raise TLSError(f"{where}.client_ca_file: {cfg.client_ca_file} is not a usable "
                           f"CA bundle ({why})") from None


def _check_pair(where: str, cfg: ServerTLSConfig) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_pair(ctx, where, cfg.cert_file, cfg.key_file)
    if cfg.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cfg.client_ca_file)
        except (ssl.SSLError, OSError) as e:
            why = getattr(e, "reason", None) or getattr(e, "strerror", None) or "unreadable"
            raise TLSError(f"{where}.client_ca_file: {cfg.client_ca_file} is not a usable "
                           f"CA bundle ({why})") from None


_LIVE: weakref.WeakSet[ServerTLS] = weakref.WeakSet()
_CLIENT_GENERATION = [0]


def client_generation() -> int:
    """Bumped by each `reload_all()`: external replicas' channels are made again
    (gateway/control/tls_watch.py)."""
    return _CLIENT_GENERATION[0]


def reload_all() -> int:
    """Re-read the files of every live listener and, on their next health check, of every
    external replica's channel (SIGHUP); returns how many listeners changed."""
    _CLIENT_GENERATION[0] += 1
    return sum(1 for t in list(_LIVE) if t.reload())


class ServerTLS:
    """A listener's certificate, key and client CA, re-read when the files change."""

    def __init__(self, cfg: ServerTLSConfig, where: str) -> None:
        self.cfg = cfg
        self.where = where
        self.reloads = 0
        """Successful re-reads after the first load."""
        self.reload_failures = 0
        self._lock = threading.Lock()
        self._paths = [p for p in (cfg.cert_file, cfg.key_file, cfg.client_ca_file) if p]
        self._stamp = _stamp(self._paths)
        self._failed_stamp: tuple[Any, ...] | None = None
        self._material = self._load()  # raises TLSError: a listener never starts without
        self._served: object | None = None  # the material grpc last got from the fetcher
        self._ssl: ssl.SSLContext | None = None
        _LIVE.add(self)

    @property
    def mutual(self) -> bool:
        return self.cfg.client_ca_file is not None

    def _load(self) -> tuple[bytes, bytes, bytes | None]:
        cert = _read(self.where, "cert_file", self.cfg.cert_file)
        key = _read(self.where, "key_file", self.cfg.key_file)
        ca = (_read(self.where, "client_ca_file", self.cfg.client_ca_file)
              if self.cfg.client_ca_file else None)
        material = (cert, key, ca)
        _check_material(self.where, self.cfg, material)  # checks the bytes it keeps
        return material

    def _refresh(self, force: bool = False) -> bool:
        """Re-read if the files changed (or `force`); True when new material is in use."""
        with self._lock:
            stamp = _stamp(self._paths)
            if not force and (stamp == self._stamp or stamp == self._failed_stamp):
                return False
            try:
                material = self._load()
            except TLSError as e:
                if stamp != self._failed_stamp:
                    self.reload_failures += 1
                    log.warning("%s: keeping the current certificate: %s", self.where, e)
                self._failed_stamp = stamp
                return False
            self._stamp, self._failed_stamp = stamp, None
            if material == self._material:
                return False
            self._material = material
            self._ssl = None
            self.reloads += 1
            log.info("%s: certificate files re-read (%s)", self.where, self.cfg.cert_file)
            return True

    def reload(self) -> bool:
        return self._refresh(force=True)

    # -- grpc ---------------------------------------------------------------------------

    def _grpc_config(self) -> Any:
        cert, key, ca = self._material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> Any:
        # grpc core thread, once per handshake. Return None to keep the current config.
        try:
            self._refresh()
            material = self._material
            if material is self._served:
                return None
            self._served = material
            return self._grpc_config()
        except Exception:  # never let a rotation problem take the listener down
            log.exception("%s: certificate check failed", self.where)
            return None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        self._served = self._material
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(), self._fetch, require_client_authentication=self.mutual)

    # -- ssl (HTTP servers) -------------------------------------------------------------

    def _build_ssl(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # The bytes checked and kept (not the files again: they may be mid-rotation).
        _load_material_pair(ctx, self.where, self.cfg, self._material[0], self._material[1])
        if self.cfg.client_ca_file is not None:
            ctx.load_verify_locations(cadata=(self._material[2] or b"").decode("ascii",
                                                                               "replace"))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side `ssl.SSLContext` that follows rotations: hand it to the HTTP server
        once; each new connection gets the latest certificate."""
        base = self._build_ssl()

        def on_hello(sock: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
            try:
                self._refresh()
                with self._lock:
                    if self._ssl is None:
                        self._ssl = self._build_ssl()
                    current = self._ssl
                if current is not sock.context:
                    sock.context = current
            except Exception:
                log.exception("%s: certificate check failed", self.where)

        base.sni_callback = on_hello
        with self._lock:
            self._ssl = base
        return base


def server_credentials(cfg: ServerTLSConfig, where: str) -> tuple[ServerTLS, Any]:
    """(`ServerTLS`, grpc server credentials) for a grpc listener."""
    tls = ServerTLS(cfg, where)
    return tls, tls.grpc_credentials()


def server_ssl_context(cfg: ServerTLSConfig, where: str) -> ssl.SSLContext:
    """An `ssl.SSLContext` for an HTTP listener (aiohttp), rotating like the grpc ones and
    re-read on SIGHUP. Raises TLSError with the key path when the files are unusable."""
    tls = ServerTLS(cfg, where)
    ctx = tls.ssl_context()
    # The context's callback holds `tls`: alive (and reloaded on SIGHUP) as long as it is.
    ctx._gateway_tls = tls  # type: ignore[attr-defined]
    return ctx


class ClientTLS:
    """Credentials for a channel to a TLS server, read once (when the channel is made)."""

    def __init__(self, cfg: ClientTLSConfig, where: str) -> None:
        self.cfg = cfg
        if cfg.cert_file and cfg.key_file:
            _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), where, cfg.cert_file,
                       cfg.key_file)
        ca = _read(where, "ca_file", cfg.ca_file) if cfg.ca_file else None
        key = _read(where, "key_file", cfg.key_file) if cfg.key_file else None
        cert = _read(where, "cert_file", cfg.cert_file) if cfg.cert_file else None
        self.credentials = grpc.ssl_channel_credentials(ca, key, cert)

    def options(self) -> list[tuple[str, Any]]:
        if self.cfg.server_name:
            return [("grpc.ssl_target_name_override", self.cfg.server_name)]
        return []


def files_problems(cfg: ServerTLSConfig | ClientTLSConfig | None, where: str) -> list[str]:
    """What `gateway check` reports about TLS files: unreadable, not PEM, key not matching."""
    if cfg is None:
        return []
    try:
        if isinstance(cfg, ServerTLSConfig):
            _check_pair(where, cfg)
        else:
            ClientTLS(cfg, where)
    except TLSError as e:
        return [str(e)]
    return []


def listen(server: Any, host: str, port: int, cfg: ServerTLSConfig | None, where: str,
           what: str = "gRPC listener") -> tuple[int, ServerTLS | None]:
    """Bind a grpc server's port, with TLS when configured: (bound port, its ServerTLS)."""
    tls = None
    address = grpc_address(host, port)
    try:
        if cfg is None:
            bound = server.add_insecure_port(address)
            if not is_loopback(host):
                log.warning("%s on %s serves plaintext: set %s to expose it beyond this "
                            "machine", what, host, where)
        else:
            tls, creds = server_credentials(cfg, where)
            bound = server.add_secure_port(address, creds)
    except RuntimeError as e:
        raise OSError(f"{what} cannot listen on {host}:{port}: {e}") from None
    return int(bound), tls


def http_listener(host: str, cfg: ServerTLSConfig | None, where: str,
                  what: str) -> tuple[ServerTLS | None, ssl.SSLContext | None]:
    """(`ServerTLS`, context for aiohttp's `TCPSite(ssl_context=...)`) of an HTTP listener, or
    (None, None) for plaintext, which is warned about beyond loopback. Raises TLSError."""
    if cfg is None:
        if not is_loopback(host):
            log.warning("%s on %s serves plaintext: set %s to expose it beyond this machine",
                        what, host, where)
        return None, None
    tls = ServerTLS(cfg, where)
    return tls, tls.ssl_context()


def scheme(tls: ServerTLS | None) -> str:
    return "https" if tls is not None else "http"


def label(tls: ServerTLS | None) -> str:
    """What the start-up lines add after an address: '', ' (TLS)' or ' (mTLS)'."""
    if tls is None:
        return ""
    return " (mTLS)" if tls.mutual else " (TLS)"


def config_problems(config: Any) -> list[str]:
    """Every TLS file in a `GatewayConfig` that cannot be used, as `key: why` lines."""
    out = files_problems(config.proxy.tls, "proxy.tls")
    out += files_problems(config.admin.tls, "admin.tls")
    if config.http.enabled:
        out += files_problems(config.http.tls, "http.tls")
    if config.dashboard.enabled:
        out += files_problems(config.dashboard.tls, "dashboard.tls")
    for i, app in enumerate(config.applications):
        for j, dep in enumerate(app.deployments):
            out += files_problems(dep.tls, f"applications[{i}].deployments[{j}].tls")
    return out
