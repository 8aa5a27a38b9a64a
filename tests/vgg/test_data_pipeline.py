"""The trainer's data path on the CPU: crop_flip, the updater, the new hyperparameters.

:func:`smchainer.functions.augment.crop_flip` must give exactly what the former
per-batch pipeline (``augment`` then ``to_float``) gave, so CPU runs keep their
results. Its CUDA kernel cannot run here, but it is checked twice without a
GPU: NVRTC compiles it (where CuPy and NVRTC are installed), and the very same
source, with the CUDA built-ins defined as plain C++, is built by the host
compiler and run on the CPU against the NumPy path.
"""
from __future__ import annotations

import subprocess
import sys

import chainer
import chainer.functions as F
import numpy as np
import pytest

from smchainer.default_plugins.vgg import data as vgg_data
from smchainer.default_plugins.vgg import hyperparameters as vgg_hp
from smchainer.default_plugins.vgg import model as vgg_model
from smchainer.default_plugins.vgg import sampling as vgg_sampling
from smchainer.default_plugins.vgg import updater as vgg_updater
from smchainer.errors import SmchainerError
from smchainer.functions import augment as aug
from smchainer.functions import channels_last
from smchainer.functions.augment import crop_flip
from smchainer.models.vgg import VGG
from tests.vgg import reference as former


