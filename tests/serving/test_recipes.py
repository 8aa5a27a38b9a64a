"""The serving recipes in launch/: valid, and the server they describe runs as described.

As far as this machine goes without a cluster: the Deployment, Service and
HorizontalPodAutoscaler pass kubernetes-validate's strict schemas; the
server is started with exactly the containers' arguments (only the port
changed) and probed as the kubelet would, with the probes' own paths; KServe's
runtime answers a real Open Inference Protocol client for the InferenceService's
name. KServe's CRDs have no schema offline: their fields are checked here.
"""
from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from smchainer import storage
from tests.serving.conftest import Server

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "launch" / "kubernetes" / "serve.yaml"
KSERVE = ROOT / "launch" / "kserve" / "smchainer.yaml"


def documents(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


@pytest.fixture(scope="module")
def vgg_archive(tmp_path_factory) -> Path:
    from smchainer.default_plugins.vgg.modelfile import save_model
    from smchainer.models import VGG

    root = tmp_path_factory.mktemp("vgg")
    np.random.seed(0)
    save_model(VGG(width=0.0625, depth=8), root / "model", [f"c{i}" for i in range(10)], {})
    return storage.pack(root / "model", root / "model.tar.gz")


def without_port(args: list[str]) -> list[str]:
    """The container's arguments with the port left out of --bind: the test server adds a
    free one with --port (8080 is not ours here); nothing else changes."""
    return [arg.rsplit(":", 1)[0] if arg.startswith("--bind=") else arg for arg in args]


def kubelet_probe(port: int, probe: dict) -> int:
    """One HTTP probe as the kubelet sends it: GET, its path, its timeout (default 1 s)."""
    url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def until_probe_passes(port: int, probe: dict, seconds: float = 60) -> None:
    deadline = time.monotonic() + min(seconds, probe.get("periodSeconds", 10)
                                      * probe.get("failureThreshold", 3) + 5)
    while kubelet_probe(port, probe) != 200:
        assert time.monotonic() < deadline, f"{probe['httpGet']['path']} never passed"
        time.sleep(0.2)


def test_the_deployment_service_and_autoscaler_pass_strict_validation() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in yaml.safe_load_all(SERVE.read_text()):
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_the_deployment_runs_and_passes_its_probes(tmp_path, vgg_archive, s3_server) -> None:
    deployment = documents(SERVE)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["command"]
    assert command[0] == "smchainer-serve"
    model = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--model-dir="))
    bucket, key = storage.parse_s3_uri(model)
    storage.s3_client().create_bucket(Bucket=bucket)
    storage.upload(vgg_archive, model)
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    env.pop("PATH")
    server = Server(without_port(command[1:]), tmp_path / "server.log", env, bind=False)
    port = server.port
    try:
        until_probe_passes(port, container["startupProbe"])
        until_probe_passes(port, container["readinessProbe"])
        assert kubelet_probe(port, container["livenessProbe"]) == 200
        httpclient = pytest.importorskip("tritonclient.http")
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("vgg", [tensor]).as_numpy("output").shape == (2, 10)
        client.close()
        # SIGTERM, as the kubelet stops a pod: out within the grace period.
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=pod["terminationGracePeriodSeconds"])
        assert time.monotonic() - began < pod["terminationGracePeriodSeconds"]
    finally:
        server.stop()
    service = documents(SERVE)["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = documents(SERVE)["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_the_kserve_runtime_serves_the_inference_service(tmp_path, vgg_archive) -> None:
    runtime, service = documents(KSERVE)["ClusterServingRuntime"], documents(KSERVE)[
        "InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in
                                            runtime["spec"]["supportedModelFormats"]}
    assert "v2" in runtime["spec"]["protocolVersions"]
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["command"] == [
        "smchainer-serve"]
    # KServe's storage initializer copies the storageUri prefix into /mnt/models.
    mounted = tmp_path / "mnt" / "models"
    mounted.mkdir(parents=True)
    shutil.copy(vgg_archive, mounted / "model.tar.gz")
    name = service["metadata"]["name"]
    args = [arg.replace("{{.Name}}", name).replace("/mnt/models", str(mounted))
            for arg in container["args"]]
    server = Server(without_port(args), tmp_path / "server.log", bind=False)
    port = server.port
    try:
        until_probe_passes(port, container["readinessProbe"])
        assert kubelet_probe(port, container["livenessProbe"]) == 200
        httpclient = pytest.importorskip("tritonclient.http")
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert client.is_model_ready(name)
        x = np.zeros((1, 3, 32, 32), dtype=np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer(name, [tensor]).as_numpy("output").shape == (1, 10)
        client.close()
    finally:
        server.stop()
