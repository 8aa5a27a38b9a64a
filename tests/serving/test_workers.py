"""Workers: model_fn once per worker, metrics summed over workers, stable worker indices."""
from __future__ import annotations

import os
import re
import signal
import time
import types

import numpy as np
import pytest

from smchainer.serving.gunicorn_app import pre_fork
from smchainer.serving.settings import worker_cpus
from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes, predict_directly

COUNTING_MODEL_FN = MODEL_FN.replace(
    "def model_fn(model_dir):\n",
    "def model_fn(model_dir):\n"
    "    marker = os.path.join(os.environ['MARKERS'], str(os.getpid()))\n"
    "    with open(marker, 'a') as file:\n"
    "        file.write('model_fn\\n')\n",
)


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), code=COUNTING_MODEL_FN)


@pytest.fixture(scope="module")
def server(start_server, model_dir, markers):
    server = start_server(
        ["--model-dir", str(model_dir)],
        env={"MARKERS": str(markers), "SAGEMAKER_MODEL_SERVER_WORKERS": "2"},
    )
    deadline = time.monotonic() + 30
    while len(list(markers.iterdir())) < 2 or "worker=\"1\"} 1" not in server.request(
            "GET", "/metrics").body.decode():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    return server


def test_model_fn_runs_once_in_each_of_two_workers(server, markers, model_dir):
    x = inputs(3)
    for _ in range(20):
        reply = server.post(npy_bytes(x), "application/x-npy", "application/x-npy")
        assert reply.status == 200
        assert np.array_equal(reply.array(), predict_directly(model_dir / "model.npz", x))
    files = sorted(markers.iterdir())
    assert len(files) == 2, files
    for file in files:
        assert file.read_text() == "model_fn\n", file
    assert server.log().count("Booting worker") == 2
    assert server.request("GET", "/execution-parameters").json()["MaxConcurrentTransforms"] == 2


def test_metrics_are_summed_over_the_workers(server):
    before = server.request("GET", "/metrics").body.decode()
    name = 'smchainer_requests_total{endpoint="/invocations",status="200"}'
    start = metric(before, name) or 0
    for _ in range(12):  # a new connection each: the kernel spreads them over both workers
        assert server.post(b"[[1, 2, 3, 4]]", "application/json").status == 200
    after = server.request("GET", "/metrics").body.decode()
    assert metric(after, name) == start + 12
    for worker in ("0", "1"):
        assert metric(after, f'smchainer_model_loaded{{worker="{worker}"}}') == 1
        assert metric(after, f'smchainer_model_load_seconds{{worker="{worker}"}}') > 0
    infos = [dict(re.findall(r'(\w+)="([^"]*)"', labels)) for labels in re.findall(
        r"^smchainer_worker_info\{(.*)\} 1(?:\.0)?$", after, re.M)]
    assert sorted(info["worker"] for info in infos) == ["0", "1"], after
    assert {info["device"] for info in infos} == {"cpu"}, after
    assert len({info["pid"] for info in infos}) == 2, after


def test_each_worker_runs_on_its_own_share_of_the_cpus(server):
    pids = worker_infos(server.request("GET", "/metrics").body.decode())
    allowed = os.sched_getaffinity(0)
    blocks = {index: os.sched_getaffinity(int(pid)) for index, pid in pids.items()}
    if len(allowed) < 2:  # one CPU: nothing to share out
        assert blocks == {"0": allowed, "1": allowed}
        return
    assert blocks == {"0": worker_cpus(allowed, 2, 0), "1": worker_cpus(allowed, 2, 1)}
    assert not blocks["0"] & blocks["1"] and blocks["0"] | blocks["1"] == allowed
    assert "worker 0 bound to CPUs" in server.log() and "worker 1 bound to CPUs" in server.log()


def test_with_cpu_affinity_none_the_workers_keep_every_cpu(start_server, model_dir, markers):
    server = start_server(["--model-dir", str(model_dir), "--workers", "2",
                           "--cpu-affinity", "none"], env={"MARKERS": str(markers)})
    deadline = time.monotonic() + 30
    while len(pids := worker_infos(server.request("GET", "/metrics").body.decode())) < 2:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    for pid in pids.values():
        assert os.sched_getaffinity(int(pid)) == os.sched_getaffinity(0)
    assert "bound to CPUs" not in server.log()


@pytest.mark.parametrize(("cpus", "workers", "blocks"), [
    (range(8), 3, [{0, 1, 2}, {3, 4, 5}, {6, 7}]),
    (range(4), 2, [{0, 1}, {2, 3}]),
    ({1, 5, 9}, 3, [{1}, {5}, {9}]),  # the CPUs the server may use, not 0..n
    (range(2), 3, [None, None, None]),  # more workers than CPUs: none bound
    (range(8), 1, [None]),  # one worker has every CPU anyway
])
def test_cpus_are_cut_into_one_contiguous_block_per_worker(cpus, workers, blocks):
    assert [worker_cpus(set(cpus), workers, index) for index in range(workers)] == blocks


def test_worker_indices_are_the_lowest_free_ones():
    def worker(index=None):
        w = types.SimpleNamespace()
        if index is not None:
            w.smchainer_index = index
        return w

    server = types.SimpleNamespace(WORKERS={})
    first, second, third = worker(), worker(), worker()
    for pid, new in enumerate((first, second, third)):
        pre_fork(server, new)
        server.WORKERS[pid] = new
    assert [first.smchainer_index, second.smchainer_index, third.smchainer_index] == [0, 1, 2]
    del server.WORKERS[1]  # worker 1 died: its replacement takes index 1 (so GPU 1 mod n)
    replacement = worker()
    pre_fork(server, replacement)
    assert replacement.smchainer_index == 1


def worker_infos(text: str) -> dict[str, str]:
    """worker index -> pid, from ``smchainer_worker_info``."""
    infos = [dict(re.findall(r'(\w+)="([^"]*)"', labels))
             for labels in re.findall(r"^smchainer_worker_info\{(.*)\} 1(?:\.0)?$", text, re.M)]
    return {info["worker"]: info["pid"] for info in infos}


def test_counters_survive_a_killed_worker_and_its_gauges_go_with_it(server):
    name = 'smchainer_requests_total{endpoint="/invocations",status="200"}'
    for _ in range(6):
        assert server.post(b"[[1, 2, 3, 4]]", "application/json").status == 200
    before = server.request("GET", "/metrics").body.decode()
    pids = worker_infos(before)
    assert sorted(pids) == ["0", "1"], before
    os.kill(int(pids["0"]), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # gunicorn starts a replacement, which takes index 0 and loads the model
        text = server.request("GET", "/metrics").body.decode()
        now = worker_infos(text)
        if sorted(now) == ["0", "1"] and now["0"] != pids["0"] and metric(
                text, 'smchainer_model_loaded{worker="0"}') == 1:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    assert now["1"] == pids["1"]
    allowed = os.sched_getaffinity(0)  # the server's CPUs: those of the test that started it
    assert os.sched_getaffinity(int(now["0"])) == (worker_cpus(allowed, 2, 0) or allowed)
    assert metric(text, name) == metric(before, name)  # the dead worker's requests still count
    assert server.post(b"[[1, 2, 3, 4]]", "application/json").status == 200
    assert metric(server.request("GET", "/metrics").body.decode(), name) == metric(before,
                                                                                  name) + 1
