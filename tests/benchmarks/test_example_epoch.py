"""The device run's example stage, rehearsed: ``example_epoch.py --stand-in`` on the CPU.

The stand-in runs the unchanged AWS example script through smchainer-train on
300 + 100 shared CIFAR-10 images with a tiny VGG for one epoch, then the same
epoch in PyTorch eager. What is checked is the record the GPU stage writes
(the script's own log, the epoch time read from it, PyTorch's epoch on the
same iterations) and that ``summarize.py`` reads it; never a speed.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

from tests.benchmarks import test_quick
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "device" / "example_epoch.py"
SUMMARIZE = ROOT / "benchmarks" / "device" / "summarize.py"


@functools.cache
def torch_importable() -> bool:
    return test_quick.torch_importable()


def run(tmp_path, *args):
    out = tmp_path / "example.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # light on the shared cores
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"),
                           "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    return done, json.loads(out.read_text())


def test_stand_in_records_the_example_epoch_and_torch_beside_it(tmp_path, cifar10):
    done, record = run(tmp_path, "--stand-in", "--cifar10", str(cifar10))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert record["stand_in"] is True and record["device"] == "cpu"
    assert record["data"]["train_images"] == 300 and record["data"]["test_images"] == 100
    # the script's own defaults, read from it: batch 64, learning rate 0.05
    assert record["script_defaults"]["batch-size"] == 64
    assert record["script_defaults"]["learning-rate"] == 0.05

    example = record["example"]
    assert example["exit_code"] == 0 and example["timed_out"] is False
    assert example["device"] == "@numpy"  # the script's own "training on ..." line
    assert "--source-dir" in example["command"] and "train.py" in example["command"]
    assert example["hyperparameters"] == {"epochs": 1, "width": 0.125, "depth": 8,
                                          "num-gpus": 0}
    [entry] = example["log"]  # the LogReport log the script wrote
    iterations = math.ceil(300 / 64)
    assert entry["epoch"] == 1 and entry["iteration"] == iterations
    assert example["epoch_seconds"] == [round(entry["elapsed_time"], 3)]
    assert example["steady_epoch_seconds"] > 0 and example["steady_is_first_epoch"] is True
    assert example["images_per_s"] == round(300 / example["steady_epoch_seconds"], 1)
    assert 0 <= example["validation_accuracy_by_epoch"][0] <= 1
    assert 0 < example["wall_seconds"] < 60

    if torch_importable():
        torch = record["torch"]
        assert torch["method"].startswith("measured")
        assert torch["batch_size"] == 64 and torch["learning_rate"] == 0.05
        assert (torch["width"], torch["depth"]) == (0.125, 8)
        assert torch["iterations_per_epoch"] == iterations and torch["device"] == "cpu"
        assert len(torch["epoch_seconds"]) == 1 and torch["steady_epoch_seconds"] > 0
        assert torch["timed_out"] is False
        assert record["ratio_epoch_seconds_example_over_torch"] == round(
            example["steady_epoch_seconds"] / torch["steady_epoch_seconds"], 3)
    assert record["total_seconds"] < 60

    stages = tmp_path / "stages"
    stages.write_text("example 0 7\n")
    subprocess.run([sys.executable, str(SUMMARIZE), str(tmp_path), str(stages)], check=True,
                   capture_output=True, timeout=60)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["example"] == {"exit": 0, "seconds": 7}
    brief = summary["example"]
    assert brief["stand_in"] is True and brief["train_images"] == 300
    assert brief["example"]["epoch_seconds"] == example["epoch_seconds"]
    assert brief["example"]["device"] == "@numpy"
    assert brief["ratio_epoch_seconds_example_over_torch"] == record.get(
        "ratio_epoch_seconds_example_over_torch")
    assert "log" not in brief["example"] and "output_tail" not in brief["example"]


def test_missing_data_is_recorded_not_raised(tmp_path):
    done, record = run(tmp_path, "--stand-in", "--cifar10", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and "train.zip not found" in done.stderr
    assert record["error"].endswith("train.zip not found") and "example" not in record
