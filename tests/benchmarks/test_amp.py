"""``train_throughput.py --amp``: mixed precision on each side, rehearsed on the CPU.

A tiny VGG (depth 8, 1/8 of the channels, batch 4, ``--quick``) so that each
record takes seconds. What is checked is what the GPU run will rely on: every
row says the precision it ran, Chainer's fp16 really is ``chainer.mixed16``
(float16 weights, float32 batch norm, a dynamic loss scale), torch's is
autocast (+ GradScaler for fp16), what cannot run is recorded as unsupported
with its reason and no figure, the ratios pair same-precision figures only,
and ``summarize.py`` reads the records with the speed-up over float32.
Figures are never held to thresholds (this machine is shared).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import test_quick
from tests.conftest import ROOT

BENCH = ROOT / "benchmarks" / "train_throughput.py"
SUMMARIZE = ROOT / "benchmarks" / "device" / "summarize.py"
TINY = ["--device", "cpu", "--quick", "--depth", "8", "--width", "0.125", "--batch-sizes", "4"]
ALL = ["chainer", "chainer-cudnn", "smchainer-fused", "torch"]


@functools.cache
def torch_importable() -> bool:
    return test_quick.torch_importable()


def bench(folder: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = folder / name
    env = dict(os.environ, OMP_NUM_THREADS="1")  # light on the shared cores
    done = subprocess.run([sys.executable, str(BENCH), *TINY, "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    return done, json.loads(out.read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    """The three records of a device run's bench stages: float32, fp16 and bf16."""
    folder = tmp_path_factory.mktemp("amp")
    runs = {"off": bench(folder, "bench-tf32.json", "--frameworks", "chainer", "torch")}
    for mode in ("fp16", "bf16"):
        runs[mode] = bench(folder, f"bench-amp-{mode}.json", "--amp", mode, "--frameworks", *ALL)
    return {"folder": folder, **runs}


def frameworks(record: dict) -> dict[str, dict]:
    return {f["framework"]: f for f in record["frameworks"]}


def test_without_amp_every_row_is_float32(records):
    done, record = records["off"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert record["amp"] == "off" and record["precision"] == "fp32"
    chainer = frameworks(record)["chainer"]
    assert chainer["precision"] == "fp32"
    assert chainer["meta"]["weight_dtype"] == "float32" and chainer["meta"]["amp"] is None
    [row] = chainer["results"]
    assert row["precision"] == "fp32" and row["images_per_s"] > 0 and "loss_scale" not in row


def test_fp16_is_chainer_mixed16_against_torch_autocast(records):
    done, record = records["fp16"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert record["amp"] == "fp16" and record["precision"] == "fp16"
    found = frameworks(record)
    chainer = found["chainer"]
    assert chainer["meta"]["dtype"] == "dtype('mixed16')"
    assert chainer["meta"]["weight_dtype"] == "float16"
    assert chainer["meta"]["batch_norm_dtype"] == "float32"  # mixed16 keeps BN in float32
    assert "loss_scaling" in chainer["meta"]["amp"] and "use_fp32_update" in chainer["meta"]["amp"]
    [row] = chainer["results"]
    assert row["precision"] == "fp16" and row["images_per_s"] > 0
    assert row["loss_scale"] >= 1  # dynamic scaling ran: it starts at 1 and doubles
    assert row["last_loss"] == row["last_loss"]  # not NaN: the loss is taken in float32
    # the fused kernels are float32 only: said, not faked
    fused = found["smchainer-fused"]
    assert fused["results"] == [] and fused["precision"] == "fp16"
    assert "float32" in fused["unsupported"] and "error" not in fused
    assert "smchainer-fused --amp fp16: not supported" in done.stderr
    # no cuDNN on this machine: an error, recorded with the precision it was asked for
    assert found["chainer-cudnn"]["precision"] == "fp16" and found["chainer-cudnn"]["error"]
    if torch_importable():
        torch = found["torch"]
        assert torch["meta"]["amp"] == ("torch.autocast('cpu', dtype=torch.float16)"
                                        " + torch.amp.GradScaler")
        [row] = torch["results"]
        assert row["precision"] == "fp16" and row["images_per_s"] > 0 and row["loss_scale"] > 0
        assert set(record["ratio_images_per_s"]) == {"chainer/torch"}
        assert record["ratio_images_per_s"]["chainer/torch"]["4"] > 0


def test_bf16_runs_torch_only_and_says_why(records):
    done, record = records["bf16"]
    found = frameworks(record)
    for name in ("chainer", "chainer-cudnn"):
        assert found[name]["results"] == [] and found[name]["precision"] == "bf16"
        assert "no bfloat16" in found[name]["unsupported"]
    assert "float32" in found["smchainer-fused"]["unsupported"]
    assert record["ratio_images_per_s"] == {}  # no Chainer figure to pair with torch's
    if torch_importable():
        assert done.returncode == 0, done.stderr[-2000:]
        torch = found["torch"]
        assert torch["meta"]["amp"] == "torch.autocast('cpu', dtype=torch.bfloat16)"
        [row] = torch["results"]
        assert row["precision"] == "bf16" and row["images_per_s"] > 0
        assert "loss_scale" not in row  # bf16 needs no scaler
    else:
        assert done.returncode == 1  # no framework produced a figure


def test_summarize_reads_the_amp_records(records):
    folder = records["folder"]
    stages = folder / "stages"
    stages.write_text("bench-tf32 0 5\nbench-amp-fp16 0 6\nbench-amp-bf16 0 3\n")
    done = subprocess.run([sys.executable, str(SUMMARIZE), str(folder), str(stages)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stages"]["bench-amp-fp16"] == {"exit": 0, "seconds": 6}
    assert summary["bench_tf32"]["precision"]["chainer"] == "fp32"
    fp16, bf16 = summary["bench_amp"]["fp16"], summary["bench_amp"]["bf16"]
    assert fp16["amp"] == "fp16" and fp16["precision"]["chainer"] == "fp16"
    assert fp16["chainer"]["4"] == frameworks(records["fp16"][1])["chainer"]["results"][0][
        "images_per_s"]
    assert "float32" in fp16["smchainer-fused"]["unsupported"]
    assert "no bfloat16" in bf16["chainer"]["unsupported"]
    # the speed-up of each framework over the float32 record, at the same batch
    off = frameworks(records["off"][1])["chainer"]["results"][0]["images_per_s"]
    assert fp16["speedup_over_tf32"]["chainer"]["4"] == pytest.approx(
        fp16["chainer"]["4"] / off, abs=1e-3)
    assert "smchainer-fused" not in fp16["speedup_over_tf32"]
    if torch_importable():
        assert fp16["ratio"] == records["fp16"][1]["ratio_images_per_s"]
        assert set(bf16["speedup_over_tf32"]) == {"torch"}
