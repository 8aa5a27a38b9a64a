"""The exporter: ONNX Runtime must answer what Chainer answers, or refuse."""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import onnx
import pytest
from onnx_helpers import SmallNet, TanhNet, chainer_logits, randomize_batch_norm
from smchainer_onnx.export import UnsupportedLayer, export_onnx
from smchainer_onnx.runtime import open_session


def run_onnx(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    return open_session(model.SerializeToString(), threads=1).run(None, {"input": batch})[0]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def sample(shape, batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


@pytest.mark.parametrize("size", [15, 32])
def test_every_supported_layer_matches_chainer_at_any_batch_size(size) -> None:
    model = randomize_batch_norm(SmallNet())
    shape = (3, size, size)
    exported = export_onnx(model, sample(shape))
    for batch_size in (1, 2, 7):
        batch = sample(shape, batch_size, seed=batch_size)
        expected = chainer_logits(model, batch)
        got = run_onnx(exported, batch)
        assert got.shape == expected.shape == (batch_size, 5)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    batch_axis = exported.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param == "N"


def test_batch_norm_folds_into_the_layer_before_it_only() -> None:
    exported = export_onnx(randomize_batch_norm(SmallNet()), sample((3, 15, 15)))
    ops = op_types(exported)
    # bn1, bn2 (after convolutions) and bn_fc1 (after a linear layer) fold;
    # bn3 follows a ReLU and stays.
    assert ops.count("BatchNormalization") == 1
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 2
    assert "Dropout" not in ops
    names = {init.name for init in exported.graph.initializer}
    assert "conv1.W" not in names and "fc2.W" in names


@pytest.mark.parametrize(
    "ksize, stride, pad, cover_all, size, out",
    [
        (2, 2, 0, True, 7, 4),  # ONNX's floor would give 3
        (3, 3, 0, True, 7, 3),
        (3, 2, 1, True, 8, 5),
        (3, 2, 1, False, 7, 4),
        (2, 2, 0, True, 32, 16),
    ],
)
def test_max_pooling_output_sizes_follow_chainer(ksize, stride, pad, cover_all, size, out) -> None:
    class Pool(chainer.Chain):
        def forward(self, x):
            return F.max_pooling_2d(x, ksize, stride=stride, pad=pad, cover_all=cover_all)

    # Negative values too, so that padding must never win a maximum.
    batch = np.random.default_rng(3).normal(size=(3, 2, size, size)).astype(np.float32)
    exported = export_onnx(Pool(), batch[:2])
    expected = chainer_logits(Pool(), batch)
    assert expected.shape == (3, 2, out, out)
    np.testing.assert_array_equal(run_onnx(exported, batch), expected)


def test_broadcasts_keep_the_batch_dimension_dynamic() -> None:
    class Normalise(chainer.Chain):
        def forward(self, x):
            mean = np.array([0.1, 0.2], np.float32).reshape(1, 2, 1)
            scale = np.array([2.0, 4.0], np.float32).reshape(1, 2, 1)
            h = (x - F.broadcast_to(mean, x.shape)) * F.broadcast_to(scale, x.shape)
            peak = F.max_pooling_nd(h, 4)  # N x 2 x 1
            return h - F.broadcast_to(peak, h.shape)

    model = Normalise()
    exported = export_onnx(model, sample((2, 4)))
    # The constants broadcast inside Sub and Mul; only the computed peak is expanded.
    assert op_types(exported).count("Expand") == 1
    for batch_size in (1, 5):
        batch = sample((2, 4), batch_size, seed=7)
        np.testing.assert_allclose(run_onnx(exported, batch), chainer_logits(model, batch),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "layer, name",
    [(F.tanh, "Tanh"), (lambda h: F.average_pooling_2d(h, 2), "AveragePooling")],
)
def test_an_untranslated_function_is_named(layer, name) -> None:
    class Net(chainer.Chain):
        def __init__(self) -> None:
            super().__init__()
            with self.init_scope():
                self.conv = L.Convolution2D(3, 4, 3, pad=1)

        def forward(self, x):
            return layer(self.conv(x))

    with pytest.raises(UnsupportedLayer, match=name):
        export_onnx(Net(), sample((3, 8, 8)))
    with pytest.raises(UnsupportedLayer, match="Tanh"):
        export_onnx(TanhNet(), sample((3, 32, 32)))


def test_inputs_other_than_float32_are_refused() -> None:
    with pytest.raises(UnsupportedLayer, match="float64"):
        export_onnx(L.Linear(4, 2), sample((4,)).astype(np.float64))


def test_a_model_that_returns_several_outputs_is_refused() -> None:
    class Two(chainer.Chain):
        def forward(self, x):
            return F.relu(x), x

    with pytest.raises(UnsupportedLayer, match="tuple"):
        export_onnx(Two(), sample((3,)))


@pytest.mark.parametrize("fused", [True, None])
def test_a_vgg_on_the_fused_path_exports_through_chainers_functions(fused) -> None:
    from smchainer.models.vgg import VGG

    np.random.seed(0)
    model = randomize_batch_norm(VGG(width=0.125, depth=8))
    model.fused = fused
    exported = export_onnx(model, sample((3, 32, 32)))
    assert model.fused is fused  # put back as it was
    assert "Conv" in op_types(exported)
    batch = sample((3, 32, 32), 3, seed=4)
    # the model answers through its fused path; the exported graph agrees with it
    np.testing.assert_allclose(run_onnx(exported, batch), chainer_logits(model, batch),
                               rtol=1e-4, atol=1e-4)
