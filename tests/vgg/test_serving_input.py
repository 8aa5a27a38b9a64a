"""The built-in VGG's request checks: what a 400 says, and that a request is checked once.

``as_image_batch`` finds NaN and infinities through the batch's min and max
(two passes over the images, not three); with dynamic batching ``batch_fn``
checks a request's images and a request that then runs alone is not checked
again by ``predict_fn``, while a merged call and an unbatched one are.
"""
from __future__ import annotations

import numpy as np
import pytest

from smchainer.default_plugins import vgg as plugin
from smchainer.errors import BadRequest
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager


def images(count: int = 2) -> np.ndarray:
    return np.random.RandomState(0).uniform(0, 1, (count, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 1000, 2 * 3072 - 1])
def test_one_non_finite_value_anywhere_is_a_400(bad, where) -> None:
    x = images()
    x.reshape(-1)[where] = bad
    with pytest.raises(BadRequest, match="NaN or infinite"):
        plugin.as_image_batch(x)


@pytest.mark.parametrize(("low", "high", "ok"), [
    (0.0, 1.0, True), (-1e-4, 1 + 1e-4, True), (-0.01, 0.9, False), (0.0, 255.0, False)])
def test_values_must_be_in_0_1(low, high, ok) -> None:
    x = 0.2 + 0.6 * images()  # inside 0.2-0.8: the two values set below are the extremes
    x.reshape(-1)[:2] = [low, high]
    if ok:
        np.testing.assert_array_equal(plugin.as_image_batch(x), x)
    else:
        with pytest.raises(BadRequest, match=f"got values from {low:g} to {high:g}"):
            plugin.as_image_batch(x)


def test_uint8_pixels_and_one_image_are_taken_as_they_were() -> None:
    pixels = (images(1) * 255).astype(np.uint8)
    np.testing.assert_allclose(plugin.as_image_batch(pixels), pixels / 255.0, rtol=1e-6)
    assert plugin.as_image_batch(images(1)[0]).shape == (1, 3, 32, 32)


def test_a_request_batch_fn_checked_is_not_checked_again_when_it_runs_alone(monkeypatch):
    from smchainer.models.vgg import VGG

    checked: list[tuple[int, ...]] = []
    real = plugin.as_image_batch

    def counting(data):
        checked.append(np.shape(data))
        return real(data)

    monkeypatch.setattr(plugin, "as_image_batch", counting)
    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    model = VGG(n_classes=10, depth=11, width=0.125)
    x = images()
    alone = hooks.request_context(model)
    rows = hooks.batch_fn(x, model, alone)
    first = hooks.predict_fn(x, model, alone)  # the batcher's call for a request alone
    assert checked == [(2, 3, 32, 32)]
    # Another input in the same request, a merged batch (a context of its own) and an
    # unbatched request (no batch_fn) are all checked.
    hooks.predict_fn(x.copy(), model, alone)
    merged = np.concatenate([rows, rows])
    hooks.predict_fn(merged, model, hooks.request_context(model))
    hooks.predict_fn(x, model, hooks.request_context(model))
    assert checked == [(2, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    again = hooks.predict_fn(x, model, hooks.request_context(model))
    np.testing.assert_array_equal(first.scores, again.scores)
    # A bad request is still refused by batch_fn, on its own.
    with pytest.raises(BadRequest, match="NaN or infinite"):
        hooks.batch_fn(np.full((1, 3, 32, 32), np.nan, np.float32), model,
                       hooks.request_context(model))
