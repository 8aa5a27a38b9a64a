"""The metrics module in process: names, labels and the multiprocess guard."""
from __future__ import annotations

import subprocess
import sys

import pytest

from smchainer.errors import SmchainerError
from smchainer.serving.metrics import (
    MULTIPROC_ENV,
    WorkerMetrics,
    endpoint_label,
    use_directory,
)


def test_in_process_metrics_have_the_servers_names():
    metrics = WorkerMetrics()
    metrics.bind_worker(3)
    metrics.observe_device("cpu")
    metrics.observe_request("/invocations", 200, 0.02)
    metrics.observe_request("/v2/models/m/versions/1/infer", 400, 0.001)
    metrics.observe_batch(12, 3)
    metrics.observe_model_load(1.5, loaded=True)
    text = metrics.render()
    assert 'smchainer_requests_total{endpoint="/invocations",status="200"} 1.0' in text
    assert 'smchainer_requests_total{endpoint="/v2/models/{name}/infer",status="400"} 1.0' in text
    assert ('smchainer_request_duration_seconds_bucket{endpoint="/invocations",le="0.025"} 1.0'
            in text)
    assert "smchainer_batch_size_sum 12.0" in text and "smchainer_batch_requests_sum 3.0" in text
    assert 'smchainer_model_loaded{worker="3"} 1.0' in text
    assert 'smchainer_model_load_seconds{worker="3"} 1.5' in text
    assert 'smchainer_worker_info{device="cpu",pid="' in text


def test_endpoint_labels_are_bounded():
    assert endpoint_label("/invocations") == "/invocations"
    assert endpoint_label("/v2/models/any-name/ready") == "/v2/models/{name}/ready"
    assert endpoint_label("/v2/models/x/versions/7") == "/v2/models/{name}"
    assert endpoint_label("/../etc/passwd") == "other"


def test_a_multiprocess_folder_set_too_late_is_an_error(tmp_path, monkeypatch):
    import prometheus_client  # noqa: F401  (this process's values stay in process)

    monkeypatch.setenv(MULTIPROC_ENV, "")  # restored afterwards: use_directory sets it
    with pytest.raises(SmchainerError, match="imported before the server set"):
        use_directory(tmp_path)


def test_two_processes_sum_in_one_folder(tmp_path):
    code = (
        "import sys\n"
        "from smchainer.serving.metrics import WorkerMetrics\n"
        "m = WorkerMetrics(sys.argv[1])\n"
        "m.bind_worker(int(sys.argv[2]))\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    m.observe_request('/invocations', 200, 0.01)\n"
        "print(m.render())\n"
    )
    for worker, count in ((0, 3), (1, 4)):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(worker),
                               str(count)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    # the second process read both: the first one's file stayed (a dead worker's counts stay)
    assert 'smchainer_requests_total{endpoint="/invocations",status="200"} 7.0' in done.stdout
