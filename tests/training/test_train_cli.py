"""smchainer-train on one process: the SageMaker contract a script sees, endings, hooks."""
from __future__ import annotations

import json
import os
import socket
import textwrap

import numpy as np
import pytest

from smchainer.training.cli import main
from tests.test_plugins import fake_distribution
from tests.training.helpers import SCRIPT, tar_names, tiny_dataset, train


def compact(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def test_script_receives_every_sm_variable_and_its_arguments(tmp_path) -> None:
    data = tmp_path / "data"
    tiny_dataset(data)
    test_file = tiny_dataset(tmp_path / "elsewhere", "test.npz", n=8)
    hp_file = tmp_path / "hyperparameters.json"
    # The SDK's format: every value JSON-encoded; --hp below overrides epochs.
    hp_file.write_text(json.dumps({"epochs": "5", "batch-size": "4",
                                   "sagemaker_container_log_level": "10"}))
    job = tmp_path / "job"
    result = train("--entry-point", str(SCRIPT), "--channel", f"train={data}",
                   "--channel", f"test={test_file}", "--hyperparameters", str(hp_file),
                   "--hp", "epochs=2", "--hp", "s=3", "--hp", 'options={"b": "x", "a": 1}',
                   "--job-dir", str(job), "--job-name", "contract")
    assert result.returncode == 0, result.stderr
    assert "step 16 loss" in result.stdout  # 32 examples / batch 4 * 2 epochs

    received = json.loads((job / "output" / "data" / "received-0.json").read_text())
    assert received["argv"] == ["--batch-size", "4", "--epochs", "2", "--options", "a=1,b=x",
                                "-s", "3"]
    assert received["cwd"] == str(job / "code")
    assert received["file"] == str(job / "code" / "sagemaker_train.py")

    host = socket.gethostname()
    env = received["env"]
    hps = {"batch-size": 4, "epochs": 2, "options": {"a": 1, "b": "x"}, "s": 3}
    channel_dirs = {"test": f"{job}/input/data/test", "train": f"{job}/input/data/train"}
    interface = env["SM_NETWORK_INTERFACE_NAME"]
    resource = {"current_group_name": "homogeneousCluster", "current_host": host,
                "current_instance_type": "local", "hosts": [host],
                "instance_groups": [{"hosts": [host], "instance_group_name": "homogeneousCluster",
                                     "instance_type": "local"}],
                "network_interface_name": interface}
    file_mode = {"RecordWrapperType": "None", "S3DistributionType": "FullyReplicated",
                 "TrainingInputMode": "File"}
    expected = {
        "SM_MODEL_DIR": f"{job}/model",
        "SM_OUTPUT_DIR": f"{job}/output",
        "SM_OUTPUT_DATA_DIR": f"{job}/output/data",
        "SM_OUTPUT_INTERMEDIATE_DIR": f"{job}/output/intermediate",
        "SM_INPUT_DIR": f"{job}/input",
        "SM_INPUT_CONFIG_DIR": f"{job}/input/config",
        "SM_CHANNELS": '["test","train"]',
        "SM_CHANNEL_TRAIN": channel_dirs["train"],
        "SM_CHANNEL_TEST": channel_dirs["test"],
        "SM_HPS": '{"batch-size":4,"epochs":2,"options":{"a":1,"b":"x"},"s":3}',
        "SM_HP_BATCH-SIZE": "4",
        "SM_HP_EPOCHS": "2",
        "SM_HP_OPTIONS": '{"a":1,"b":"x"}',
        "SM_HP_S": "3",
        "SM_HOSTS": compact([host]),
        "SM_CURRENT_HOST": host,
        "CURRENT_HOST": host,
        "SM_CURRENT_INSTANCE_TYPE": "local",
        "SM_CURRENT_INSTANCE_GROUP": "homogeneousCluster",
        "SM_INSTANCE_GROUPS": '["homogeneousCluster"]',
        "SM_IS_HETERO": "false",
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": str(len(os.sched_getaffinity(0))),
        "SM_NETWORK_INTERFACE_NAME": interface,
        "SM_USER_ENTRY_POINT": "sagemaker_train.py",
        "SM_USER_ARGS": compact(received["argv"]),
        "SM_MODULE_NAME": "sagemaker_train",
        "SM_MODULE_DIR": f"{job}/code",
        "SM_FRAMEWORK_MODULE": "smchainer.training.cli:main",
        "SM_LOG_LEVEL": "10",
        "SM_FRAMEWORK_PARAMS": '{"sagemaker_container_log_level":10}',
        "SM_RESOURCE_CONFIG": compact(resource),
        "SM_INPUT_DATA_CONFIG": compact({"test": file_mode, "train": file_mode}),
        "SMCHAINER_CHECKPOINT_DIR": f"{job}/checkpoints",
        "SMCHAINER_RANK": "0",
        "SMCHAINER_SIZE": "1",
        "SMCHAINER_LOCAL_RANK": "0",
    }
    training_env = json.loads(env.pop("SM_TRAINING_ENV"))
    assert env == expected
    assert interface
    assert training_env["hyperparameters"] == hps
    assert training_env["channel_input_dirs"] == channel_dirs
    assert training_env["additional_framework_parameters"] == {"sagemaker_container_log_level": 10}
    assert training_env["resource_config"] == resource
    assert training_env["job_name"] == "contract"
    assert training_env["is_master"] is True and training_env["master_hostname"] == host
    for key in ("model_dir", "output_data_dir", "module_name", "user_entry_point", "num_cpus"):
        assert str(training_env[key]) == expected["SM_" + key.upper()]

    config = job / "input" / "config"
    assert json.loads((config / "hyperparameters.json").read_text()) == {
        "batch-size": "4", "epochs": "2", "options": '{"b": "x", "a": 1}', "s": "3",
        "sagemaker_container_log_level": "10"}
    assert json.loads((config / "resourceconfig.json").read_text()) == resource
    assert sorted(json.loads((config / "inputdataconfig.json").read_text())) == ["test", "train"]
    assert os.listdir(channel_dirs["test"]) == ["test.npz"]

    assert (job / "output" / "success").read_bytes() == b""
    assert not (job / "output" / "failure").exists()
    assert tar_names(job / "model.tar.gz") == ["model.npz"]
    assert "received-0.json" in tar_names(job / "output.tar.gz")


def test_job_file_source_dir_and_requirements(tmp_path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "helper.py").write_text("GREETING = 'hello from the source dir'\n")
    (source / "requirements.txt").write_text("numpy\n")  # installed already: no network
    (source / "entry.py").write_text(textwrap.dedent("""
        import os, helper
        if __name__ == "__main__":
            with open(os.path.join(os.environ["SM_MODEL_DIR"], "note.txt"), "w") as f:
                f.write(helper.GREETING)
    """))
    tiny_dataset(tmp_path / "data")
    (tmp_path / "job.json").write_text(json.dumps({
        "entry_point": "entry.py", "source_dir": "src", "channels": {"train": "data"},
        "job_dir": "out/job", "output_path": "artifacts", "job_name": "from-file",
    }))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = train("--job-file", str(tmp_path / "job.json"), cwd=elsewhere, PIP_NO_INDEX="1")
    assert result.returncode == 0, result.stderr
    assert f"installing {tmp_path}/out/job/code/requirements.txt" in result.stderr
    job = tmp_path / "out" / "job"
    assert (job / "model" / "note.txt").read_text() == "hello from the source dir"
    assert sorted(os.listdir(job / "code")) == ["entry.py", "helper.py", "requirements.txt"]
    copied = tmp_path / "artifacts" / "from-file" / "output"
    assert sorted(os.listdir(copied)) == ["model.tar.gz", "output.tar.gz"]
    assert tar_names(copied / "model.tar.gz") == ["note.txt"]


def test_an_entry_point_in_a_subfolder_of_the_source_dir_runs(tmp_path) -> None:
    source = tmp_path / "src"
    (source / "scripts").mkdir(parents=True)
    (source / "shared.py").write_text("WORD = 'from the source dir root'\n")
    (source / "scripts" / "train.py").write_text(textwrap.dedent("""
        import json, os, sys
        sys.path.insert(0, os.getcwd())  # the code folder, as SageMaker's working directory
        import shared
        with open(os.path.join(os.environ["SM_MODEL_DIR"], "note.json"), "w") as f:
            json.dump({"word": shared.WORD, "entry": os.environ["SM_USER_ENTRY_POINT"]}, f)
    """))
    tiny_dataset(tmp_path / "data")
    result = train("--entry-point", "scripts/train.py", "--source-dir", str(source),
                   "--channel", f"train={tmp_path / 'data'}", "--job-dir", str(tmp_path / "job"))
    assert result.returncode == 0, result.stderr
    note = json.loads((tmp_path / "job" / "model" / "note.json").read_text())
    assert note == {"word": "from the source dir root", "entry": "scripts/train.py"}


def test_requirements_that_cannot_be_installed_are_a_clear_error(tmp_path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "entry.py").write_text("raise SystemExit('must not run')\n")
    (source / "requirements.txt").write_text("smchainer-no-such-package-4711\n")
    result = train("--entry-point", "entry.py", "--source-dir", str(source),
                   "--job-dir", str(tmp_path / "job"), PIP_NO_INDEX="1")
    assert result.returncode == 1
    assert "Error: SmchainerError: installing" in result.stderr
    assert "smchainer-no-such-package-4711" in result.stderr
    assert "must not run" not in result.stderr
    failure = (tmp_path / "job" / "output" / "failure").read_text()
    assert failure.startswith("Framework Error: SmchainerError: installing")


def test_failing_script_writes_a_failure_file_that_leads_with_the_error(tmp_path) -> None:
    script = tmp_path / "broken.py"
    script.write_text(textwrap.dedent("""
        def load(path):
            raise FileNotFoundError(f"no data in {path}")

        if __name__ == "__main__":
            load("/nowhere")
    """))
    job = tmp_path / "job"
    (job / "output").mkdir(parents=True)
    (job / "output" / "success").touch()  # a stale one from an earlier run
    result = train("--entry-point", str(script), "--job-dir", str(job), "--hp", "lr=0.1")
    assert result.returncode == 1
    failure = (job / "output" / "failure").read_text()
    first, *rest = failure.splitlines()
    assert first == (f"FileNotFoundError: no data in /nowhere (rank 0 of 1, host "
                     f"{socket.gethostname()})")
    assert "Exit code: 1" in rest
    assert "Command: python broken.py --lr 0.1" in rest
    assert 'load("/nowhere")' in failure and "raise FileNotFoundError" in failure
    assert "runpy" not in failure  # the launcher's frames are left out
    assert not (job / "output" / "success").exists()
    assert not (job / "model.tar.gz").exists()
    assert result.stderr.rstrip().endswith(f"see {job}/output/failure")
    assert "Error: FileNotFoundError: no data in /nowhere" in result.stderr


def test_failure_file_written_by_the_script_is_kept(tmp_path) -> None:
    script = tmp_path / "own.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        if __name__ == "__main__":
            with open(os.path.join(os.environ["SM_OUTPUT_DIR"], "failure"), "w") as f:
                f.write("accuracy 0.1 is below the 0.5 the job asked for")
            sys.exit(3)
    """))
    job = tmp_path / "job"
    result = train("--entry-point", str(script), "--job-dir", str(job))
    assert result.returncode == 1
    assert "Error: SystemExit: the script exited with status 3" in result.stderr
    assert (job / "output" / "failure").read_text() == (
        "accuracy 0.1 is below the 0.5 the job asked for")


def test_hook_mode_runs_the_train_hook_of_an_installed_plugin(tmp_path) -> None:
    fake_distribution(tmp_path / "site", "smchainer-faketrain", "0.1", "faketrain", """
        import json, os
        from smchainer import hookimpl

        @hookimpl
        def train(env):
            if env.hyperparameters.get("explode"):
                raise ArithmeticError("the plugin's training diverged")
            seen = {"channels": {k: str(v) for k, v in env.channels.items()},
                    "hyperparameters": env.hyperparameters, "rank": env.rank,
                    "size": env.size, "device": env.device, "job_name": env.job_name,
                    "sm_model_dir": os.environ["SM_MODEL_DIR"],
                    "files": sorted(os.listdir(env.channels["train"]))}
            (env.model_dir / "model.npz").write_bytes(b"weights")
            (env.output_data_dir / "seen.json").write_text(json.dumps(seen))
            return {"accuracy": 1.0}
    """)
    tiny_dataset(tmp_path / "data")
    job = tmp_path / "job"
    plugin_env = {"PYTHONPATH": str(tmp_path / "site"), "SMCHAINER_LOAD_PLUGINS": "faketrain"}
    result = train("--channel", f"train={tmp_path / 'data'}", "--hp", "epochs=1",
                   "--job-dir", str(job), "--job-name", "hooked", **plugin_env)
    assert result.returncode == 0, result.stderr
    assert "running the train hook" in result.stderr
    seen = json.loads((job / "output" / "data" / "seen.json").read_text())
    assert seen == {"channels": {"train": f"{job}/input/data/train"},
                    "hyperparameters": {"epochs": 1}, "rank": 0, "size": 1, "device": "cpu",
                    "job_name": "hooked", "sm_model_dir": f"{job}/model",
                    "files": ["train.npz"]}
    assert tar_names(job / "model.tar.gz") == ["model.npz"]
    assert (job / "output" / "success").exists()

    result = train("--hp", "explode=true", "--job-dir", str(job), **plugin_env)
    assert result.returncode == 1
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("ArithmeticError: the plugin's training diverged (rank 0 of 1")
    assert not (job / "output" / "success").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--entry-point", "missing.py"], "--entry-point missing.py: no such file"),
    (["--channel", "train=/no/such/folder"], "channel 'train': /no/such/folder does not exist"),
    (["--channel", "train"], "expected NAME=PATH"),
    (["--channel", "bad name=/tmp"], "channel name 'bad name'"),
    (["--hp", "novalue"], "--hp 'novalue': expected KEY=VALUE"),
    (["--hp", "=3"], "expected KEY=VALUE"),
    (["--hyperparameters", "HPFILE"], "is not valid JSON"),
    (["--job-file", "HPFILE"], "is not valid JSON"),
    (["--hostfile", "/etc/hostname"], "--hostfile only goes with --num-processes"),
    (["--num-processes", "0"], "--num-processes 0: expected a whole number >= 1"),
    (["--num-processes", "2", "--mpi-options", "'unclosed"], "--mpi-options"),
    (["--channel", "train=s3://"], "names no bucket"),
    (["--source-dir", "."], "--source-dir needs --entry-point"),
    (["--unknown"], "unrecognized arguments: --unknown"),
])
def test_bad_options_are_usage_errors_before_anything_runs(tmp_path, capsys, args,
                                                           message) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{epochs: 3")
    args = [str(bad_json) if a == "HPFILE" else a for a in args]
    assert main([*args, "--job-dir", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "job").exists()


def test_help_documents_every_option() -> None:
    result = train("--help")
    assert result.returncode == 0
    for option in ("--entry-point", "--source-dir", "--channel", "--hp", "--hyperparameters",
                   "--job-file", "--job-dir", "--job-name", "--output-path",
                   "--checkpoint-dir", "--num-processes", "--hostfile", "--mpi-options",
                   "--oversubscribe", "--debug", "--version"):
        assert option in result.stdout


@pytest.mark.s3
def test_s3_channel_and_s3_output(tmp_path, s3_bucket) -> None:
    from smchainer.storage import download, s3_client

    data = tiny_dataset(tmp_path / "data")
    s3_client().upload_file(str(data), s3_bucket, "datasets/tiny/train.npz")
    job = tmp_path / "job"
    result = train("--entry-point", str(SCRIPT),
                   "--channel", f"train=s3://{s3_bucket}/datasets/tiny",
                   "--output-path", f"s3://{s3_bucket}/results", "--job-name", "s3-job",
                   "--job-dir", str(job), "--hp", "epochs=1")
    assert result.returncode == 0, result.stderr
    downloaded = job / "input" / "data" / "train" / "train.npz"
    assert not downloaded.is_symlink()
    np.testing.assert_array_equal(np.load(downloaded)["x"], np.load(data)["x"])
    listed = s3_client().list_objects_v2(Bucket=s3_bucket, Prefix="results/")
    assert sorted(item["Key"] for item in listed["Contents"]) == [
        "results/s3-job/output/model.tar.gz", "results/s3-job/output/output.tar.gz"]
    fetched = download(f"s3://{s3_bucket}/results/s3-job/output/model.tar.gz", tmp_path / "got")
    assert tar_names(fetched) == ["model.npz"]


@pytest.mark.s3
def test_missing_bucket_is_an_error_naming_it(tmp_path, s3_server) -> None:
    job = tmp_path / "job"
    result = train("--entry-point", str(SCRIPT), "--channel", "train=s3://no-such-bucket-4711/x",
                   "--job-dir", str(job))
    assert result.returncode == 1
    assert "Error: StorageError: s3://no-such-bucket-4711/x: bucket 'no-such-bucket-4711'" \
        in result.stderr
    assert (job / "output" / "failure").read_text().startswith(
        "Framework Error: StorageError: s3://no-such-bucket-4711/x")
