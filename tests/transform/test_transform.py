"""Batch transform end to end: real ``smchainer-serve`` processes, real HTTP, files and S3.

The model's script reads ``text/csv`` rows and ``application/x-npy`` arrays,
answers their row sums as CSV lines, and refuses a row holding ``bad`` with a
400 (the poison record).
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from smchainer.api import Chainer, IgnoredArgumentWarning, Model, Session
from smchainer.api.transformer import Transformer, TransformJobError
from smchainer.storage import StorageError, s3_client
from smchainer.testing import ServerProcess
from smchainer.transform.cli import main
from tests.conftest import command

INFERENCE = """\
import io
import os
import time
from pathlib import Path

import numpy as np
from smchainer.errors import BadRequest, UnsupportedMediaType


def model_fn(model_dir):
    return lambda rows: rows.sum(axis=1)


def input_fn(body, content_type):
    if content_type == "application/x-npy":
        return np.load(io.BytesIO(body), allow_pickle=False)
    if content_type != "text/csv":
        raise UnsupportedMediaType(f"cannot read {content_type}")
    text = body.decode()
    if "bad" in text:
        raise BadRequest("a row holds 'bad'")
    if "flaky" in text:  # a 500 the first time, then fine: retried
        marker = Path(os.environ["TEST_MARKERS"]) / "flaky"
        if not marker.exists():
            marker.touch()
            raise RuntimeError("flaky, once")
        text = text.replace("flaky", "0")
    return np.asarray([[float(v) for v in line.split(",")] for line in text.splitlines()])


def predict_fn(data, model):
    delay = float(os.environ.get("TEST_DELAY", "0"))
    if delay:
        time.sleep(delay * (int(data[0, 0]) % 3))
    return model(data)


def output_fn(prediction, accept):
    return "".join(f"{value:.10g}\\n" for value in prediction).encode(), "text/csv"