def random_images(seed: int, shape=(40, 3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def reference(images, index, top, left, flip, pad=4) -> np.ndarray:
    """The definition, one output element at a time."""
    batch, (_, channels, height, width) = len(index), images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((batch, channels, height, width), dtype=np.float32)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                column = left[b] + (width - 1 - x if flip[b] else x)
                out[b, :, y, x] = padded[index[b], :, top[b] + y, column]
    return out * np.float32(1 / 255)


# --- crop_flip on the CPU --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_flip_equals_augment_then_to_float(seed) -> None:
    images = random_images(seed)
    index = np.random.default_rng(seed + 10).integers(0, len(images), size=64)  # with repeats
    expected = vgg_data.to_float(former.augment(images[index], np.random.default_rng(seed)))
    # The same generator state gives the same crops through draw_crops.
    top, left, flip = vgg_sampling.draw_crops(np.random.default_rng(seed), len(index))
    got = crop_flip(images, index, top, left, flip)
    assert got.dtype == np.float32 and got.shape == (64, 3, 32, 32)
    np.testing.assert_array_equal(got, expected)
    assert flip.any() and not flip.all() and (top != 4).any() and (left != 4).any()


@pytest.mark.parametrize("pad", [0, 2, 4])
def test_crop_flip_follows_the_definition_on_non_square_images(pad) -> None:
    images = random_images(3, shape=(9, 2, 5, 7))
    rng = np.random.default_rng(pad)
    index = rng.integers(0, 9, size=12)
    top, left = rng.integers(0, 2 * pad + 1, size=(2, 12))
    flip = rng.random(12) < 0.5
    got = crop_flip(images, index, top, left, flip, pad=pad)
    np.testing.assert_array_equal(got, reference(images, index, top, left, flip, pad))


def test_the_centre_crop_without_flip_is_the_image() -> None:
    images = random_images(4)
    index = np.array([5, 0, 39, 5])
    centre = np.full(4, 4)
    same = crop_flip(images, index, centre, centre, np.zeros(4, dtype=bool))
    np.testing.assert_array_equal(same, vgg_data.to_float(images[index]))
    mirrored = crop_flip(images, index, centre, centre, np.ones(4, dtype=bool))
    np.testing.assert_array_equal(mirrored, vgg_data.to_float(images[index][..., ::-1]))
    # A corner crop shifts the image and brings in zeros.
    corner = crop_flip(images, index[:1], np.zeros(1, int), np.zeros(1, int), np.zeros(1, bool))
    assert not corner[0, :, :4].any() and not corner[0, :, :, :4].any()
    np.testing.assert_array_equal(corner[0, :, 4:, 4:], vgg_data.to_float(images[5, :, :28, :28]))


def test_crop_flip_refuses_what_it_cannot_crop() -> None:
    images = random_images(5)
    ok = np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match="uint8 N x C x H x W"):
        crop_flip(images.astype(np.float32), ok, ok, ok, ok)
    with pytest.raises(ValueError, match="uint8 N x C x H x W"):
        crop_flip(images[0], ok, ok, ok, ok)
    with pytest.raises(ValueError, match="top must have shape"):
        crop_flip(images, ok, np.zeros(3, int), ok, ok)
    with pytest.raises(ValueError, match=r"in \[0, 8\]"):
        crop_flip(images, ok, np.array([0, 9]), ok, ok)
    with pytest.raises(IndexError):
        crop_flip(images, np.array([0, 40]), ok, ok, ok)


def test_cupy_is_not_imported_by_the_module() -> None:
    code = ("import sys, smchainer.functions.augment as a; "
            "assert 'cupy' not in sys.modules, 'cupy imported'; "
            "assert a._module.cache_info().currsize == 0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


# --- the CUDA kernel without a GPU -----------------------------------------------------


def test_the_kernel_compiles_with_nvrtc() -> None:
    from tests.gpu.test_cupy_compat import _nvrtc

    nvrtc = _nvrtc()
    program = nvrtc.createProgram(aug.CROP_FLIP_SOURCE, "crop_flip.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(program, ["-arch=compute_90", "-std=c++17"])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(program))
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert f".entry {aug.KERNEL_NAME}(" in ptx


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """The kernel source compiled for the host, launched block by block, thread by thread."""
    from tests.functions.emulation import EmulatedKernels

    try:
        kernels = EmulatedKernels(aug.CROP_FLIP_SOURCE, tmp_path_factory.mktemp("host-kernel"))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return kernels(aug.KERNEL_NAME)


def run_host_kernel(launch, images, index, top, left, flip, pad=4, grid=3, block=32):
    images = np.ascontiguousarray(images)
    index, top, left, flip = (np.ascontiguousarray(v, dtype=np.int64)
                              for v in (index, top, left, flip))
    n, channels, height, width = images.shape
    out = np.full((len(index), channels, height, width), -1.0, dtype=np.float32)
    sizes = (n, len(index), channels, height, width, pad)
    launch((grid,), (block,), (images, index, top, left, flip, out,
                               *(np.int64(v) for v in sizes), aug.SCALE))
    return out


def test_the_kernel_source_run_on_the_host_equals_the_numpy_path(host_kernel) -> None:
    images = random_images(6, shape=(30, 3, 12, 10))
    rng = np.random.default_rng(6)
    index = rng.integers(0, 30, size=17)
    top, left = rng.integers(0, 9, size=(2, 17))
    flip = rng.random(17) < 0.5
    # 3 blocks of 32 threads for 6,120 elements: the grid-stride loop does the work.
    got = run_host_kernel(host_kernel, images, index, top, left, flip)
    np.testing.assert_array_equal(got, crop_flip(images, index, top, left, flip))
    bad = index.copy()
    bad[[2, 5]] = [30, -1]  # out of range: NaN there, no stray read
    marked = run_host_kernel(host_kernel, images, bad, top, left, flip, grid=1, block=7)
    assert np.isnan(marked[[2, 5]]).all() and not np.isnan(np.delete(marked, [2, 5], 0)).any()
    np.testing.assert_array_equal(np.delete(marked, [2, 5], 0), np.delete(got, [2, 5], 0))


# --- the updater ----------------------------------------------------------------------


class Recorder(chainer.Link):
    """A model that keeps what each update fed it."""

    def __init__(self) -> None:
        super().__init__()
        with self.init_scope():
            self.w = chainer.Parameter(np.zeros(1, dtype=np.float32))
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def forward(self, x, t):
        self.seen.append((x, t))
        return F.sum(self.w)


@pytest.mark.parametrize("gather_on_device", [True, False])
@pytest.mark.parametrize("augment", [True, False])
def test_the_updater_feeds_what_the_per_batch_pipeline_fed(augment, gather_on_device) -> None:
    images = random_images(7, shape=(50, 3, 32, 32))
    labels = np.random.default_rng(7).integers(0, 10, size=50).astype(np.int32)
    recorder = Recorder()
    optimizer = chainer.optimizers.SGD()
    optimizer.setup(recorder)
    iterator = chainer.iterators.SerialIterator(
        np.arange(50), 16, order_sampler=vgg_sampling.DerivedOrderSampler(3, 1))
    updater = vgg_updater.AugmentingUpdater(
        iterator, optimizer, device=chainer.get_device("@numpy"), seed=3, rank=1,
        augment=augment, images=images, labels=labels, gather_on_device=gather_on_device)
    # The former pipeline: (image, label) tuples, stacked, augmented, scaled.
    examples = chainer.iterators.SerialIterator(
        chainer.datasets.TupleDataset(images, labels), 16,
        order_sampler=vgg_sampling.DerivedOrderSampler(3, 1))
    for step in range(9):  # past two epoch ends (a short batch mixes two epochs)
        rng = vgg_sampling.iteration_rng(3, 1, step)
        rng.integers(2**32)  # the draw that reseeds NumPy's global generator
        batch_images, batch_labels = vgg_data.stack_batch(examples.next())
        if augment:
            batch_images = former.augment(batch_images, rng)
        updater.update()
        x, t = recorder.seen[-1]
        np.testing.assert_array_equal(x, vgg_data.to_float(batch_images), err_msg=f"step {step}")
        np.testing.assert_array_equal(t, batch_labels, err_msg=f"step {step}")
        assert x.dtype == np.float32 and t.dtype == np.int32
    assert updater.epoch == 2


def test_the_updater_refuses_mismatched_arrays() -> None:
    recorder = Recorder()
    optimizer = chainer.optimizers.SGD()
    optimizer.setup(recorder)
    iterator = chainer.iterators.SerialIterator(np.arange(4), 2)
    with pytest.raises(ValueError, match="4 training images but 3 labels"):
        vgg_updater.AugmentingUpdater(iterator, optimizer, device=chainer.get_device("@numpy"),
                                      seed=0, rank=0, augment=True,
                                      images=random_images(0, (4, 3, 32, 32)),
                                      labels=np.zeros(3, np.int32))


# --- the new hyperparameters --------------------------------------------------------------


def test_new_hyperparameters_and_their_defaults() -> None:
    defaults = vgg_hp.parse_hyperparameters({})
    assert (defaults.kernels, defaults.dropout, defaults.label_smoothing) == ("auto", 1.0, 0.0)
    hp = vgg_hp.parse_hyperparameters(
        {"kernels": " Fused ", "dropout": "0", "label_smoothing": "0.1"})
    assert (hp.kernels, hp.dropout, hp["label-smoothing"]) == ("fused", 0.0, 0.1)
    assert vgg_hp.parse_hyperparameters({"dropout": 1.99}).dropout == 1.99


@pytest.mark.parametrize(
    "raw, message",
    [({"kernels": "cudnn"}, "kernels must be one of auto, chainer, fused"),
     ({"dropout": -0.1}, r"dropout must be in \[0, 2\)"),
     ({"dropout": 2}, r"dropout must be in \[0, 2\)"),
     ({"dropout": "nan"}, r"dropout must be in \[0, 2\)"),
     ({"dropout": "lots"}, "dropout must be float"),
     ({"label-smoothing": 1}, r"label-smoothing must be in \[0, 1\)"),
     ({"label_smoothing": -0.01}, r"label-smoothing must be in \[0, 1\)")],
)
def test_bad_new_hyperparameters_are_named(raw, message) -> None:
    with pytest.raises(SmchainerError, match=message):
        vgg_hp.parse_hyperparameters(raw)


def test_kernels_resolve_by_device(monkeypatch) -> None:
    assert vgg_hp.resolve_kernels("auto", on_gpu=True) == (
        "fused" if channels_last.FUSED_BY_DEFAULT_ON_GPU else "chainer")
    monkeypatch.setattr(channels_last, "FUSED_BY_DEFAULT_ON_GPU", True)
    assert vgg_hp.resolve_kernels("auto", on_gpu=True) == "fused"
    monkeypatch.setattr(channels_last, "FUSED_BY_DEFAULT_ON_GPU", False)
    assert vgg_hp.resolve_kernels("auto", on_gpu=True) == "chainer"
    assert vgg_hp.resolve_kernels("fused", on_gpu=True) == "fused"
    assert vgg_hp.resolve_kernels("auto", on_gpu=False) == "fused"
    assert vgg_hp.resolve_kernels("chainer", on_gpu=True) == "chainer"
    assert vgg_hp.resolve_kernels("chainer", on_gpu=False) == "chainer"
    assert vgg_hp.resolve_kernels("fused", on_gpu=False) == "fused"


def numpy_smoothed_loss(y: np.ndarray, t: np.ndarray, eps: float) -> tuple[float, np.ndarray]:
    """The loss and its gradient in float64: cross entropy against smoothed one-hot targets."""
    y = y.astype(np.float64)
    log_p = y - y.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    target = np.full(y.shape, eps / y.shape[1])
    target[np.arange(len(t)), t] += 1 - eps
    loss = -(target * log_p).sum(axis=1).mean()
    return loss, (np.exp(log_p) - target) / len(t)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_loss_matches_numpy(eps) -> None:
    rng = np.random.default_rng(8)
    y = chainer.Variable(rng.normal(0, 3, size=(32, 10)).astype(np.float32))
    t = rng.integers(0, 10, size=32).astype(np.int32)
    loss = vgg_model.SmoothedCrossEntropy(eps)(y, t)
    loss.backward()
    expected, gradient = numpy_smoothed_loss(y.array, t, eps)
    assert loss.dtype == np.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss.array), expected, rtol=1e-5)
    np.testing.assert_allclose(y.grad, gradient, rtol=1e-4, atol=1e-7)
    if eps == 0:
        plain = F.softmax_cross_entropy(y.array, t)
        np.testing.assert_allclose(float(loss.array), float(plain.array), rtol=1e-6)


def test_label_smoothing_refuses_bad_eps() -> None:
    with pytest.raises(ValueError, match="label smoothing"):
        vgg_model.SmoothedCrossEntropy(1.0)


def test_a_run_with_the_new_hyperparameters(tmp_path, cifar_npz_channels) -> None:
    import json

    from tests.vgg.test_train import SMALL, run

    hp = {**SMALL, "width": 0.0625, "train-samples": 96, "test-samples": 32,
          "batch-size": 32, "cache-dir": str(tmp_path / "cache")}
    metrics = run(tmp_path / "job", cifar_npz_channels, iterations=3, dropout=0,
                  **{"label-smoothing": 0.2}, **hp)
    assert metrics["kernels"] == "fused" and metrics["iteration"] == 3
    assert np.isfinite(metrics["test_loss"])
    written = json.loads((tmp_path / "job" / "output" / "data" / "metrics.json").read_text())
    assert written["kernels"] == "fused"
    saved = json.loads((tmp_path / "job" / "model" / "smchainer-model.json").read_text())
    assert saved["hyperparameters"]["label-smoothing"] == 0.2
    chainer_run = run(tmp_path / "chainer", cifar_npz_channels, iterations=3, dropout=0,
                      kernels="chainer", **{"label-smoothing": 0.2}, **hp)
    # the same network, computed two ways: the same losses within float32 rounding
    assert chainer_run["kernels"] == "chainer"
    assert chainer_run["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-3)


def test_the_trainer_sets_the_model_switches(tmp_path, cifar_npz_channels, monkeypatch) -> None:
    from tests.vgg.test_train import SMALL, run

    built = []
    original = VGG

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(vgg_model, "VGG", spy)
    run(tmp_path / "job", cifar_npz_channels, iterations=1, dropout=0.5, kernels="chainer",
        **{**SMALL, "width": 0.0625, "train-samples": 64, "test-samples": 32, "batch-size": 32,
           "cache-dir": str(tmp_path / "cache")})
    (model,) = built
    assert model.fused is False and model.dropout_scale == 0.5
