"""Where method shapes come from besides reflection and `proto_modules`: `.proto` files the
gateway compiles at start (`proto_files:`) and descriptor sets (`descriptor_sets:`, what
`protoc --descriptor_set_out` writes; grpcurl and Envoy take the same files).

Both end as `FileDescriptor`s in a private descriptor pool, handed to the `MethodTable` and to
the record decoder exactly as reflection's are. Nothing is written into the package: protoc
writes its descriptor set into a temporary directory that is removed at once.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

PROTOC_TIMEOUT_S = 60.0
MAX_DESCRIPTOR_SET_BYTES = 64 * 1024 * 1024
"""A descriptor set larger than this is refused (real ones are kilobytes to a few MiB)."""


class MethodSourceError(ValueError):
    """A `proto_files` or `descriptor_sets` entry that cannot be used, with the reason."""


def _pool_files(fds: descriptor_pb2.FileDescriptorSet, where: str) -> list[FileDescriptor]:
    """Every file of `fds` (dependencies first, whatever order they came in), from a new pool."""
    pool = descriptor_pool.DescriptorPool()
    protos = {f.name: f for f in fds.file}
    added: list[str] = []
    done: set[str] = set()

    def add(name: str, trail: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in trail:
            raise MethodSourceError(f"{where}: import cycle through {name}")
        fdp = protos.get(name)
        if fdp is None:
            raise MethodSourceError(
                f"{where}: {trail[-1] if trail else name} imports {name}, which the set does "
                "not hold (write it with protoc --include_imports)")
        for dep in fdp.dependency:
            add(dep, (*trail, name))
        try:
            pool.Add(fdp)
        except (TypeError, ValueError) as e:
            raise MethodSourceError(f"{where}: {name}: {e}") from None
        done.add(name)
        added.append(name)

    for name in protos:
        add(name, ())
    return [pool.FindFileByName(n) for n in added]


def load_descriptor_set(path: str | os.PathLike[str], where: str = "") -> list[FileDescriptor]:
    """The files of a serialized `FileDescriptorSet` (protoc --descriptor_set_out
    --include_imports)."""
    where = where or str(path)
    raw = _read_regular(path, where)
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(raw)
    except Exception:
        raise MethodSourceError(f"{where}: {path} is not a descriptor set (protoc "
                                "--descriptor_set_out writes one)") from None
    if not fds.file:
        raise MethodSourceError(f"{where}: {path} holds no files")
    return _own_methods_kept(_pool_files(fds, where), where)


def _own_methods_kept(files: list[FileDescriptor], where: str) -> list[FileDescriptor]:
    """`files`, unless one redefines a method of the gateway's own (a built-in OIP method as
    a bidi stream, say): the gateway's definitions win, so such a source is refused."""
    from gateway.dataplane.methods import conflicts

    for fd in files:
        bad = conflicts(fd)
        if bad:
            raise MethodSourceError(
                f"{where}: {fd.name} redefines the gateway's own method {bad[0]} with another "
                "shape or other message types (the built-in definition is kept; remove or "
                "rename it)")
    return files


