"""Model sources (model.tar.gz, s3://) and transform_fn, each on a real server."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile

import numpy as np
import pytest

from smchainer import storage
from smchainer.testing import free_port
from tests.conftest import command
from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes, predict_directly

TRANSFORM = MODEL_FN + '''
import io
import json

import numpy as np

from smchainer.errors import NotAcceptable


def transform_fn(model, request_body, content_type, accept):
    if accept != "application/json":
        raise NotAcceptable(f"this model answers application/json only, not {accept}")
    x = np.load(io.BytesIO(request_body), allow_pickle=False)
    if x.flat[0] == 500:
        raise RuntimeError("transform_fn failed on purpose")
    with chainer.using_config("train", False):
        y = model(x).array
    return json.dumps({"scores": y.tolist(), "content_type": content_type}), accept
'''


@pytest.fixture(scope="module")
def tarred_model(tmp_path_factory):
    """A model.tar.gz whose code/serve_me.py defines transform_fn."""
    root = tmp_path_factory.mktemp("tarred")
    source = make_model_dir(root / "model", code=TRANSFORM, program="serve_me.py", seed=3)
    return storage.pack(source, root / "model.tar.gz"), source / "model.npz"


@pytest.fixture(scope="module")
def tar_server(start_server, tarred_model):
    archive, _ = tarred_model
    return start_server(
        ["--model-dir", str(archive), "--workers", "1"],
        env={"SAGEMAKER_PROGRAM": "serve_me.py", "SAGEMAKER_CONTAINER_LOG_LEVEL": "10"},
    )


def test_transform_fn_from_a_tarred_model(tar_server, tarred_model):
    _, weights = tarred_model
    x = inputs(4)
    reply = tar_server.post(npy_bytes(x), "application/x-npy; charset=binary", "application/json")
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert answer["content_type"] == "application/x-npy"
    np.testing.assert_allclose(answer["scores"], predict_directly(weights, x), rtol=1e-6)


def test_transform_fn_refusing_a_type_moves_on_to_the_next_acceptable(tar_server):
    reply = tar_server.post(npy_bytes(inputs(1)), "application/x-npy",
                            "text/csv, application/json;q=0.5")
    assert reply.status == 200
    assert "scores" in reply.json()
    refused = tar_server.post(npy_bytes(inputs(1)), "application/x-npy", "text/csv")
    assert refused.status == 406
    assert "application/json only" in refused.json()["error"]


def test_debug_logging_puts_the_traceback_in_500_bodies(tar_server):
    x = inputs(1)
    x[0, 0] = 500
    reply = tar_server.post(npy_bytes(x), "application/x-npy", "application/json")
    assert reply.status == 500
    body = reply.json()
    assert body["error"] == "RuntimeError: transform_fn failed on purpose"
    assert "Traceback" in body["traceback"] and "serve_me.py" in body["traceback"]


@pytest.mark.s3
def test_a_model_tar_from_an_s3_compatible_server(start_server, tarred_model, s3_bucket,
                                                  s3_server, tmp_path):
    archive, weights = tarred_model
    uri = storage.upload(archive, f"s3://{s3_bucket}/jobs/1/output/model.tar.gz")
    server = start_server(
        ["--model-dir", uri, "--workers", "1", "--endpoint-url", s3_server["AWS_ENDPOINT_URL"]],
        env={"SAGEMAKER_PROGRAM": "serve_me.py", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    )
    x = inputs(2)
    reply = server.post(npy_bytes(x), "application/x-npy", "application/json")
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(reply.json()["scores"], predict_directly(weights, x), rtol=1e-6)


@pytest.mark.s3
def test_a_missing_s3_model_is_an_error(s3_bucket, s3_server):
    result = subprocess.run(
        [command("smchainer-serve"), "--model-dir", f"s3://{s3_bucket}/nothing/model.tar.gz",
         "--bind", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: s3://")


def malicious_tar(path, member: str) -> None:
    with tarfile.open(path, "w:gz") as archive:
        data = b"print('owned')\n"
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member", ["../escaped.py", "/tmp/smchainer-absolute-escape.py"])
def test_a_malicious_tar_is_refused(tmp_path, member):
    archive = tmp_path / "inner" / "model.tar.gz"
    archive.parent.mkdir()
    malicious_tar(archive, member)
    result = subprocess.run(
        [command("smchainer-serve"), "--model-dir", str(archive),
         "--bind", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "refusing" in last, result.stderr
    assert not (tmp_path / "escaped.py").exists()
    assert not os.path.exists("/tmp/smchainer-absolute-escape.py")
    assert "Traceback" not in result.stderr


def gzip_bomb(path, size: int) -> None:
    """A model.tar.gz of one member of ``size`` zero bytes: a few hundred kB on disk."""
    class Zeros(io.RawIOBase):
        def __init__(self, left: int) -> None:
            self.left = left

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            count = min(len(buffer), self.left)
            buffer[:count] = bytes(count)
            self.left -= count
            return count

    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("model.npz")
        info.size = size
        archive.addfile(info, io.BufferedReader(Zeros(size)))


def test_a_gzip_bomb_is_refused_before_it_is_written(tmp_path):
    archive = tmp_path / "model.tar.gz"
    gzip_bomb(archive, 300 * 1024 * 1024)
    assert archive.stat().st_size < 2 * 1024 * 1024
    work = tmp_path / "work"  # the server's own temporary folder, to weigh what it wrote
    work.mkdir()
    result = subprocess.run(
        [command("smchainer-serve"), "--model-dir", str(archive), "--max-model-size", "50M",
         "--bind", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(work)},
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "over the limit of 52428800" in last, result.stderr
    assert "--max-model-size" in last
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) - \
        archive.stat().st_size
    assert written < 1024 * 1024  # nothing of the 300 MB reached the disk


def test_the_archive_limit_admits_a_model_within_it(tmp_path, start_server):
    model_dir = make_model_dir(tmp_path / "model")
    archive = tmp_path / "model.tar.gz"
    storage.pack(model_dir, archive)
    server = start_server(["--model-dir", str(archive), "--max-model-size", "1M",
                           "--workers", "1"])
    x = inputs(2)
    reply = server.post(npy_bytes(x), "application/x-npy", "application/x-npy")
    assert reply.status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(reply.body)),
                                  predict_directly(model_dir / "model.npz", x))
    bad = subprocess.run([command("smchainer-serve"), "--model-dir", str(archive),
                          "--max-model-size", "lots", "--bind", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-model-size must be a size" in bad.stderr


@pytest.mark.parametrize("program", ["../../evil.py", "../evil.py", "link.py"])
def test_sagemaker_program_must_stay_inside_the_code_folder(tmp_path, program):
    model_dir = make_model_dir(tmp_path / "model")
    marker = tmp_path / "evil-ran"
    evil = f"open({str(marker)!r}, 'w').close()\n"
    (tmp_path / "evil.py").write_text(evil)
    (tmp_path / "model" / "evil.py").write_text(evil)
    (model_dir / "code" / "link.py").symlink_to(tmp_path / "evil.py")
    result = subprocess.run(
        [command("smchainer-serve"), "--model-dir", str(model_dir),
         "--bind", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SAGEMAKER_PROGRAM": program, "SMCHAINER_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: SAGEMAKER_PROGRAM=") and "outside the model's code" in last
    assert not marker.exists()


def test_a_folder_holding_only_model_tar_gz_serves_what_it_holds(start_server, tarred_model,
                                                                  tmp_path):
    """What a storage initializer copying a training job's output leaves."""
    import shutil

    archive, weights = tarred_model
    folder = tmp_path / "mnt-models"
    folder.mkdir()
    shutil.copy(archive, folder / "model.tar.gz")
    server = start_server(["--model-dir", str(folder), "--workers", "1"],
                          env={"SAGEMAKER_PROGRAM": "serve_me.py"})
    x = inputs(2)
    reply = server.post(npy_bytes(x), "application/x-npy", "application/json")
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(reply.json()["scores"], predict_directly(weights, x), rtol=1e-6)
