"""What the gateway knows about methods: RPC shape and whether the name is known.

Known names come from the generated modules it loads (its own protos and `proto_modules`),
`proto_files`, `descriptor_sets` and replicas' reflection. A method none of those names keeps
its own name as its metric label once a replica has answered it (any status but
UNIMPLEMENTED), up to MAX_UNKNOWN_PER_SERVICE names per service and MAX_UNKNOWN_NAMES in all;
everything else is labelled `other`, so a client making names up cannot grow the label sets.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf.descriptor import FileDescriptor

BUILTIN_PROTO_MODULES = (
    "gateway.pb.grpc_predict_v2_pb2",
    "gateway.pb.text_model_pb2",
    "gateway.pb.ray_serve_pb2",
)

RESERVED_MODULES = (
    "grpc_health.v1.health_pb2",
    "grpc_reflection.v1alpha.reflection_pb2",
)
"""Services the gateway serves itself: a source may repeat them, never change their shape."""

log = logging.getLogger("gateway.methods")

OTHER = "other"
MAX_UNKNOWN_PER_SERVICE = 25
"""Distinct unknown method names one service may add as metric labels."""
MAX_UNKNOWN_NAMES = 100
"""Distinct unknown method names in all; later ones are labelled `other`."""
MAX_NAME_LEN = 200

_SAFE_PATH = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class MethodInfo:
    path: str
    """`/package.Service/Method`, as on the wire."""
    client_streaming: bool
    server_streaming: bool
    input_type: str
    output_type: str


def _info(path: str, m: Any) -> MethodInfo:
    return MethodInfo(path=path, client_streaming=m.client_streaming,
                      server_streaming=m.server_streaming, input_type=m.input_type.full_name,
                      output_type=m.output_type.full_name)


def _file_methods(fd: FileDescriptor) -> Iterable[tuple[str, Any]]:
    for service in fd.services_by_name.values():
        for m in service.methods:
            yield f"/{service.full_name}/{m.name}", m


@functools.cache
def builtin_shapes() -> dict[str, MethodInfo]:
    """The gateway's own methods (its built-in protos and the services it serves itself):
    no source may give one of these paths another shape or other message types."""
    out: dict[str, MethodInfo] = {}
    for name in (*BUILTIN_PROTO_MODULES, *RESERVED_MODULES):
        fd = getattr(importlib.import_module(name), "DESCRIPTOR", None)
        if isinstance(fd, FileDescriptor):
            out.update((p, _info(p, m)) for p, m in _file_methods(fd))
    return out


def conflicts(fd: FileDescriptor) -> list[str]:
    """The methods of `fd` that redefine one of the gateway's own methods differently."""
    own = builtin_shapes()
    return [p for p, m in _file_methods(fd) if p in own and _info(p, m) != own[p]]


