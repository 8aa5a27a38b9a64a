"""The hooks together, in process: the model's metadata, top-k JSON, composition."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from image_helpers import encode, make_zip, softmax
from PIL import Image

from smchainer import hookimpl
from smchainer.classification import Classification
from smchainer.errors import SmchainerError
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
LOGITS = np.array([[0.5, 3.0, -1.0, 2.0, 0.0, 1.0, -2.0]], np.float32)


class Model:
    """A stand-in model that answers fixed scores, one row per image."""

    def __init__(self, rows: np.ndarray, as_classification: bool = True,
                 class_names: list[str] | None = None) -> None:
        self.rows = rows
        self.as_classification = as_classification
        if class_names is not None:
            self.class_names = class_names

    def __call__(self, batch: np.ndarray):
        scores = np.resize(self.rows, (len(batch), self.rows.shape[1])).astype(np.float32)
        scores[:, 0] += batch.mean(axis=(1, 2, 3))  # so the images' order shows
        if self.as_classification:
            return Classification(scores, list(getattr(self, "class_names", [])))
        return scores


class Serving:
    """A user's model_fn and predict_fn, as an inference.py would define them."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.inputs: list[np.ndarray] = []

    @hookimpl
    def model_fn(self, model_dir):
        return self.model

    @hookimpl
    def predict_fn(self, input_data, model):
        self.inputs.append(input_data)
        return model(np.asarray(input_data))


def model_dir(tmp_path, **metadata):
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    if metadata:
        (folder / "smchainer-model.json").write_text(json.dumps(metadata))
    return folder


def serve(tmp_path, model: Model, extra=(), **metadata) -> tuple[Hooks, object, Serving]:
    serving = Serving(model)
    hooks = Hooks(get_plugin_manager(only=["image"], extra_plugins=[("user", serving), *extra]))
    loaded = hooks.model_fn(str(model_dir(tmp_path, **metadata)))
    return hooks, loaded, serving


def rgb_png(size=(64, 64), value=128) -> bytes:
    return encode(Image.new("RGB", size, (value, value, value)))


def test_images_are_resized_to_the_input_the_metadata_describes(tmp_path) -> None:
    hooks, model, serving = serve(tmp_path, Model(LOGITS),
                                  input={"shape": [3, 16, 16], "range": [0, 1]})
    hooks.transform(model, rgb_png((64, 40)), "image/png", "application/x-npy")
    assert serving.inputs[-1].shape == (1, 3, 16, 16)
    assert serving.inputs[-1].dtype == np.float32
    np.testing.assert_allclose(serving.inputs[-1], 128 / 255)


def test_without_metadata_images_keep_their_size(tmp_path) -> None:
    hooks, model, serving = serve(tmp_path, Model(LOGITS))
    hooks.transform(model, rgb_png((64, 40)), "image/png", "application/x-npy")
    assert serving.inputs[-1].shape == (1, 3, 40, 64)


@pytest.mark.parametrize("variable", ["SMCHAINER_TOP_K", "SMCHAINER_IMAGE_MAX_BATCH"])
@pytest.mark.parametrize("value", ["0", "three", "-2"])
def test_bad_settings_fail_the_model_load_naming_the_variable(tmp_path, monkeypatch,
                                                              variable, value) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SmchainerError, match=f"{variable} must be a positive integer"):
        serve(tmp_path, Model(LOGITS))


def test_json_for_an_image_has_the_top_five_classes_with_names(tmp_path) -> None:
    hooks, model, _ = serve(tmp_path, Model(LOGITS, class_names=NAMES),
                            input={"shape": [3, 8, 8]}, class_names=NAMES)
    body, content_type = hooks.transform(model, rgb_png(value=0), "image/jpeg", "application/*")
    assert content_type == "application/json"
    (entry,) = json.loads(body)["predictions"]
    # The built-in VGG's keys, unchanged ...
    assert entry["label"] == 1 and entry["class"] == "bee"
    np.testing.assert_allclose(entry["scores"], LOGITS[0])
    probabilities = softmax(LOGITS)[0]
    assert entry["probability"] == pytest.approx(probabilities[1])
    # ... and the top five, most probable first.
    assert [c["class"] for c in entry["top_k"]] == ["bee", "dog", "fox", "ant", "eel"]
    assert [c["label"] for c in entry["top_k"]] == [1, 3, 5, 0, 4]
    np.testing.assert_allclose([c["probability"] for c in entry["top_k"]],
                               probabilities[[1, 3, 5, 0, 4]], rtol=1e-6)
    assert entry["top_k"][0]["probability"] == entry["probability"]
    assert "image" not in entry


