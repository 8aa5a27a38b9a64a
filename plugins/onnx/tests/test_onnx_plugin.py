"""The plugin through the hooks: converts, agrees with Chainer, falls back, caches."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chainer
import chainer.functions as F
import numpy as np
import pytest
from onnx_helpers import (
    chainer_logits,
    cifar10_images,
    randomize_batch_norm,
    write_vgg_dir,
)
from smchainer_onnx.runtime import CACHE_PREFIX, OnnxModel, cpu_count, intra_op_threads

from smchainer.errors import BadRequest, SmchainerError
from smchainer.manager import Hooks
from smchainer.models import VGG
from smchainer.plugins import get_plugin_manager

NPY = "application/x-npy"


@pytest.fixture(autouse=True)
def plugin_environment(monkeypatch) -> None:
    for name in ("SMCHAINER_ONNX", "SMCHAINER_ONNX_THREADS", "SMCHAINER_ONNX_INPUT_SHAPE",
                 "SAGEMAKER_MODEL_SERVER_WORKERS"):
        monkeypatch.delenv(name, raising=False)


def hooks_with(user_module: Path) -> Hooks:
    """The ONNX plugin (and no other installed one), the defaults and a user module."""
    return Hooks(get_plugin_manager(user_module=user_module, only=["onnx"]))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def predict(hooks: Hooks, model, batch: np.ndarray) -> np.ndarray:
    body, content_type = hooks.transform(model, npy(batch), NPY, NPY)
    assert content_type == NPY
    return np.load(io.BytesIO(body))


def small_vgg(seed: int) -> VGG:
    np.random.seed(seed)  # Chainer's initializers draw from NumPy's global generator
    return randomize_batch_norm(VGG(width=0.125, depth=8), seed=seed)


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{CACHE_PREFIX}*.onnx"))


@pytest.mark.slow
def test_vgg16_answers_cifar10_images_as_chainer_does(cifar10, tmp_path) -> None:
    model = randomize_batch_norm(VGG(depth=16), seed=1)
    hooks = hooks_with(write_vgg_dir(tmp_path / "model", model))
    served = hooks.model_fn(str(tmp_path / "model"))
    assert type(served) is OnnxModel
    images = cifar10_images(cifar10, 64)
    expected = chainer_logits(model, images)
    assert np.ptp(expected) > 1.0  # not a degenerate network that answers constants
    np.testing.assert_allclose(predict(hooks, served, images[:1]), expected[:1],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(predict(hooks, served, images), expected, rtol=1e-4, atol=1e-4)


def test_the_built_in_vgg_hooks_run_the_converted_model(cifar10, tmp_path, monkeypatch) -> None:
    from smchainer.default_plugins import vgg
    from smchainer.default_plugins.vgg.modelfile import save_model

    model = small_vgg(seed=4)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    save_model(model, tmp_path / "model", names, {})
    script = tmp_path / "inference.py"
    script.write_text("from smchainer.default_plugins.vgg import load_model as model_fn\n")
    hooks = hooks_with(script)
    served = hooks.model_fn(str(tmp_path / "model"))
    assert type(served) is OnnxModel and isinstance(served.chainer_model, VGG)
    images = cifar10_images(cifar10, 10)
    expected = chainer_logits(model, images)
    # The built-in VGG predict_fn takes the stand-in for its VGG (the model's
    # contract says what it is): class names come back, the scores from ONNX Runtime.
    context = hooks.request_context(served)
    body, _ = vgg.output_fn(vgg.predict_fn(images, served, context), "application/json", context)
    answer = json.loads(body)["predictions"]
    assert [p["class"] for p in answer] == [names[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose([p["scores"] for p in answer], expected, rtol=1e-4, atol=1e-4)
    # Through the whole hook chain, the answer is what plain Chainer serves.
    onnx_body, _ = hooks.transform(served, npy(images), NPY, "application/json")
    monkeypatch.setenv("SMCHAINER_ONNX", "0")
    plain = hooks.model_fn(str(tmp_path / "model"))
    assert type(plain) is VGG
    chainer_body, _ = hooks.transform(plain, npy(images), NPY, "application/json")
    onnx_structure, onnx_numbers = split_json(onnx_body)
    chainer_structure, chainer_numbers = split_json(chainer_body)
    assert onnx_structure == chainer_structure
    assert onnx_numbers == pytest.approx(chainer_numbers, rel=1e-4, abs=1e-4)


def split_json(body: bytes) -> tuple[object, list[float]]:
    """A JSON answer as (its structure with numbers blanked, its numbers in order)."""
    numbers: list[float] = []

    def blank(value):
        if isinstance(value, dict):
            return {key: blank(value[key]) for key in sorted(value)}
        if isinstance(value, list):
            return [blank(item) for item in value]
        if isinstance(value, float):
            numbers.append(value)
            return "<number>"
        return value

    return blank(json.loads(body)), numbers



def load_with_warnings(script, model_dir, caplog):
    """The hooks of ``script``, the model its ``model_fn`` served (the script's own MODEL),
    and the plugin's warnings while loading it."""
    hooks = hooks_with(script)
    with caplog.at_level(logging.WARNING, logger="smchainer_onnx"):
        served = hooks.model_fn(str(model_dir))
    assert served is sys.modules["inference"].MODEL
    return hooks, served, [r.getMessage() for r in caplog.records
                           if r.levelno == logging.WARNING]

def test_an_unsupported_layer_falls_back_to_chainer_with_a_warning(tmp_path, caplog) -> None:
    script = tmp_path / "inference.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from onnx_helpers import TanhNet

        np.random.seed(0)
        MODEL = TanhNet()

        def model_fn(model_dir):
            return MODEL
    """))
    hooks, served, warnings = load_with_warnings(script, tmp_path, caplog)
    assert any("plain Chainer" in w and "Tanh" in w for w in warnings), warnings
    batch = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(predict(hooks, served, batch), chainer_logits(served, batch))


def test_a_model_the_trace_cannot_capture_falls_back_after_the_check(tmp_path, caplog) -> None:
    script = tmp_path / "inference.py"
    script.write_text(textwrap.dedent("""
        import chainer
        import chainer.links as L
        import numpy as np

        class BatchScaled(chainer.Chain):
            # The scale depends on the batch size: the trace bakes in its own.
            def __init__(self):
                super().__init__()
                with self.init_scope():
                    self.fc = L.Linear(6, 3)

            def forward(self, x):
                return self.fc(x) * (1.0 / len(x))

        np.random.seed(0)
        MODEL = BatchScaled()

        def model_fn(model_dir):
            return MODEL
    """))
    (tmp_path / "smchainer-model.json").write_text(json.dumps({"input_shape": [6]}))
    hooks, served, warnings = load_with_warnings(script, tmp_path, caplog)
    assert any("plain Chainer" in w and "differ" in w for w in warnings), warnings
    assert cache_files(tmp_path) == []
    batch = np.random.default_rng(0).random((5, 6), dtype=np.float32)
    np.testing.assert_array_equal(predict(hooks, served, batch), chainer_logits(served, batch))


def test_models_that_are_not_chainer_links_pass_through(tmp_path) -> None:
    script = tmp_path / "inference.py"
    script.write_text(textwrap.dedent("""
        class Doubler:
            def __call__(self, x):
                return x * 2

        MODEL = Doubler()

        def model_fn(model_dir):
            return MODEL
    """))
    hooks = hooks_with(script)
    served = hooks.model_fn(str(tmp_path))
    assert served is sys.modules["inference"].MODEL
    assert cache_files(tmp_path) == []
    np.testing.assert_array_equal(predict(hooks, served, np.ones((2, 3), np.float32)), 2.0)


def test_a_users_predict_fn_runs_the_converted_model(tmp_path) -> None:
    model = small_vgg(seed=2)
    script = write_vgg_dir(tmp_path / "model", model)
    script.write_text(script.read_text() + textwrap.dedent("""

        import chainer.functions as F

        def predict_fn(input_data, model):
            with chainer.using_config("train", False):
                return F.softmax(model(input_data)).array
    """))
    hooks = hooks_with(script)
    served = hooks.model_fn(str(tmp_path / "model"))
    assert type(served) is OnnxModel
    batch = np.random.default_rng(5).random((3, 3, 32, 32), dtype=np.float32)
    expected = F.softmax(chainer_logits(model, batch)).array
    np.testing.assert_allclose(predict(hooks, served, batch), expected, rtol=1e-4, atol=1e-6)


def test_the_onnx_file_is_cached_reused_and_redone_when_the_weights_change(tmp_path) -> None:
    folder = tmp_path / "model"
    hooks = hooks_with(write_vgg_dir(folder, small_vgg(seed=1)))
    first = hooks.model_fn(str(folder))
    assert first.source is None
    [cached] = cache_files(folder)
    written = cached.stat().st_mtime_ns

    again = hooks_with(folder.parent / "inference.py").model_fn(str(folder))
    assert again.source == str(cached)
    assert cached.stat().st_mtime_ns == written

    retrained = small_vgg(seed=3)
    chainer.serializers.save_npz(str(folder / "model.npz"), retrained)
    redone = hooks.model_fn(str(folder))
    assert redone.source is None
    [replacement] = cache_files(folder)
    assert replacement != cached
    batch = np.random.default_rng(9).random((5, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(predict(hooks, redone, batch), chainer_logits(retrained, batch),
                               rtol=1e-4, atol=1e-4)


def test_a_damaged_cache_file_is_replaced(tmp_path, caplog) -> None:
    folder = tmp_path / "model"
    hooks = hooks_with(write_vgg_dir(folder, small_vgg(seed=1)))
    hooks.model_fn(str(folder))
    [cached] = cache_files(folder)
    cached.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="smchainer_onnx"):
        served = hooks.model_fn(str(folder))
    assert type(served) is OnnxModel and served.source is None
    assert any("ignoring cached" in r.getMessage() for r in caplog.records)
    assert hooks.model_fn(str(folder)).source == str(cached)


def test_smchainer_onnx_0_switches_the_plugin_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SMCHAINER_ONNX", "0")
    hooks = hooks_with(write_vgg_dir(tmp_path / "model", small_vgg(seed=1)))
    assert type(hooks.model_fn(str(tmp_path / "model"))) is VGG
    assert cache_files(tmp_path / "model") == []


def test_a_model_bound_for_a_gpu_is_left_to_chainer(tmp_path, monkeypatch) -> None:
    import smchainer_onnx.plugin

    # This machine has no GPU: pretend the server found one, as it would decide.
    monkeypatch.setattr(smchainer_onnx.plugin, "worker_gpu", lambda index: "gpu:0")
    hooks = hooks_with(write_vgg_dir(tmp_path / "model", small_vgg(seed=1)))
    assert type(hooks.model_fn(str(tmp_path / "model"))) is VGG


def test_the_input_shape_comes_from_the_environment_when_metadata_lacks_it(
    tmp_path, monkeypatch, caplog
) -> None:
    folder = tmp_path / "model"
    hooks = hooks_with(write_vgg_dir(folder, small_vgg(seed=1), input_shape=None))
    with caplog.at_level(logging.WARNING, logger="smchainer_onnx"):
        assert type(hooks.model_fn(str(folder))) is VGG
    assert any("input shape is unknown" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("SMCHAINER_ONNX_INPUT_SHAPE", "3,32,32")
    assert type(hooks.model_fn(str(folder))) is OnnxModel
    monkeypatch.setenv("SMCHAINER_ONNX_INPUT_SHAPE", "3,thirty-two")
    with pytest.raises(SmchainerError, match="SMCHAINER_ONNX_INPUT_SHAPE"):
        hooks.model_fn(str(folder))


def test_threads_share_the_cpus_among_gunicorn_workers(tmp_path, monkeypatch) -> None:
    cpus = cpu_count()
    assert intra_op_threads({}) == 1  # the server's default: one worker per CPU
    assert intra_op_threads({"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}) == cpus
    assert intra_op_threads({"SAGEMAKER_MODEL_SERVER_WORKERS": str(cpus * 4)}) == 1
    assert intra_op_threads({"SMCHAINER_ONNX_THREADS": "3",
                             "SAGEMAKER_MODEL_SERVER_WORKERS": "64"}) == 3
    # A worker the server bound to its own 3 CPUs uses them, whatever the worker count.
    assert intra_op_threads({"SMCHAINER_WORKER_CPUS": "3",
                             "SAGEMAKER_MODEL_SERVER_WORKERS": "64"}) == 3
    assert intra_op_threads({"SMCHAINER_ONNX_THREADS": "2", "SMCHAINER_WORKER_CPUS": "3"}) == 2
    for bad in ("0", "-2", "many"):
        with pytest.raises(SmchainerError, match="SMCHAINER_ONNX_THREADS"):
            intra_op_threads({"SMCHAINER_ONNX_THREADS": bad})
    monkeypatch.setenv("SAGEMAKER_MODEL_SERVER_WORKERS", "1")
    hooks = hooks_with(write_vgg_dir(tmp_path / "model", small_vgg(seed=1)))
    served = hooks.model_fn(str(tmp_path / "model"))
    assert served.session.get_session_options().intra_op_num_threads == cpus


def test_bad_batches_are_400s_not_crashes(tmp_path) -> None:
    hooks = hooks_with(write_vgg_dir(tmp_path / "model", small_vgg(seed=1)))
    served = hooks.model_fn(str(tmp_path / "model"))
    with pytest.raises(BadRequest, match="N x 3 x 32 x 32"):
        predict(hooks, served, np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(BadRequest, match="uint8"):
        served.predict(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(BadRequest, match="empty"):
        served.predict(np.zeros((0, 3, 32, 32), np.float32))


def test_a_fresh_process_discovers_the_plugin() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "smchainer"), "plugins"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SMCHAINER_LOAD_PLUGINS": "onnx"},
    )
    assert result.returncode == 0, result.stderr
    [onnx] = [p for p in json.loads(result.stdout) if p["name"] == "onnx"]
    assert onnx["distribution"] == "smchainer-onnx"
    assert onnx["hooks"] == ["model_fn"]
