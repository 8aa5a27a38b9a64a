"""The example notebook (a script in ``# %%`` cells) runs end to end, here with its data on S3."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import alive
from tests.conftest import ROOT

NOTEBOOK = ROOT / "examples" / "cifar10_notebook.py"


@pytest.mark.s3
@pytest.mark.mpi
def test_the_cifar10_notebook_runs_on_s3_data_with_two_instances(
        shared_dir, s3_bucket, tmp_path, cifar_channels):
    env = dict(os.environ)
    env.update({
        "SMCHAINER_SHARED": str(shared_dir),
        "SMCHAINER_EXAMPLE_WORK": str(tmp_path),
        "SMCHAINER_EXAMPLE_TRAIN_PER_CLASS": "20",
        "SMCHAINER_EXAMPLE_TEST_PER_CLASS": "5",
        "SMCHAINER_EXAMPLE_EPOCHS": "1",
        "SMCHAINER_EXAMPLE_INSTANCES": "2",
        "SMCHAINER_DEFAULT_BUCKET": s3_bucket,
    })
    result = subprocess.run([sys.executable, str(NOTEBOOK)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("chainer 7.8.1\n")  # its first cell: import chainer, nothing before
    assert f"train: s3://{s3_bucket}/notebook/chainer_cifar/train" in out
    assert "ChainerMN: 2 processes" in out
    accuracy = re.search(r"test accuracy: ([0-9.]+) on 50 images", out)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0
    assert "endpoint deleted" in out
    for plot in ("loss.png", "accuracy.png"):
        assert (tmp_path / "artifacts" / plot).read_bytes()[:4] == b"\x89PNG"
    # Nothing the notebook started (the server names its model in the work folder) still runs.
    assert processes_mentioning(str(tmp_path)) == []


def test_the_notebook_starts_with_import_chainer_and_ends_deleting_the_endpoint():
    code = [line for line in NOTEBOOK.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert code[0] == "import chainer"
    assert code[-2:] == ["chainer_estimator.delete_endpoint()", 'print("endpoint deleted")']


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in command and alive(int(entry.name)):
            found.append(int(entry.name))
    return found
