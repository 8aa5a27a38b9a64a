"""The SageMaker Chainer notebook flow through the API, on CIFAR-10 npz channels."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from smchainer.api import (
    Chainer,
    PredictionError,
    Predictor,
    Session,
    deserializers,
    serializers,
)
from tests.api.conftest import EXAMPLE, TINY_VGG, alive, load_script

PNG = b"\x89PNG\r\n\x1a\n"


def members(archive: str) -> list[str]:
    with tarfile.open(archive) as tar:
        return sorted(tar.getnames())


def read_log(job_dir: Path) -> list[dict]:
    """The LogReport entries the script wrote (``output.tar.gz`` holds them as ``log``)."""
    return json.loads((job_dir / "output" / "data" / "log").read_text())


def reference_logits(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """What the trained network answers in this process, through the script's own model_fn."""
    import chainer

    script = load_script(EXAMPLE / "train.py")
    model = script.model_fn(str(model_dir))
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(images).array


@pytest.fixture(scope="module")
def trained(cifar_channels, tmp_path_factory):
    """One single-process job of the example script, shared by this module's tests."""
    estimator = Chainer(entry_point="train.py", source_dir=str(EXAMPLE),
                        hyperparameters=TINY_VGG, train_instance_count=1,
                        train_instance_type="local",
                        jobs_dir=tmp_path_factory.mktemp("jobs"))
    estimator.fit({"train": str(cifar_channels["train"]), "test": str(cifar_channels["test"])})
    return estimator


@pytest.fixture(scope="module")
def test_images(cifar_channels):
    data = np.load(cifar_channels["test"] / "test.npz")
    return data["data"], data["labels"]


def test_fit_records_the_job_and_its_artifacts(trained, tmp_path):
    job = trained.latest_training_job
    assert job.status == "Completed"
    assert job.name.startswith("smchainer-chainer-")
    assert trained.job_dir == job.job_dir and job.job_dir.name == job.name
    assert trained.model_data == str(job.job_dir / "model.tar.gz")
    assert trained.output_data == str(job.job_dir / "output.tar.gz")
    assert members(trained.model_data) == ["model.npz", "net.json"]
    assert {"loss.png", "accuracy.png", "log"} <= set(members(trained.output_data))
    artifacts = Session().extract_artifact(trained.output_data, tmp_path / "artifacts")
    for plot in ("loss.png", "accuracy.png"):
        assert (artifacts / plot).read_bytes()[:8] == PNG
        assert (artifacts / plot).stat().st_size > 5000  # a drawn plot, not an empty canvas
    (entry,) = read_log(job.job_dir)
    # 250 images in batches of 32, in one process: 8 iterations.
    assert entry["epoch"] == 1 and entry["iteration"] == 8
    assert 0.0 <= entry["validation/main/accuracy"] <= 1.0
    assert job.describe()["TrainingJobStatus"] == "Completed"
    assert "training on @numpy" in job.log_path.read_text()


def test_deploy_predicts_what_the_model_computes(trained, test_images):
    images, _ = test_images
    batch = images[:20]
    expected = reference_logits(trained.job_dir / "model", batch)
    predictor = trained.deploy(initial_instance_count=1, instance_type="local")
    server = predictor.endpoint
    pids = server.process_ids()
    try:
        assert len(pids) == 2  # the gunicorn master and one worker
        answer = predictor.predict(batch)
        assert isinstance(answer, np.ndarray) and answer.shape == (20, 10)
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(answer.argmax(axis=1), expected.argmax(axis=1))
        # The SDK's other formats, swapped on the same endpoint.
        predictor.serializer = serializers.JSONSerializer()
        predictor.deserializer = deserializers.JSONDeserializer()
        as_json = predictor.predict(batch[:3])
        assert isinstance(as_json, list) and len(as_json) == 3 and len(as_json[0]) == 10
        np.testing.assert_allclose(as_json, expected[:3], rtol=1e-5, atol=1e-5)
        predictor.serializer = serializers.NumpySerializer()
        predictor.deserializer = deserializers.CSVDeserializer()
        rows = predictor.predict(batch[:2])
        assert len(rows) == 2 and len(rows[0]) == 10
        np.testing.assert_allclose(np.asarray(rows, dtype=np.float32), expected[:2], rtol=1e-5)
        predictor.deserializer = deserializers.NumpyDeserializer(accept="text/csv")
        np.testing.assert_allclose(predictor.predict(batch[:2]), expected[:2], rtol=1e-5)
    finally:
        predictor.delete_endpoint()
    assert not any(alive(pid) for pid in pids), "a server process outlived delete_endpoint"
    assert server.process_ids() == []
    with pytest.raises(Exception, match="cannot be reached"):
        predictor.predict(batch[:1])
    predictor.delete_endpoint()  # a second delete does nothing


def test_predictor_errors_carry_the_status(trained):
    with trained.deploy(initial_instance_count=1, instance_type="local") as predictor:
        with pytest.raises(PredictionError) as raised:
            predictor.predict(b"not npy", initial_args={"ContentType": "application/x-npy"})
        assert raised.value.status_code == 400
        assert "npy" in str(raised.value)
        pids = predictor.endpoint.process_ids()
        # A predictor built from the endpoint's name talks to the same server.
        other = Predictor(predictor.endpoint_name)
        assert other.endpoint_url == predictor.endpoint_url
    assert pids and not any(alive(pid) for pid in pids)
    with pytest.raises(Exception, match="no endpoint named"):
        Predictor(predictor.endpoint_name)


def test_workers_follow_the_instance_count(trained, test_images):
    images, labels = test_images
    predictor = trained.deploy(initial_instance_count=2, instance_type="local")
    pids = predictor.endpoint.process_ids()
    try:
        assert len(pids) == 3  # master + 2 workers, both with the model loaded
        assert predictor.endpoint.loaded_workers() == 2
        answers = [predictor.predict(images[i:i + 10]) for i in range(0, 100, 10)]
        predicted = np.concatenate(answers).argmax(axis=1)
        assert predicted.shape == labels.shape and set(predicted) <= set(range(10))
    finally:
        predictor.delete_endpoint()
    assert not any(alive(pid) for pid in pids)


def test_the_estimator_deletes_the_endpoint_it_deployed(trained, test_images):
    images, _ = test_images
    with pytest.raises(Exception, match="no endpoint to delete"):
        Chainer(entry_point="train.py", source_dir=str(EXAMPLE)).delete_endpoint()
    predictor = trained.deploy(initial_instance_count=1, instance_type="local")
    pids = predictor.endpoint.process_ids()
    assert predictor.predict(images[:2]).shape == (2, 10)
    trained.delete_endpoint()  # SDK v1's last notebook cell
    assert pids and not any(alive(pid) for pid in pids)
    with pytest.raises(Exception, match="no endpoint to delete"):
        trained.delete_endpoint()


def test_attach_serves_a_job_trained_before(trained, test_images):
    images, _ = test_images
    attached = Chainer.attach(trained.latest_training_job.name,
                              jobs_dir=trained.jobs_dir)
    assert attached.model_data == trained.model_data
    assert attached.hyperparameters() == trained.hyperparameters()
    assert attached.entry_point == "train.py"
    with attached.deploy(initial_instance_count=1, instance_type="local") as predictor:
        np.testing.assert_allclose(predictor.predict(images[:4]),
                                   reference_logits(trained.job_dir / "model", images[:4]),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="no training job 'nope'"):
        Chainer.attach("nope", jobs_dir=trained.jobs_dir)
