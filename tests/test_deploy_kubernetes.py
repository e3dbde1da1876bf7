"""deploy/kubernetes/: every manifest validates offline against the Kubernetes schemas
(`kubernetes-validate` ships them), the ServiceMonitor CRD has its required fields, and the
pieces agree with each other and with the gateway (its config parses, the probes and the
preStop use the ports the config opens, the Secret has the keys the pod reads)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import dns_name, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
# The oldest release with gRPC probes GA, and the newest the package has schemas for.
VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]


def docs() -> list[dict[str, Any]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                out.append(doc)
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def core(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__file__"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_builtin_manifest_validates_strictly(version: str) -> None:
    kinds = set()
    for doc in docs():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in the package (checked below)
        kinds.add(doc["kind"])
        try:
            kubernetes_validate.validate(core(doc), version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['__file__']}: {e}")
    assert kinds == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}


def test_validation_catches_a_broken_manifest() -> None:
    bad = core(find("Deployment", "grpc-gateway"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "nine"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)
    unknown = core(find("Service", "grpc-gateway"))
    unknown["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, VERSIONS[0], strict=True)


def test_servicemonitor_has_its_required_fields_and_selects_the_metrics_port() -> None:
    sm = find("ServiceMonitor", "grpc-gateway")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) >= {"apiVersion", "kind", "metadata", "spec"}
    spec = sm["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"]
    assert spec["endpoints"] and all("port" in e or "targetPort" in e
                                     for e in spec["endpoints"])
    svc = find("Service", "grpc-gateway")
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for e in spec["endpoints"]:
        assert e["port"] in port_names and e.get("path", "/metrics") == "/metrics"


def _gateway_config() -> Any:
    cm = find("ConfigMap", "grpc-gateway-config")
    env = {"ARIZE_SPACE_ID": "space-xyz", "ARIZE_API_KEY": "key-xyz"}
    return parse_config(yaml.safe_load(cm["data"]["config.yaml"]), "configmap", env)


def test_the_configmap_is_a_valid_gateway_config_with_keys_from_the_secret() -> None:
    cfg = _gateway_config()
    arize = cfg.records.arize
    assert arize.api_key is not None and arize.api_key.get_secret_value() == "key-xyz"
    raw = find("ConfigMap", "grpc-gateway-config")["data"]["config.yaml"]
    assert "${ARIZE_API_KEY}" in raw and "${ARIZE_SPACE_ID}" in raw
    pod = find("Deployment", "grpc-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e["valueFrom"].get("secretKeyRef") for e in pod["containers"][0]["env"]}
    assert pod["containers"][0]["env"][0] == {"name": "GATEWAY_INSTANCE_ID", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.name"}}}
    secret = find("Secret", "grpc-gateway-arize")
    for var in ("ARIZE_API_KEY", "ARIZE_SPACE_ID"):
        assert env[var]["name"] == secret["metadata"]["name"]
        assert env[var]["key"] in secret["stringData"]
    # The gateway listens where the Service sends calls and where Prometheus scrapes.
    assert cfg.proxy.host == "0.0.0.0" and cfg.metrics.prometheus.host == "0.0.0.0"
    assert cfg.admin.host == "127.0.0.1"


def test_probes_and_prestop_use_what_the_gateway_offers() -> None:
    cfg = _gateway_config()
    dep = find("Deployment", "grpc-gateway")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg.proxy.port, "metrics": cfg.metrics.prometheus.port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # grpc.health.v1 on the proxy port, the overall service "" (the gateway sets it).
        assert c[probe]["grpc"]["port"] == cfg.proxy.port
        assert c[probe]["grpc"].get("service", "") == ""
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    script = cmd[-1]
    assert cmd[:2] == ["/bin/sh", "-c"]
    drain = next(part for part in script.split(";") if "gateway shutdown" in part)
    args = shlex.split(drain)
    assert args[args.index("--address") + 1] == f"{cfg.admin.host}:{cfg.admin.port}"
    sleeps = sum(float(p.split()[1]) for p in script.split(";") if p.strip().startswith("sleep"))
    # The pod's grace covers the wait in preStop plus the drain.
    assert pod["terminationGracePeriodSeconds"] >= sleeps
    assert pod["terminationGracePeriodSeconds"] >= 5 + cfg.proxy.graceful_shutdown_timeout_s
    assert c["args"] == ["run", "/etc/gateway/config.yaml"]
    mount = c["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/gateway"
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == "grpc-gateway-config"
    assert set(c["resources"]) == {"requests", "limits"}
    assert dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()


def test_model_pool_is_a_headless_service_the_gateway_discovers() -> None:
    cfg = _gateway_config()
    target = cfg.applications[0].deployments[0].targets[0]
    name = dns_name(target)
    assert name is not None
    host, port = name
    svc = find("Service", host)
    assert svc["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in svc["spec"]["ports"]] == [port]
    model = find("Deployment", host)
    c = model["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "gateway.runtime.replica"]
    assert c["args"][c["args"].index("--port") + 1] == str(port)
    assert c["readinessProbe"]["grpc"]["port"] == port
    # Its preStop wait (out of DNS first) plus its drain fit in the pod's grace.
    wait = float(c["lifecycle"]["preStop"]["exec"]["command"][-1].split()[1])
    grace = float(c["args"][c["args"].index("--grace") + 1])
    assert model["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= wait + grace
    assert wait > cfg.applications[0].deployments[0].dns_refresh_s
    assert svc["spec"]["selector"].items() <= \
        model["spec"]["template"]["metadata"]["labels"].items()
    pdb = find("PodDisruptionBudget", "grpc-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        find("Deployment", "grpc-gateway")["spec"]["template"]["metadata"]["labels"].items()


def test_dockerfile_copies_what_exists_and_runs_the_gateway() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert 'ENTRYPOINT ["gateway"]' in text
    assert 'CMD ["run", "/etc/gateway/config.yaml"]' in text
    image = find("Deployment", "grpc-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert image["image"].startswith("grpc-gateway:")


def replay_dockerfile(text: str, image: Path) -> Path:
    """Replays the Dockerfile's steps under `image` (a stand-in for the image's filesystem)
    without Docker: COPY copies the build context minus Dockerfile.dockerignore, `pip install`
    installs into image/site (the stand-in for site-packages), `cd` and `rm -rf` act under
    image/. Returns the final WORKDIR. A RUN step this does not know fails the test, so the
    replay cannot silently drift from the file."""
    ignore = [p.strip() for p in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
              .splitlines() if p.strip() and not p.startswith("#")]

    def ignored(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", ""))
                   or any(fnmatch.fnmatch(part, pat.replace("**/", ""))
                          for part in Path(rel).parts if pat.startswith("**/"))
                   for pat in ignore)

    site = image / "site"
    workdir = image
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "WORKDIR":
            workdir = image / words[1].lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif words[0] == "COPY":
            dest = workdir / words[-1]
            for src in words[1:-1]:
                for path in [ROOT / src, *(ROOT / src).rglob("*")]:
                    rel = str(path.relative_to(ROOT))
                    if path.is_dir() or ignored(rel):
                        continue
                    target = (dest / path.name if (ROOT / src).is_file()
                              else dest / path.relative_to(ROOT / src))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        elif words[0] == "RUN":
            cwd = workdir
            for step in " ".join(words[1:]).split("&&"):
                argv = shlex.split(step)
                if argv[:2] == ["pip", "install"]:
                    spec = argv[-1].split("[")[0]
                    subprocess.run(
                        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                         "--no-build-isolation", "--no-compile", "--target", str(site), spec],
                        cwd=cwd, check=True, timeout=240)
                elif argv[0] == "cd":
                    cwd = image / argv[1].lstrip("/")
                elif argv[:2] == ["rm", "-rf"]:
                    for p in argv[2:]:
                        shutil.rmtree(image / p.lstrip("/"))
                elif argv[0] != "useradd":
                    pytest.fail(f"replay does not know this RUN step: {step!r}")
    return workdir


def test_the_image_runs_the_model_server_and_local_replicas(tmp_path: Path) -> None:
    """The model Deployment's command, run from the image's WORKDIR against the installed
    package, serves. (A source tree left in WORKDIR, which has no generated stubs, shadowed the
    installed package: `python -m` puts the working directory first on sys.path, and the gateway
    puts it on its local replicas' PYTHONPATH too.)"""
    workdir = replay_dockerfile((ROOT / "deploy" / "Dockerfile").read_text(), tmp_path)
    assert list((tmp_path / "site" / "gateway" / "pb").glob("*_pb2.py")), "no stubs installed"
    leftovers = {p.name for p in workdir.iterdir()} & {"gateway", "exporters", "examples"}
    assert not leftovers, f"the WORKDIR shadows the installed package: {leftovers}"
    model = find("Deployment", "iris-model")["spec"]["template"]["spec"]["containers"][0]
    assert model["command"][:1] == ["python"]
    args = list(model["args"])
    args[args.index("--port") + 1] = "0"  # any free port here
    args[args.index("--host") + 1] = "127.0.0.1"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    proc = subprocess.Popen([sys.executable, *model["command"][1:], *args], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for _ in range(200):  # bounded: the first line is the report (or the failure)
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("{"):
                break
        assert lines and '"port"' in lines[-1], "".join(lines)[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
