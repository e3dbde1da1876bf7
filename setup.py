"""Build hook: generate the gRPC stubs from protos/ whenever the package is built.

`pip install .`, `pip wheel .` and `python -m build` all run `build_py`, so the wheel carries
`gateway/pb/*_pb2*.py` without make and without grpcio-tools at run time (it is a build
requirement only). An editable install writes them into the source tree, as `make protos` does.
Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs(out_dir: Path) -> None:
    """Run protoc on protos/*.proto; output lands in out_dir/gateway/pb/."""
    from importlib import resources

    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {ROOT / 'protos'}")
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        # Maps protos/x.proto to gateway/pb/x.proto, so generated imports are package-absolute.
        "-Igateway/pb=protos",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(protos))
    finally:
        os.chdir(cwd)


class BuildPyWithStubs(build_py):
    """build_py that also generates the stubs (into the tree for editable installs)."""

    def run(self) -> None:
        super().run()
        target = ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib)
        generate_stubs(target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            pb = Path(self.build_lib) / "gateway" / "pb"
            outputs += [str(pb / f"{p.stem}{suffix}") for p in (ROOT / "protos").glob("*.proto")
                        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
        return outputs


setup(cmdclass={"build_py": BuildPyWithStubs})
