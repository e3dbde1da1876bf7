"""The admin service's client: what `gateway status / config / deploy / shutdown` and
`gateway.status(address)` use. Blocking; the errors say what went wrong in words."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc

from gateway.admin.status import DEFAULT_ADMIN_ADDRESS, GatewayStatus, from_proto
from gateway.pb import admin_pb2, admin_pb2_grpc
from gateway.tls import ClientTLS, ClientTLSConfig


class AdminError(Exception):
    """An admin call failed; the message says why, in words for the operator."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class AdminUnreachable(AdminError):
    """Nothing answers at the address (not running, wrong port, or it just stopped)."""


class AdminAuthError(AdminError):
    """The admin service refused the token (missing or wrong)."""


class AdminClient:
    """A blocking client: `with AdminClient(address, token) as c: c.status()`."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 10.0,
                 tls: ClientTLSConfig | None = None) -> None:
        """`tls`: reach an admin service that serves TLS (`admin.tls`): its CA, and a client
        certificate when it asks for one (mTLS)."""
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls is None:
            self._channel = grpc.insecure_channel(address)
        else:
            client = ClientTLS(tls, "admin client tls")
            self._channel = grpc.secure_channel(address, client.credentials, client.options())
        self._stub = admin_pb2_grpc.GatewayAdminStub(self._channel)

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        fn = getattr(self._stub, method)
        try:
            return fn(request, metadata=self._metadata, timeout=timeout or self.timeout,
                      wait_for_ready=False)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()  # type: ignore[attr-defined]
            details: str = e.details() or ""  # type: ignore[attr-defined]
            if code is grpc.StatusCode.UNAVAILABLE:
                raise AdminUnreachable(
                    f"cannot reach the gateway admin service at {self.address}: {details}",
                    code) from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise AdminUnreachable(
                    f"the gateway admin service at {self.address} did not answer within "
                    f"{timeout or self.timeout:g}s", code) from None
            if code is grpc.StatusCode.UNAUTHENTICATED:
                raise AdminAuthError(
                    f"the gateway at {self.address} refused the admin token: {details}",
                    code) from None
            if code is grpc.StatusCode.INVALID_ARGUMENT:
                raise AdminError(details, code) from None
            raise AdminError(f"{code.name}: {details}", code) from None

    def status(self) -> GatewayStatus:
        return from_proto(self._call("GetStatus", admin_pb2.GetStatusRequest()))

    def config_yaml(self) -> str:
        resp = self._call("GetConfig", admin_pb2.GetConfigRequest())
        return str(resp.config_yaml)

    def deploy(self, config_yaml: str, source: str = "", timeout: float = 300.0) -> str:
        req = admin_pb2.DeployRequest(config_yaml=config_yaml, source=source)
        return str(self._call("Deploy", req, timeout).message)

    def shutdown(self) -> str:
        return str(self._call("Shutdown", admin_pb2.ShutdownRequest()).message)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def status(
    address: str = DEFAULT_ADMIN_ADDRESS, token: str | None = None, timeout: float = 10.0,
    tls: ClientTLSConfig | None = None,
) -> GatewayStatus:
    """The status of the gateway whose admin service listens on `address`.

    Raises `AdminError` (`AdminUnreachable`, `AdminAuthError`) with a message that says what
    went wrong. `tls`: an admin service on TLS (`admin.tls`): its CA, and a client certificate
    for mTLS.
    """
    with AdminClient(address, token, timeout, tls=tls) as client:
        return client.status()
