"""The SDK's arguments: AWS-only ones warned about, instance types and counts, lazy imports."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

import smchainer
from smchainer import api
from smchainer.api import Chainer, Estimator, IgnoredArgumentWarning, Session
from smchainer.api.local_mode import device_environment


def quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Chainer("train.py", **kwargs)


def test_aws_only_arguments_warn_once_each_and_are_ignored():
    with pytest.warns(IgnoredArgumentWarning) as caught:
        estimator = Chainer(entry_point="train.py", role="arn:aws:iam::1:role/x",
                            framework_version="5.0.0", py_version="py3",
                            train_volume_size=30, sagemaker_session=object())
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        f"Chainer: {name}= only matters on AWS SageMaker; ignored here"
        for name in ("framework_version", "py_version", "role", "sagemaker_session",
                     "train_volume_size")
    ]
    assert all(w.filename == __file__ for w in caught)  # they point at the notebook's line
    assert estimator.instance_type == "local" and estimator.processes() is None
    assert isinstance(estimator.sagemaker_session, Session)


def test_aws_instance_types_map_to_local_ones():
    with pytest.warns(IgnoredArgumentWarning, match="'ml.p3.2xlarge' runs on this machine as "
                      "'local_gpu'"):
        assert Chainer("train.py", train_instance_type="ml.p3.2xlarge").instance_type \
            == "local_gpu"
    with pytest.warns(IgnoredArgumentWarning, match="as 'local'"):
        assert Chainer("train.py", instance_type="ml.c5.xlarge").instance_type == "local"
    with pytest.raises(ValueError, match="use 'local'"):
        quiet(instance_type="gpu")


def test_counts_and_processes_follow_the_sagemaker_rules():
    assert quiet().processes() is None
    assert quiet(train_instance_count=3).processes() == 3
    assert quiet(instance_count=2, process_slots_per_host=2).processes() == 4
    assert quiet(instance_count=2, num_processes=3).processes() == 3
    assert quiet(use_mpi=True).processes() == 1
    assert quiet(instance_count=4, use_mpi=False).processes() is None
    with pytest.raises(ValueError, match="disagree"):
        quiet(instance_count=2, train_instance_count=3)
    with pytest.raises(ValueError, match="whole number"):
        quiet(instance_count=0)
    with pytest.raises(ValueError, match="s3://"):
        quiet(checkpoint_s3_uri="/tmp/checkpoints")


def test_mpi_settings_reach_the_launcher_and_the_framework_parameters(tmp_path):
    estimator = quiet(source_dir=str(tmp_path), instance_count=2,
                      additional_mpi_options="--mca btl self,tcp", container_log_level=10,
                      hyperparameters={"epochs": 2, "name": "vgg"})
    hps = estimator.hyperparameters()
    assert hps == {"epochs": 2, "name": "vgg", "sagemaker_use_mpi": True,
                   "sagemaker_num_processes": 2, "sagemaker_process_slots_per_host": 1,
                   "sagemaker_additional_mpi_options": "--mca btl self,tcp",
                   "sagemaker_container_log_level": 10}
    command = estimator.training_command({"train": "/data"}, "job-1", tmp_path / "job-1")
    assert command[1:3] == ["-m", "smchainer.training.cli"]
    joined = " ".join(command)
    assert "--num-processes 2" in joined and "--channel train=/data" in joined
    assert command[command.index("--mpi-options") + 1] == "--mca btl self,tcp"
    assert f"--hp name={json.dumps('vgg')}" in joined
    assert command[command.index("--source-dir") + 1] == str(tmp_path)


def test_local_hides_gpus_and_local_gpu_does_not():
    cpu = device_environment("local", {"PATH": "/bin"})
    assert cpu["SMCHAINER_DEVICE"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""
    gpu = device_environment("local_gpu", {"SMCHAINER_DEVICE": "cpu", "PATH": "/bin"})
    assert "SMCHAINER_DEVICE" not in gpu and "CUDA_VISIBLE_DEVICES" not in gpu


def test_deploy_before_fit_says_what_to_do():
    with pytest.raises(Exception, match=r"call fit\(\) first"):
        quiet().deploy()


def test_the_api_is_exported_lazily():
    assert smchainer.Estimator is Estimator and smchainer.Chainer is Chainer
    assert smchainer.Predictor is api.Predictor and smchainer.Session is Session
    with pytest.raises(AttributeError, match="no attribute 'Estimatorr'"):
        smchainer.Estimatorr  # noqa: B018
    probe = ("import sys, smchainer; heavy = ('chainer', 'boto3', 'gunicorn'); "
             "before = [m for m in heavy if m in sys.modules]; smchainer.Chainer; "
             "smchainer.Session(); print(before, [m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[] []"