"""

#: line 3 is the poison record, line 5 is empty (no record)
TRAIN = "1,2\n3,4\nbad,5\n6,7\n\n8,9\n"
BIG_ROWS = 300_000  # about 2.7 MB: three requests at max_payload 1 MB


def sums(rows) -> str:
    return "".join(f"{sum(row):.10g}\n" for row in rows)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers here see neither SageMaker nor smchainer settings of the caller."""
    for name in list(os.environ):
        if name.startswith(("SM_", "SAGEMAKER_", "SMCHAINER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SMCHAINER_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """An empty model folder and the inference script."""
    root = tmp_path_factory.mktemp("model")
    (root / "model").mkdir()
    (root / "inference.py").write_text(INFERENCE)
    return {"model_dir": root / "model", "script": root / "inference.py"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, object]:
    """``csv/`` (big.csv, train.csv with the poison record, sub/small.csv) and images.npy."""
    root = tmp_path_factory.mktemp("data")
    big = [(i, i % 7) for i in range(BIG_ROWS)]
    small = [(10, 1), (20, 2), (30, 3)]
    images = np.arange(12, dtype=np.float32).reshape(4, 3)
    (root / "csv" / "sub").mkdir(parents=True)
    (root / "csv" / "big.csv").write_text("".join(f"{a},{b}\n" for a, b in big))
    (root / "csv" / "train.csv").write_text(TRAIN)
    (root / "csv" / "sub" / "small.csv").write_text("".join(f"{a},{b}\n" for a, b in small))
    np.save(root / "images.npy", images)
    return {"root": root, "big": sums(big), "small": sums(small),
            "images": sums(images.tolist())}


def port_closed(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def server_processes(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and state[state.rfind(")") + 2] != "Z":
            found.append(int(proc.name))
    return found


def test_cli_multi_record_splits_by_max_payload_and_reports_the_failed_batch(
        model, data, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [command("smchainer-transform"), str(data["root"] / "csv"), "--output-path", str(out),
         "--model-data", str(model["model_dir"]), "--entry-point", str(model["script"]),
         "--content-type", "text/csv", "--split-type", "Line", "--strategy", "MultiRecord",
         "--max-payload", "1", "--assemble-with", "Line"],
        capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    report = out / "_failures.json"
    total = BIG_ROWS + 5 + 3
    assert lines[-1] == (f"Error: 5 of {total} records failed (first: train.csv records 1-6: "
                         f"400 a row holds 'bad'); see {report}")
    # the other files are complete and correct, in record order
    assert (out / "big.csv.out").read_text() == data["big"]
    assert (out / "sub" / "small.csv.out").read_text() == data["small"]
    assert not (out / "train.csv.out").exists()  # never a partial .out
    assert f"big.csv: {BIG_ROWS} records, 3 requests -> {out / 'big.csv.out'}" in lines
    assert "sub/small.csv: 3 records, 1 request -> " + str(out / "sub" / "small.csv.out") in lines
    failed = report.read_text()
    assert json.loads(failed) == {
        "job_name": json.loads(failed)["job_name"], "status": "Failed",
        "input": str(data["root"] / "csv"), "output_path": str(out),
        "records": total, "failed_records": 5, "files": 3, "failed_files": ["train.csv"],
        "outputs": [str(out / "big.csv.out"), str(out / "sub" / "small.csv.out")],
        "failures": [{"file": "train.csv", "records": [1, 6], "record_count": 5,
                      "status": 400, "error": "a row holds 'bad'", "attempts": 1}]}
    # no bar when stderr is no terminal; the server it started is gone
    assert "\r" not in result.stderr
    server_line = next(line for line in lines if line.startswith("server http://"))
    assert "split Line, MultiRecord, max payload 1 MB, 1 request in flight" in server_line
    assert port_closed(server_line.split()[1].rstrip(":"))


def test_api_single_record_keeps_record_order_with_requests_in_flight(
        model, data, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [(i, i % 5) for i in range(40)]
    (folder / "order.csv").write_text("".join(f"{a},{b}\n" for a, b in rows))
    (folder / "train.csv").write_text(TRAIN)
    transformer = Model(model["model_dir"], entry_point=model["script"]).transformer(
        instance_count=2, strategy="SingleRecord", assemble_with="Line",
        output_path=tmp_path / "out", max_concurrent_transforms=4,
        env={"TEST_DELAY": "0.02"})
    with pytest.raises(TransformJobError) as raised:
        transformer.transform(str(folder), content_type="text/csv", split_type="Line")
    report = tmp_path / "out" / "_failures.json"
    assert str(raised.value) == (f"1 of 45 records failed (first: train.csv record 3: 400 a row "
                                 f"holds 'bad'); see {report}")
    assert raised.value.report == str(report)
    # answers arrive out of order (two workers, sleeps); the .out keeps the input's order
    assert (tmp_path / "out" / "order.csv.out").read_text() == sums(rows)
    job = transformer.latest_transform_job
    assert job.status == "Failed" and job.output_files == [str(tmp_path / "out/order.csv.out")]
    assert [failure.describe() for failure in job.failures] == [
        "train.csv record 3: 400 a row holds 'bad'"]
    described = job.describe()
    assert described["MaxConcurrentTransforms"] == 8  # 4 per instance, 2 instances
    assert described["BatchStrategy"] == "SingleRecord"
    printed = capsys.readouterr().out
    assert "order.csv: 40 records, 40 requests -> " in printed
    assert "train.csv: 1 of 5 records failed (record 3: 400 a row holds 'bad')" in printed
    assert port_closed(job.job.url)
    with pytest.raises(TransformJobError, match="1 of 45 records failed"):
        transformer.wait()  # asking again says the same


@pytest.mark.s3
def test_s3_prefix_in_and_out(model, data, s3_bucket):
    client = s3_client()
    root = data["root"]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket, "in/" + path.relative_to(root).as_posix())
    session = Session(default_bucket=s3_bucket)
    csv_model = Model(model["model_dir"], entry_point=model["script"], sagemaker_session=session)
    transformer = csv_model.transformer(output_path=f"s3://{s3_bucket}/out",
                                        assemble_with="Line", max_payload=1)
    with pytest.raises(TransformJobError) as raised:
        transformer.transform(f"s3://{s3_bucket}/in/csv", content_type="text/csv",
                              split_type="Line", logs=False)
    report = f"s3://{s3_bucket}/out/_failures.json"
    assert str(raised.value).endswith(f"(first: train.csv records 1-6: 400 a row holds 'bad'); "
                                      f"see {report}")

    def read(key: str) -> str:
        return client.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode()

    assert read("out/big.csv.out") == data["big"]
    assert read("out/sub/small.csv.out") == data["small"]
    failures = json.loads(read("out/_failures.json"))["failures"]
    assert [(f["file"], f["records"], f["status"]) for f in failures] == [
        ("train.csv", [1, 6], 400)]
    keys = {item["Key"] for item in client.list_objects_v2(
        Bucket=s3_bucket, Prefix="out/")["Contents"]}
    assert "out/train.csv.out" not in keys
    # the server's defaults: MultiRecord; a single object, whole (split None); no output_path:
    # s3://<default bucket>/<job name>, as the SDK
    npy = Model(model["model_dir"], entry_point=model["script"], sagemaker_session=session)
    images = npy.transformer()
    images.transform(f"s3://{s3_bucket}/in/images.npy", content_type="application/x-npy",
                     job_name="npy-job", logs=False)
    assert images.output_path == f"s3://{s3_bucket}/npy-job"
    assert read("npy-job/images.npy.out") == data["images"]
    assert images.latest_transform_job.output_files == [
        f"s3://{s3_bucket}/npy-job/images.npy.out"]
    with pytest.raises(StorageError, match=r"in/missing: no object or prefix"):
        images.transform(f"s3://{s3_bucket}/in/missing", logs=False)


def test_endpoint_url_is_used_and_left_running(model, data, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    server = ServerProcess(["--model-dir", str(model["model_dir"]), "--entry-point",
                            str(model["script"]), "--workers", "1"], tmp_path / "server.log",
                           env={"TEST_MARKERS": str(markers)})
    try:
        server.wait_ready(60)
        url = f"http://127.0.0.1:{server.port}"
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "small.csv.gz").write_bytes(gzip.compress(b"1,2\nflaky,3\n"))
        out = tmp_path / "out"
        (out).mkdir()
        (out / "_failures.json").write_text("{}")  # a stale report, removed by a success
        result = subprocess.run(
            [command("smchainer-transform"), str(folder), "--endpoint-url", url,
             "--output-path", str(out), "--content-type", "text/csv", "--split-type", "Line",
             "--compression-type", "Gzip", "--strategy", "SingleRecord"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        # the flaky record got a 500 once and went through when tried again
        assert (out / "small.csv.gz.out").read_text() == "3\n3\n"
        assert (markers / "flaky").exists()
        assert not (out / "_failures.json").exists()
        assert "completed: 1 file, 2 records, 2 requests" in result.stderr
        # the API on the same server: Transformer(url); no output_path: ./transforms/<job>
        monkeypatch.chdir(tmp_path)
        transformer = Transformer(url)
        transformer.transform(str(data["root"] / "images.npy"),
                              content_type="application/x-npy", job_name="npy", logs=False)
        assert transformer.output_path == str(tmp_path / "transforms" / "npy")
        assert (tmp_path / "transforms" / "npy" / "images.npy.out").read_text() == \
            data["images"]
        assert server.ping() == 200  # not stopped
        # a 415 is final at once (no retries), and the job says so
        with pytest.raises(TransformJobError, match=r"images.npy record 1: 415 cannot read"):
            transformer.transform(str(data["root"] / "images.npy"), content_type="image/png",
                                  logs=False)
        assert transformer.latest_transform_job.failures[0].attempts == 1
        # a file that cannot be gunzipped fails alone; the other one goes through
        (folder / "broken.csv.gz").write_bytes(b"not gzip")
        with pytest.raises(TransformJobError) as raised:
            transformer.transform(str(folder), content_type="text/csv", split_type="Line",
                                  compression_type="Gzip", job_name="gz", logs=False)
        assert str(raised.value).startswith(
            "1 of 2 files could not be read (first: broken.csv.gz: is not gzip data")
        assert (tmp_path / "transforms" / "gz" / "small.csv.gz.out").read_text() == "3\n3\n"
    finally:
        server.stop()


def test_interrupt_stops_the_server_it_started(model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "slow.csv").write_text("2,0\n")  # row % 3 == 2: sleeps 2 x TEST_DELAY
    marker = tmp_path / "unique-model"
    marker.mkdir()
    with subprocess.Popen(
            [command("smchainer-transform"), str(folder), "--output-path", str(tmp_path / "out"),
             "--model-data", str(marker), "--entry-point", str(model["script"]),
             "--content-type", "text/csv", "--env", "TEST_DELAY=1"],
            stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stderr is not None
            for line in process.stderr:
                if line.startswith("server http://"):
                    url = line.split()[1].rstrip(":")
                    break
            else:
                pytest.fail("the job never started")
            assert server_processes(str(marker))
            time.sleep(0.5)  # the request is in flight
            process.send_signal(signal.SIGINT)
            rest = process.stderr.read()
            assert process.wait(timeout=60) == 130
        finally:
            if process.poll() is None:
                process.kill()
    assert "Error: interrupted" in rest
    assert port_closed(url)
    assert server_processes(str(marker)) == []
    assert not (tmp_path / "out" / "slow.csv.out").exists()


def test_estimator_transformer_serves_the_trained_model(model, data, tmp_path):
    estimator = Chainer(entry_point=str(model["script"]), jobs_dir=tmp_path / "jobs")
    estimator.fit(logs=False)
    with pytest.warns(IgnoredArgumentWarning, match="tags= only matters on AWS"):
        transformer = estimator.transformer(output_path=tmp_path / "out", tags=[{"Key": "k"}])
    transformer.transform(str(data["root"] / "csv" / "sub"), content_type="text/csv",
                          split_type="Line", wait=False)
    job = transformer.latest_transform_job
    transformer.wait(logs=False)
    assert job.status == "Completed"
    assert (tmp_path / "out" / "small.csv.out").read_text() == data["small"]
    assert job.name.startswith(estimator.latest_training_job.name[:39])


@pytest.mark.parametrize("args, message", [
    ([], "give one of --model-data (a model to serve) and --endpoint-url"),
    (["--model-data", "M", "--endpoint-url", "http://127.0.0.1:1"], "give one of"),
    (["--endpoint-url", "ftp://x"], "endpoint URL 'ftp://x' must be http://HOST:PORT"),
    (["--endpoint-url", "http://127.0.0.1:1", "--instance-count", "2"],
     "--instance-count is for a server this command starts"),
    (["--model-data", "missing-model"], "--model-data missing-model does not exist"),
    (["--model-data", ".", "--entry-point", "nope.py"], "--entry-point nope.py is not a file"),
    (["--model-data", ".", "--split-type", "RecordIO"],
     "--split-type 'RecordIO' is not supported here: use Line, None"),
    (["--model-data", ".", "--strategy", "Some"], "--strategy must be one of SingleRecord"),
    (["--model-data", ".", "--max-payload", "-1"], "--max-payload must be a whole number >= 0"),
    (["--model-data", ".", "--max-concurrent-transforms", "x"],
     "--max-concurrent-transforms must be a whole number >= 1"),
    (["--model-data", ".", "--env", "1X=2"], "--env '1X=2': expected NAME=VALUE or NAME"),
    (["--model-data", ".", "--instance-type", "ml.big"], "--instance-type 'ml.big'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2_before_anything_starts(args, message, data, capsys):
    code = main([str(data["root"] / "csv"), *args])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("Error: ") and message in error


def test_missing_input_and_unreachable_server(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "--endpoint-url", "http://127.0.0.1:1"]) == 2
    assert f"Error: input {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    assert main([str(tmp_path / "in"), "--endpoint-url", "http://127.0.0.1:1"]) == 2
    assert "holds no files" in capsys.readouterr().err
    (tmp_path / "in" / "a.csv").write_text("1\n")
    code = main([str(tmp_path / "in"), "--endpoint-url", "http://127.0.0.1:1",
                 "--output-path", str(tmp_path / "out")])
    assert code == 1
    assert "Error: no server answers at http://127.0.0.1:1" in capsys.readouterr().err


def test_transformer_refuses_what_runs_only_on_sagemaker(model):
    transformer = Model(model["model_dir"], entry_point=model["script"]).transformer()
    with pytest.raises(ValueError, match="ManifestFile' is not supported here"):
        transformer.transform("s3://b/manifest", data_type="ManifestFile")
    with pytest.raises(ValueError, match="input_filter"):
        transformer.transform("data", input_filter="$[1:]")
    with pytest.raises(ValueError, match="split_type 'RecordIO' is not supported here"):
        transformer.transform("data", split_type="RecordIO")
    with pytest.raises(ValueError, match="strategy must be one of"):
        Model(model["model_dir"]).transformer(strategy="Batch")
    with pytest.raises(ValueError, match="name of an endpoint this process deployed"):
        Transformer("no-such-model")
