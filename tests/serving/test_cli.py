"""``smchainer-serve`` on the command line: help, and bad input refused before forking."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

import smchainer
from smchainer.serving import settings
from smchainer.testing import free_port
from tests.conftest import command
from tests.serving.conftest import MODEL_FN, make_model_dir

OPTIONS = ["--model-dir", "--entry-point", "--workers", "--threads", "--timeout", "--bind",
           "--port", "--max-payload-mb", "--max-model-size", "--auth-token-file",
           "--client-timeout", "--log-level", "--endpoint-url", "--debug", "--version",
           "--max-batch-size", "--max-batch-delay-ms", "--model-name", "--cpu-affinity"]


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SMCHAINER_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})}
    return subprocess.run([command("smchainer-serve"), *args], capture_output=True, text=True,
                          timeout=60, env=full_env)


def test_help_documents_every_option_and_environment_variable():
    result = serve("--help")
    assert result.returncode == 0
    for option in OPTIONS:
        assert option in result.stdout, option
    names = [name for name, _ in settings.ENVIRONMENT]
    for name in ["SAGEMAKER_MODEL_SERVER_WORKERS", "SAGEMAKER_MODEL_SERVER_TIMEOUT",
                 "SAGEMAKER_MAX_PAYLOAD_IN_MB", "SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_PROGRAM",
                 "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "SAGEMAKER_CONTAINER_LOG_LEVEL",
                 "SMCHAINER_LOAD_PLUGINS", "SMCHAINER_DISABLE_PLUGIN_AUTOLOAD",
                 "AWS_ENDPOINT_URL", "SMCHAINER_MAX_BATCH_SIZE", "SMCHAINER_MAX_BATCH_DELAY_MS",
                 "SMCHAINER_CPU_AFFINITY"]:
        assert name in names and name in result.stdout, name


def test_version():
    result = serve("--version")
    assert (result.returncode, result.stdout.strip()) == (
        0, f"smchainer-serve {smchainer.__version__}"
    )


@pytest.fixture
def model_dir(tmp_path):
    return make_model_dir(tmp_path / "model")


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.mark.parametrize("args, env, words", [
    (["--workers", "0"], {}, ["--workers", "at least 1"]),
    (["--timeout", "soon"], {}, ["--timeout", "whole number"]),
    ([], {"SAGEMAKER_MODEL_SERVER_WORKERS": "many"}, ["SAGEMAKER_MODEL_SERVER_WORKERS"]),
    ([], {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "0"}, ["SAGEMAKER_MAX_PAYLOAD_IN_MB"]),
    (["--port", "1"], {}, ["disagree"]),
    (["--log-level", "loud"], {}, ["log level"]),
    (["--no-such-option"], {}, ["--no-such-option"]),
    ([], {"SAGEMAKER_PROGRAM": "serve.py"}, ["SAGEMAKER_PROGRAM", "serve.py"]),
    ([], {"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "*/*"}, ["SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT"]),
    (["--entry-point", "/nonexistent/inference.py"], {}, ["--entry-point"]),
    (["--max-batch-size", "0"], {}, ["--max-batch-size", "at least 1"]),
    ([], {"SMCHAINER_MAX_BATCH_SIZE": "big"}, ["SMCHAINER_MAX_BATCH_SIZE"]),
    (["--max-batch-delay-ms", "-1"], {}, ["--max-batch-delay-ms", "from 0 to 10000"]),
    (["--max-batch-delay-ms", "nan"], {}, ["--max-batch-delay-ms", "from 0 to 10000"]),
    ([], {"SMCHAINER_MAX_BATCH_DELAY_MS": "1e9"}, ["SMCHAINER_MAX_BATCH_DELAY_MS", "10000"]),
    (["--cpu-affinity", "all"], {}, ["--cpu-affinity", "auto", "none"]),
    ([], {"SMCHAINER_CPU_AFFINITY": "cores"}, ["SMCHAINER_CPU_AFFINITY", "auto or none"]),
], ids=["workers", "timeout", "env-workers", "env-payload", "bind-and-port", "log-level",
        "unknown-option", "program", "default-accept", "entry-point", "batch-size",
        "env-batch-size", "batch-delay", "batch-delay-nan", "env-batch-delay", "cpu-affinity",
        "env-cpu-affinity"])
def test_usage_errors_exit_2(model_dir, args, env, words):
    result = serve("--model-dir", str(model_dir), "--bind", f"127.0.0.1:{free_port()}",
                   *args, env=env)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    for word in words:
        assert word in line, line


def test_a_missing_model_dir_exits_2(tmp_path):
    result = serve("--model-dir", str(tmp_path / "absent"), "--bind",
                   f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "does not exist" in error_line(result)


@pytest.mark.parametrize("code, words", [
    ("import no_such_module_anywhere\n", ["importing user module", "no_such_module_anywhere"]),
    (MODEL_FN + "\ndef predit_fn(data, model):\n    return data\n", ["predit_fn", "predict_fn"]),
    (MODEL_FN + "\ndef transform_fn(m, d, c, a):\n    return d\n"
     "def output_fn(p, a):\n    return p\n", ["transform_fn", "output_fn"]),
], ids=["import-error", "misspelled-hook", "transform-and-output"])
def test_bad_user_code_is_reported_before_forking(tmp_path, code, words):
    model_dir = make_model_dir(tmp_path / "model", code=code)
    result = serve("--model-dir", str(model_dir), "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    line = error_line(result)
    for word in words:
        assert word in line, line
    assert "Booting worker" not in result.stderr


def test_a_port_in_use_exits_1(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--model-dir", str(model_dir), "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in error_line(result)


def test_a_file_that_is_not_a_tar_exits_1(tmp_path):
    bogus = tmp_path / "model.tar.gz"
    bogus.write_bytes(b"this is not a tar archive")
    result = serve("--model-dir", str(bogus), "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "tar" in error_line(result)


def test_bind_parsing():
    assert settings.parse_bind("127.0.0.1:9000", None) == ("127.0.0.1", 9000)
    assert settings.parse_bind("[::1]:9001", None) == ("::1", 9001)
    assert settings.parse_bind("127.0.0.1", 9002) == ("127.0.0.1", 9002)
    assert settings.ServerSettings(model_dir=".", host="::1", port=1).bind == "[::1]:1"