def _read_regular(path: str | os.PathLike[str], where: str) -> bytes:
    """The bytes of a regular file of at most MAX_DESCRIPTOR_SET_BYTES.

    A FIFO would block the read (and check, deploy and shutdown with it) and a device such as
    /dev/zero would never end: both are refused before anything is read. The file is opened
    non-blocking and checked with fstat on the same descriptor, so a swap between a check and
    the open cannot slip a FIFO in.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MethodSourceError(f"{where}: cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MethodSourceError(f"{where}: {path} is not a regular file")
        if st.st_size > MAX_DESCRIPTOR_SET_BYTES:
            raise MethodSourceError(
                f"{where}: {path} is larger than {MAX_DESCRIPTOR_SET_BYTES // (1024 * 1024)} MiB")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            raw = f.read(MAX_DESCRIPTOR_SET_BYTES + 1)
    except OSError as e:
        raise MethodSourceError(f"{where}: cannot read {path}: {e.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(raw) > MAX_DESCRIPTOR_SET_BYTES:
        raise MethodSourceError(
            f"{where}: {path} is larger than {MAX_DESCRIPTOR_SET_BYTES // (1024 * 1024)} MiB")
    return raw


def compile_proto_files(files: Sequence[str], import_paths: Sequence[str] = (),
                        where: str = "proto_files") -> list[FileDescriptor]:
    """Compile `.proto` files with grpcio-tools' protoc into descriptors in memory.

    `import_paths` are protoc's `-I`; without any, each file's own directory is one. The
    well-known types (google/protobuf/*.proto) are always importable.
    """
    if not files:
        return []
    try:
        import grpc_tools  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise MethodSourceError(
            f"{where}: compiling .proto files needs grpcio-tools: pip install "
            "'grpc-observability-gateway[protos]' (or use descriptor_sets:, which need "
            "nothing)") from None
    import importlib.resources

    includes = [str(Path(p)) for p in import_paths] or sorted(
        {str(Path(f).parent) for f in files})
    for inc in includes:
        if not Path(inc).is_dir():
            raise MethodSourceError(f"{where}: import path {inc} is not a directory")
    for f in files:
        if not Path(f).is_file():
            raise MethodSourceError(f"{where}: {f} is not a file")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="gateway-protos-") as tmp:
        out = os.path.join(tmp, "set.pb")
        args = [sys.executable, "-m", "grpc_tools.protoc", *(f"-I{inc}" for inc in includes),
                f"-I{well_known}", f"--descriptor_set_out={out}", "--include_imports",
                *map(str, files)]
        # A child process: protoc's errors come back on its stderr, and the gateway's own
        # stderr (its console log) is never touched.
        try:
            done = subprocess.run(args, capture_output=True, timeout=PROTOC_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise MethodSourceError(f"{where}: protoc took over {PROTOC_TIMEOUT_S:g}s") from None
        if done.returncode != 0:
            lines = protoc_errors(done.stderr.decode("utf-8", "replace"))
            raise MethodSourceError(f"{where}: " + "; ".join(lines[:5] or ["protoc failed"]))
        return load_descriptor_set(out, where)


_ABSL_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IW]\d{4} )")


def protoc_errors(stderr: str) -> list[str]:
    """protoc's error lines, without absl's start-up notice and its W/I lines (a warning
    such as "no syntax specified" would otherwise push the real error out of the message)."""
    return [ln.strip() for ln in stderr.splitlines()
            if ln.strip() and not _ABSL_NOISE.match(ln.strip())]


def _named_values(proto_files: Sequence[str], import_paths: Sequence[str],
                  descriptor_sets: Sequence[str]) -> list[tuple[str, str]]:
    """(key, value) for every configured path, as written and normalized, and each file's
    directory (protoc's implicit -I): what an error must name by key, never quote."""
    out: list[tuple[str, str]] = []

    def add(key: str, value: str) -> None:
        if not value:
            return
        for v in {value, os.path.normpath(value), os.path.realpath(value)}:
            out.append((key, v))

    for i, v in enumerate(proto_files):
        add(f"proto_files.files[{i}]", v)
        for d in {os.path.dirname(os.path.normpath(v)), os.path.dirname(os.path.realpath(v))}:
            if len(d) > 1:
                out.append((f"<directory of proto_files.files[{i}]>", d))
    for i, v in enumerate(import_paths):
        add(f"proto_files.import_paths[{i}]", v)
    for i, v in enumerate(descriptor_sets):
        add(f"descriptor_sets[{i}]", v)
    return out


def services_of(files: Sequence[FileDescriptor]) -> list[str]:
    return sorted({s.full_name for f in files for s in f.services_by_name.values()})


def load_method_sources(proto_files: Sequence[str], import_paths: Sequence[str],
                        descriptor_sets: Sequence[str]) -> list[FileDescriptor]:
    """Every file the config's `proto_files:` and `descriptor_sets:` name; raises
    `MethodSourceError` naming the entry at fault."""
    try:
        files = compile_proto_files(proto_files, import_paths)
        for i, path in enumerate(descriptor_sets):
            files.extend(load_descriptor_set(path, f"descriptor_sets[{i}]"))
    except MethodSourceError as e:
        # The message names entries by key, never by value: a path may come from a ${VAR}
        # (errors never repeat an expanded value; see README, Configuration).
        named = _named_values(proto_files, import_paths, descriptor_sets)
        msg = str(e)
        for key, value in sorted(named, key=lambda kv: -len(kv[1])):
            if value:
                msg = msg.replace(value, key)
        raise MethodSourceError(msg) from None
    return files