def test_top_k_comes_from_the_environment_and_stops_at_the_classes(tmp_path,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("SMCHAINER_TOP_K", "2")
    hooks, model, _ = serve(tmp_path, Model(LOGITS, class_names=NAMES))
    body, _ = hooks.transform(model, rgb_png(), "image/png", "application/json")
    assert [c["class"] for c in json.loads(body)["predictions"][0]["top_k"]] == ["bee", "dog"]
    monkeypatch.setenv("SMCHAINER_TOP_K", "50")
    hooks, model, _ = serve(tmp_path / "again", Model(LOGITS, class_names=NAMES))
    body, _ = hooks.transform(model, rgb_png(), "image/png", "application/json")
    assert len(json.loads(body)["predictions"][0]["top_k"]) == len(NAMES)


def test_a_zip_answers_one_entry_per_member_in_name_order(tmp_path) -> None:
    hooks, model, serving = serve(tmp_path, Model(LOGITS, class_names=NAMES),
                                  input={"shape": [3, 8, 8]})
    members = [("c.png", rgb_png(value=255)), ("a.png", rgb_png(value=0)),
               ("b.png", rgb_png(value=51))]
    body, _ = hooks.transform(model, make_zip(members), "application/zip", "application/json")
    entries = json.loads(body)["predictions"]
    assert [e["image"] for e in entries] == ["a.png", "b.png", "c.png"]
    # The first score carries each image's mean: 0, 0.2, 1 in name order.
    np.testing.assert_allclose([e["scores"][0] for e in entries], [0.5, 0.7, 1.5], atol=1e-6)
    assert serving.inputs[-1].shape == (3, 3, 8, 8)
    npy, content_type = hooks.transform(model, make_zip(members), "application/zip",
                                        "application/x-npy")
    assert content_type == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(npy))[:, 0], [0.5, 0.7, 1.5], atol=1e-6)


def test_plain_arrays_get_top_k_when_the_metadata_names_the_classes(tmp_path) -> None:
    probabilities = softmax(LOGITS).astype(np.float32)
    hooks, model, _ = serve(tmp_path, Model(probabilities, as_classification=False),
                            class_names=NAMES)
    body, _ = hooks.transform(model, rgb_png(value=0), "image/png", "application/json")
    (entry,) = json.loads(body)["predictions"]
    assert entry["class"] == "bee"
    # Rows that are distributions already are used as they are, not softmaxed again.
    assert entry["top_k"][0]["probability"] == pytest.approx(float(probabilities[0, 1]))
    assert entry["probability"] == pytest.approx(float(probabilities[0, 1]))


def test_plain_arrays_without_class_names_pass_on_to_the_defaults(tmp_path) -> None:
    hooks, model, _ = serve(tmp_path, Model(LOGITS, as_classification=False))
    body, _ = hooks.transform(model, rgb_png(value=0), "image/png", "application/json")
    np.testing.assert_allclose(json.loads(body), LOGITS, rtol=1e-6)


def test_non_image_requests_keep_the_vgg_json_without_top_k(tmp_path) -> None:
    hooks, model, _ = serve(tmp_path, Model(LOGITS, class_names=NAMES),
                            input={"shape": [3, 8, 8]})
    hooks.input_fn(rgb_png(), "image/png")  # an image decoded earlier in this thread
    npy = io.BytesIO()
    np.save(npy, np.zeros((1, 3, 8, 8), np.float32))
    body, _ = hooks.transform(model, npy.getvalue(), "application/x-npy", "application/json")
    (entry,) = json.loads(body)["predictions"]
    assert entry["class"] == "bee" and "top_k" not in entry


def test_a_users_output_fn_still_sees_the_vgg_classification(tmp_path) -> None:
    class UserOutput:
        @hookimpl
        def output_fn(self, prediction, accept):
            return json.dumps({"type": type(prediction).__name__}), "application/json"

    hooks, model, _ = serve(tmp_path, Model(LOGITS, class_names=NAMES),
                            extra=[("user-output", UserOutput())])
    body, _ = hooks.transform(model, rgb_png(), "image/png", "application/json")
    assert json.loads(body) == {"type": "Classification"}


def test_installed_image_and_onnx_plugins_leave_dynamic_batching_on(tmp_path) -> None:
    for only in (["image"], ["image", "onnx"]):
        assert Hooks(get_plugin_manager(only=only)).batching_refusal() is None, only


def test_merged_image_requests_answer_like_requests_alone(tmp_path) -> None:
    """Two PNGs and a zip of three, merged into one VGG predict_fn call by the batcher."""
    from image_helpers import png, save_vgg

    from smchainer.serving.batching import Batcher, Job

    save_vgg(tmp_path)
    hooks = Hooks(get_plugin_manager(only=["image"]))
    model = hooks.model_fn(str(tmp_path))
    rng = np.random.RandomState(3)
    images = [png((rng.uniform(0, 255, (32, 32, 3))).astype(np.uint8)) for _ in range(5)]
    bodies = [(images[0], "image/png"), (images[1], "image/png"),
              (make_zip([(f"m{i}.png", image) for i, image in enumerate(images[2:])]),
               "application/zip")]
    alone = [json.loads(hooks.transform(model, body, kind, "application/json")[0])
             for body, kind in bodies]
    calls = []
    batcher = Batcher(hooks, 8, 0.0, lambda items, requests: calls.append((items, requests)))
    jobs = [Job(body, kind, ["application/json"], float("inf")) for body, kind in bodies]
    assert all(batcher.prepare(job, model) for job in jobs)
    batcher.run_merged(jobs, model)
    assert calls == [(5, 3)]
    for job, expected in zip(jobs, alone, strict=True):
        body, kind = job.future.result(timeout=10)
        merged = json.loads(body)
        assert kind == "application/json" and len(merged["predictions"]) == len(
            expected["predictions"])
        for got, want in zip(merged["predictions"], expected["predictions"], strict=True):
            assert got["label"] == want["label"] and got.get("image") == want.get("image")
            assert [c["class"] for c in got["top_k"]] == [c["class"] for c in want["top_k"]]
            np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)
