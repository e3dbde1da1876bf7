"""The package as users install it: an sdist built from the checkout, a wheel built from that
sdist (as pip does from an index), installed with the `arize` extra into a fresh venv, used from
outside the checkout (no make, no grpcio-tools at run time)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import grpc
import pytest

from tests.ops_support import GatewayProcess, run_config, write_config

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.timeout(600)
def test_wheel_installs_and_serves_outside_the_checkout(tmp_path: Path) -> None:
    # The tree's own generated stubs must not leak into the wheel: it is built from a copy
    # holding only what git tracks, as a fresh clone (or an sdist) would.
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    assert not list((src / "gateway" / "pb").glob("*_pb2*.py"))

    dist = tmp_path / "dist"
    # The sdist (no isolation, so it stays quick: making an sdist needs only setuptools, which
    # this venv has) carries the .proto sources and no generated stubs...
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
         "--outdir", str(dist), str(src)], tmp_path, 300)
    (sdist,) = dist.glob("grpc_observability_gateway-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("/protos/grpc_predict_v2.proto") for n in names), names
    assert not [n for n in names if "_pb2" in n], names
    # ...and the wheel built from it (isolated, as pip builds one from an index) has them.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(sdist)],
        tmp_path, 300)
    (wheel,) = dist.glob("grpc_observability_gateway-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    run([str(bin_dir / "pip"), "install", "-q", f"{wheel}[arize]"], tmp_path, 420)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # Generated code and its runtime import from the installed package, not from the checkout.
    probe = run([str(bin_dir / "python"), "-c",
                 "import gateway.pb.grpc_predict_v2_pb2 as m, importlib.util as u;"
                 "print(m.__file__); print(u.find_spec('grpc_tools') is None)"], outside, 60)
    where, no_tools = probe.stdout.split()
    assert where.startswith(str(env_dir)), where
    assert no_tools == "True", "grpcio-tools must be a build requirement only"

    cfg = write_config(outside, run_config())
    check = run([str(bin_dir / "gateway"), "check", str(cfg)], outside, 60)
    assert "OK" in check.stdout

    gw = GatewayProcess(cfg, command=[str(bin_dir / "gateway")], cwd=outside)
    try:
        from gateway.pb import text_model_pb2, text_model_pb2_grpc

        with grpc.insecure_channel(gw.address) as channel:
            stub = text_model_pb2_grpc.TextModelStub(channel)
            reply = stub.Predict(text_model_pb2.PredictRequest(text="wheel"), timeout=20)
        assert reply.replica.startswith("text#TextModel#"), reply
    finally:
        gw.proc.terminate()
        assert gw.wait(30) == 0
