"""Metrics read from a job's log with the estimator's metric_definitions."""
from __future__ import annotations

import pytest

from smchainer.api import Chainer
from smchainer.api.metrics import check_definitions, final_metrics, metric_values

DEFINITIONS = [{"Name": "validation:accuracy", "Regex": r"validation/main/accuracy=([0-9.]+)"},
               {"Name": "loss", "Regex": r"loss: ([-0-9.e]+)"},
               {"Name": "never", "Regex": r"never=([0-9]+)"}]


def test_every_match_is_a_value_and_the_last_is_final() -> None:
    log = ("epoch 1 loss: 2.5 validation/main/accuracy=0.31\n"
           "epoch 2 loss: 1.25e-1 validation/main/accuracy=0.52\n"
           "epoch 3 loss: nope validation/main/accuracy=0.57\n")
    assert metric_values(log, DEFINITIONS) == {
        "validation:accuracy": [0.31, 0.52, 0.57], "loss": [2.5, 0.125], "never": []}
    # Line by line, as SageMaker reads log lines: a regex cannot span two.
    assert metric_values("loss:\n 3.0", [{"Name": "loss", "Regex": r"loss:\s*([0-9.]+)"}]) == {
        "loss": []}
    assert final_metrics(log, DEFINITIONS) == [
        {"MetricName": "validation:accuracy", "Value": 0.57},
        {"MetricName": "loss", "Value": 0.125}]


def test_bad_definitions_are_value_errors() -> None:
    with pytest.raises(ValueError, match="does not compile"):
        check_definitions([{"Name": "x", "Regex": "("}])
    with pytest.raises(ValueError, match="needs a capture group"):
        check_definitions([{"Name": "x", "Regex": "x=[0-9]+"}])
    with pytest.raises(ValueError, match="give a dict with a 'Name' and a 'Regex'"):
        check_definitions([{"Name": "x"}])
    with pytest.raises(ValueError, match="metric_definitions must be a list"):
        Chainer(entry_point="train.py", metric_definitions="x")


def test_a_job_describes_its_final_metrics(tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text("for epoch, accuracy in enumerate([0.4, 0.6, 0.65], 1):\n"
                      "    print(f'epoch {epoch} validation/main/accuracy={accuracy}')\n")
    estimator = Chainer(entry_point=str(script), jobs_dir=tmp_path / "jobs",
                        metric_definitions=DEFINITIONS[:1])
    estimator.fit(logs=False)
    job = estimator.latest_training_job
    assert job.describe()["FinalMetricDataList"] == [
        {"MetricName": "validation:accuracy", "Value": 0.65}]
    assert job.metrics() == {"validation:accuracy": [0.4, 0.6, 0.65]}