class MethodTable:
    """Method path -> shape, for every service of the loaded generated modules."""

    def __init__(self, modules: tuple[str, ...] | list[str] = BUILTIN_PROTO_MODULES) -> None:
        self._methods: dict[str, MethodInfo] = {}
        self._descriptors: dict[str, Any] = {}
        """Path -> MethodDescriptor, for the HTTP ingress's JSON transcoding."""
        self._unknown: set[str] = set()
        """Unknown method paths admitted as metric labels (bounded, see label_unknown)."""
        self._unknown_per_service: dict[str, int] = {}
        self._warned: set[str] = set()
        for name in modules:
            self.add_module(importlib.import_module(name))

    def add_module(self, module: ModuleType) -> None:
        fd = getattr(module, "DESCRIPTOR", None)
        if isinstance(fd, FileDescriptor):
            self.add_file(fd)

    def add_file(self, fd: FileDescriptor) -> list[str]:
        """Learn the methods of `fd`; returns the ones ignored because they would redefine one
        of the gateway's own methods (a built-in OIP method as a bidi stream, say)."""
        bad = set(conflicts(fd))
        for path, m in _file_methods(fd):
            if path in bad:
                if path not in self._warned and len(self._warned) < MAX_UNKNOWN_NAMES:
                    self._warned.add(path)
                    log.warning("%s (in %s) redefines one of the gateway's own methods with "
                                "another shape or other types: ignored", path[:MAX_NAME_LEN],
                                fd.name[:MAX_NAME_LEN])
                continue
            self._methods[path] = _info(path, m)
            self._descriptors[path] = m
            self._unknown.discard(path)
        return sorted(bad)

    def rebuild(self, modules: Iterable[ModuleType], files: Iterable[FileDescriptor]) -> None:
        """Start again from the built-in protos, then `modules` and `files` (a deploy's
        sources and what replicas publish now): methods of removed sources are forgotten.
        The new tables are built aside and swapped in at once."""
        fresh = MethodTable()
        fresh._warned = self._warned  # each conflict is logged once, not at every rebuild
        for module in modules:
            fresh.add_module(module)
        for fd in files:
            fresh.add_file(fd)
        self._methods, self._descriptors = fresh._methods, fresh._descriptors
        for path in [p for p in self._unknown if p in self._methods]:
            self._unknown.discard(path)

    def get(self, path: str) -> MethodInfo | None:
        return self._methods.get(path)

    def descriptor(self, path: str) -> Any:
        """The method's protobuf MethodDescriptor (input and output message types), or None."""
        return self._descriptors.get(path)

    def label(self, path: str) -> str:
        """The metric label for a method: its path when known, `other` otherwise."""
        return path if path in self._methods else OTHER

    def admitted(self, path: str) -> bool:
        """True when an unknown `path` already has its own label."""
        return path in self._unknown

    def label_unknown(self, path: str, answered: bool) -> str:
        """The label of a call to a method the gateway does not know.

        Its own path once a replica `answered` it (it exists there) and the path is a plain
        `/package.Service/Method` within the caps; `other` otherwise.
        """
        if path in self._unknown:
            return path
        if not answered or len(self._unknown) >= MAX_UNKNOWN_NAMES:
            return OTHER
        if len(path) > MAX_NAME_LEN or _SAFE_PATH.fullmatch(path) is None:
            return OTHER
        service = path.split("/")[1]
        n = self._unknown_per_service.get(service, 0)
        if n >= MAX_UNKNOWN_PER_SERVICE:
            return OTHER
        self._unknown_per_service[service] = n + 1
        self._unknown.add(path)
        return path

    def services(self) -> list[str]:
        return sorted({p.split("/")[1] for p in self._methods})


async def fetch_reflection(channel: Any, timeout: float = 5.0) -> list[FileDescriptor]:
    """The file descriptors of every service a server lists through server reflection.

    Empty when the server does not serve reflection (then its methods stay unknown).
    """
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    async def ask(*requests: Any) -> list[Any]:
        async def gen() -> Any:
            for r in requests:
                yield r

        return [r async for r in stub.ServerReflectionInfo(gen(), timeout=timeout)]

    try:
        (listing,) = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        services = [
            s.name for s in listing.list_services_response.service
            if not s.name.startswith(("grpc.", "gateway.internal."))
        ]
        if not services:
            return []
        answers = await ask(
            *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in services)
        )
    except grpc.aio.AioRpcError:
        return []
    for answer in answers:
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
            protos.setdefault(fdp.name, fdp)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    # Dependencies first: add whatever has all its imports in the pool, until nothing changes.
    while len(added) < len(protos):
        progress = False
        for name, fdp in protos.items():
            if name not in added and all(d in added for d in fdp.dependency if d in protos):
                pool.Add(fdp)
                added.add(name)
                progress = True
        if not progress:
            break
    files = []
    for name in added:
        fd = pool.FindFileByName(name)
        if fd.services_by_name:
            files.append(fd)
    return files
