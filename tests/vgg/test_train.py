"""The built-in trainer end to end on real CIFAR-10 images, on the CPU."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from smchainer.default_plugins.vgg import hyperparameters as vgg_hp
from smchainer.errors import SmchainerError
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager
from smchainer.training.env import TrainingEnv

#: A VGG small enough to learn something in seconds on two cores.
SMALL = {"depth": 8, "width": 0.125, "progress-bar": "false"}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run(job_dir: Path, channels: dict[str, Path], **hyperparameters) -> dict:
    env = TrainingEnv(job_dir=job_dir, channels=channels, hyperparameters=hyperparameters)
    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    return hooks.train(env)


def saved_arrays(model_dir: Path) -> dict[str, np.ndarray]:
    with np.load(model_dir / "model.npz") as saved:
        return {key: saved[key] for key in saved.files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_npz_channels, cifar_cache) -> tuple[Path, dict]:
    """A small VGG trained for 4 epochs on 4,000 CIFAR-10 images (about 20 s)."""
    job = tmp_path_factory.mktemp("job")
    metrics = run(
        job, cifar_npz_channels, epochs=4, **SMALL, **{"lr-schedule": "onecycle",
                                                       "cache-dir": str(cifar_cache)},
    )
    return job, metrics


@pytest.mark.slow
def test_a_small_vgg_learns_cifar10(trained) -> None:
    job, metrics = trained
    # Seen: about 0.40 after 4 epochs of 4,000 images; chance is 0.10.
    assert metrics["test_accuracy"] > 0.25, metrics
    assert metrics["test_images"] == 1000 and metrics["train_images"] == 4000
    assert metrics["test_source"] == "channel test"
    written = json.loads((job / "output" / "data" / "metrics.json").read_text())
    assert written["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    log = json.loads((job / "output" / "data" / "log").read_text())
    assert [entry["epoch"] for entry in log] == [1, 2, 3, 4]
    assert log[-1]["main/loss"] < log[0]["main/loss"]
    assert log[-1]["validation/main/accuracy"] == pytest.approx(metrics["test_accuracy"])
    for plot in ("loss.png", "accuracy.png"):
        assert (job / "output" / "data" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    snapshots = sorted(p.name for p in (job / "checkpoints").iterdir())
    assert snapshots == ["snapshot_iter_188.rank0of1.npz", "snapshot_iter_250.rank0of1.npz"]


@pytest.mark.slow
def test_the_saved_model_carries_its_metadata(trained) -> None:
    job, _ = trained
    metadata = json.loads((job / "model" / "smchainer-model.json").read_text())
    assert metadata["architecture"] == "smchainer.models.VGG"
    assert (metadata["depth"], metadata["width"], metadata["n_classes"]) == (8, 0.125, 10)
    assert metadata["class_names"] == CLASSES
    assert metadata["input"]["shape"] == [3, 32, 32]
    # Normalisation measured on the training images, close to CIFAR-10's.
    np.testing.assert_allclose(metadata["normalization"]["mean"], [0.49, 0.48, 0.45], atol=0.02)
    np.testing.assert_allclose(metadata["normalization"]["std"], [0.25, 0.24, 0.26], atol=0.02)
    arrays = saved_arrays(job / "model")
    np.testing.assert_allclose(arrays["mean"], metadata["normalization"]["mean"], rtol=1e-6)
    assert "block1_1/conv/W" in arrays and "fc2/W" in arrays


@pytest.mark.slow
def test_the_default_plugins_serve_the_saved_model(trained, cifar_npz_channels) -> None:
    job, metrics = trained
    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    model = hooks.model_fn(str(job / "model"))
    with np.load(cifar_npz_channels["test"] / "test.npz") as test:
        images, labels = test["data"], test["labels"]

    body = io.BytesIO()
    np.save(body, images)  # what the SageMaker example's client sends
    answer, content_type = hooks.transform(model, body.getvalue(), "application/x-npy",
                                           "application/x-npy")
    scores = np.load(io.BytesIO(answer))
    assert content_type == "application/x-npy"
    assert scores.shape == (1000, 10) and scores.dtype == np.float32
    # The served model is the trained one: same accuracy as the final evaluation.
    accuracy = float((scores.argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    answer, content_type = hooks.transform(
        model, json.dumps(images[:3].tolist()).encode(), "application/json", "application/json"
    )
    predictions = json.loads(answer)["predictions"]
    assert content_type == "application/json" and len(predictions) == 3
    for prediction, row in zip(predictions, scores[:3], strict=True):
        assert prediction["label"] == int(row.argmax())
        assert prediction["class"] == CLASSES[prediction["label"]]
        np.testing.assert_allclose(prediction["scores"], row, rtol=1e-5, atol=1e-5)
        assert 0.1 <= prediction["probability"] <= 1.0

    csv_body = "\n".join(",".join(f"{v:.9g}" for v in image.ravel()) for image in images[:2])
    answer, content_type = hooks.transform(model, csv_body.encode(), "text/csv", "text/csv")
    served = np.loadtxt(io.StringIO(answer.decode()), delimiter=",", ndmin=2)
    assert content_type == "text/csv"
    np.testing.assert_allclose(served, scores[:2], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "array, message",
    [(np.zeros((2, 3, 28, 28), np.float32), r"got shape \[2, 3, 28, 28\]"),
     (np.full((1, 3, 32, 32), 255.0, np.float32), "scale 0-255 pixels by 1/255"),
     (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN")],
)
def test_bad_requests_are_400s(trained, array, message) -> None:
    from smchainer.errors import BadRequest

    job, _ = trained
    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    model = hooks.model_fn(str(job / "model"))
    body = io.BytesIO()
    np.save(body, array)
    with pytest.raises(BadRequest, match=message) as caught:
        hooks.transform(model, body.getvalue(), "application/x-npy", "application/json")
    assert caught.value.status_code == 400


def test_other_model_dirs_get_the_default_error(tmp_path) -> None:
    (tmp_path / "model.npz").write_bytes(b"")  # someone else's model, no metadata
    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    with pytest.raises(SmchainerError, match="no model_fn could load"):
        hooks.model_fn(str(tmp_path))


def test_metadata_without_weights_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "smchainer-model.json").write_text(json.dumps(
        {"architecture": "smchainer.models.VGG", "n_classes": 10, "width": 0.125, "depth": 8}
    ))
    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    with pytest.raises(SmchainerError, match="no model.npz"):
        hooks.model_fn(str(tmp_path))


def test_missing_train_channel_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(SmchainerError, match="needs a 'train' channel"):
        run(tmp_path / "job", {"test": tmp_path}, **SMALL)


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_same_weights(tmp_path, cifar_npz_channels) -> None:
    tiny = {**SMALL, "width": 0.0625, "train-samples": 320, "test-samples": 64,
            "batch-size": 32, "cache-dir": str(tmp_path / "cache")}
    whole = run(tmp_path / "whole", cifar_npz_channels, epochs=2, **tiny)
    assert whole["iteration"] == 20 and whole["resumed_from_iteration"] is None

    first = run(tmp_path / "stopped", cifar_npz_channels, epochs=1, **tiny)
    assert first["iteration"] == 10
    second = run(tmp_path / "stopped", cifar_npz_channels, epochs=2, **tiny)
    assert second["resumed_from_iteration"] == 10 and second["iteration"] == 20

    # Stopped in the middle of an epoch, from an every-3-iterations snapshot.
    mid = {**tiny, "checkpoint-every": 3}
    run(tmp_path / "mid", cifar_npz_channels, iterations=7, **mid)
    assert sorted(p.name for p in (tmp_path / "mid" / "checkpoints").iterdir()) == [
        "snapshot_iter_3.rank0of1.npz", "snapshot_iter_6.rank0of1.npz",
    ]
    resumed = run(tmp_path / "mid", cifar_npz_channels, epochs=2, **mid)
    assert resumed["resumed_from_iteration"] == 6

    expected = saved_arrays(tmp_path / "whole" / "model")
    for job in ("stopped", "mid"):
        got = saved_arrays(tmp_path / job / "model")
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{job}: {key}")
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    log = json.loads((tmp_path / "stopped" / "output" / "data" / "log").read_text())
    assert [entry["epoch"] for entry in log] == [1, 2]  # the log went on, not over

    # A different seed really gives different weights (the comparison can fail).
    other = run(tmp_path / "other", cifar_npz_channels, epochs=1, seed=1, **tiny)
    assert other["iteration"] == 10
    differs = saved_arrays(tmp_path / "other" / "model")["fc2/W"]
    assert not np.array_equal(differs, saved_arrays(tmp_path / "stopped" / "model")["fc2/W"])


class SnapshotPayload:
    """Unpickling this creates a folder: proof that code from a snapshot ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_a_damaged_newest_snapshot_is_skipped_for_the_older_one(tmp_path, cifar_npz_channels,
                                                                 caplog, damage) -> None:
    import logging
    import pickle

    tiny = {**SMALL, "width": 0.0625, "train-samples": 320, "test-samples": 64,
            "batch-size": 32, "cache-dir": str(tmp_path / "cache"), "checkpoint-every": 3}
    whole = run(tmp_path / "whole", cifar_npz_channels, iterations=9, **tiny)
    run(tmp_path / "job", cifar_npz_channels, iterations=7, **tiny)
    checkpoints = tmp_path / "job" / "checkpoints"
    newest = checkpoints / "snapshot_iter_6.rank0of1.npz"
    marker = tmp_path / "payload-ran"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.write_bytes(pickle.dumps(SnapshotPayload(str(marker))))
    with caplog.at_level(logging.WARNING):
        resumed = run(tmp_path / "job", cifar_npz_channels, iterations=9, **tiny)
    assert resumed["resumed_from_iteration"] == 3 and resumed["iteration"] == 9
    assert not marker.exists()
    warning = next(r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage())
    assert str(newest) in warning and "is not an .npz archive" in warning
    assert (checkpoints / "snapshot_iter_6.rank0of1.npz.damaged").exists()
    # Resuming from the older snapshot ends where the uninterrupted run ended.
    expected = saved_arrays(tmp_path / "whole" / "model")
    got = saved_arrays(tmp_path / "job" / "model")
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_hold_out_without_a_test_channel(tmp_path, cifar_npz_channels, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO):
        metrics = run(
            tmp_path / "job", {"train": cifar_npz_channels["train"]}, iterations=2,
            **{**SMALL, "width": 0.0625, "train-samples": 200, "holdout": 0.25,
               "cache-dir": str(tmp_path / "cache")},
        )
    assert metrics["train_images"] == 150 and metrics["test_images"] == 50
    assert "held out" in metrics["test_source"]
    assert "no test channel: evaluating on 50 images" in caplog.text


def test_training_hyperparameter_errors_reach_the_user(tmp_path, cifar_npz_channels) -> None:
    with pytest.raises(SmchainerError, match="unknown hyperparameter 'epoch'"):
        run(tmp_path / "job", cifar_npz_channels, epoch=3)
    assert vgg_hp.HYPERPARAMETERS["epochs"][1] == 50


def test_a_snapshot_of_another_width_names_the_arrays_and_hyperparameters(
        tmp_path, cifar_npz_channels) -> None:
    tiny = {**SMALL, "train-samples": 64, "test-samples": 32, "batch-size": 32,
            "cache-dir": str(tmp_path / "cache")}
    run(tmp_path / "job", cifar_npz_channels, epochs=1, **{**tiny, "width": 0.0625})
    with pytest.raises(SmchainerError) as refused:
        run(tmp_path / "job", cifar_npz_channels, epochs=2, **tiny)
    message = str(refused.value)
    assert "snapshot_iter_2.rank0of1.npz does not fit this job's model" in message, message
    assert "arrays differ" in message and "in the snapshot" in message
    assert "width 0.0625 then, 0.125 now" in message
    assert "epochs" not in message  # a longer run is what resuming is for
