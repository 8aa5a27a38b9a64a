"""The device run's cuDNN stage, rehearsed: the probe against the stub library and a fake CuPy 14.

``--stand-in`` runs the binding on host buffers, so what is checked here is the
record the probe writes (library, version, Chainer's ``cudnn_enabled``, each
check) and that ``summarize.py`` reads it; on a GPU the same probe compares
cuDNN with Chainer's own kernels.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.compat.cudnn_fakes import build_stub, compiler, write_fake_cupy
from tests.conftest import ROOT

PROBE = ROOT / "benchmarks" / "device" / "cudnn_probe.py"
SUMMARIZE = ROOT / "benchmarks" / "device" / "summarize.py"


def probe(tmp_path, *args, **env):
    out = tmp_path / "cudnn.json"
    done = subprocess.run([sys.executable, str(PROBE), "--out", str(out), *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    return done, json.loads(out.read_text())


@pytest.mark.skipif(compiler() is None, reason="no C compiler to build the stub")
def test_probe_against_the_stub(tmp_path):
    stub = build_stub(tmp_path)
    fake = write_fake_cupy(tmp_path / "fake")
    done, record = probe(tmp_path, "--stand-in", PYTHONPATH=f"{fake}:{ROOT}",
                         SMCHAINER_CUDNN_LIBRARY=str(stub))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"cuDNN: cuDNN 9.19.0 (smchainer ctypes binding, {stub})" in done.stdout
    assert record["ok"] is True and record["stand_in"] is True
    assert record["cudnn_enabled"] is True and record["chainer_cudnn_version"] == 91900
    assert record["binding"]["library"] == str(stub) and record["binding"]["version"] == 91900
    assert [c["name"] for c in record["checks"]] == ["convolution_2d", "batch_normalization"]
    assert all(c["cudnn_calls_always"] > 0 for c in record["checks"])
    stages = tmp_path / "stages"
    stages.write_text("cudnn 0 1\n")
    subprocess.run([sys.executable, str(SUMMARIZE), str(tmp_path), str(stages)], check=True,
                   capture_output=True, timeout=60)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["cudnn"] == {"exit": 0, "seconds": 1}
    assert summary["cudnn"]["ok"] is True and summary["cudnn"]["version"] == 91900
    assert summary["cudnn"]["convolution_2d"] == {"ok": True}


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_probe_without_cuda_records_why(tmp_path):
    done, record = probe(tmp_path)
    assert done.returncode == 1
    assert record["ok"] is False and record["checks"] == []
    assert record["error"].startswith("RuntimeError: the binding is not active")
    assert record["binding"]["active"] is False
