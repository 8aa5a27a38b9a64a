"""The serving benchmark's ratios: batched over unbatched, and the ceiling no batching can pass.

Pure arithmetic on hand-made variant figures (no server runs here): the
ceiling is every worker computing full batches back to back at the bare
``predict_fn``'s pace, over the unbatched server's measured images/s.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def serving_load() -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import serving_load

    return serving_load


def cell(body: str, concurrency: int, images_per_s: float) -> dict[str, Any]:
    return {"body": body, "concurrency": concurrency, "images_per_s": images_per_s,
            "p99_ms": 10.0}


def variant(name: str, cells: list[dict[str, Any]], **in_process_ms: float) -> dict[str, Any]:
    return {"variant": name, "cells": cells,
            "in_process": {body.replace("_", "-"): {"predict_ms": ms}
                           for body, ms in in_process_ms.items()}}


def test_the_ceiling_is_full_batches_on_every_worker(serving_load: Any) -> None:
    # bare: 5 ms for one image, 40 ms for 8: 200 images/s a worker either way (batching
    # gains nothing), 2 workers
    flat = [variant("onnx", [cell("npy-1", 1, 150.0), cell("npy-1", 16, 300.0)],
                    npy_1=5.0, npy_8=40.0),
            variant("onnx-batched", [cell("npy-1", 1, 140.0), cell("npy-1", 16, 330.0)],
                    npy_1=5.0, npy_8=40.0)]
    row = serving_load.ratios(flat, workers=2, batch=8)["batched_over_unbatched"][
        "onnx-batched/onnx"]
    assert row["concurrency"] == 16
    assert row["images_per_s"] == pytest.approx(1.1)
    ceiling = row["ceiling"]
    assert ceiling["batch"] == 8 and ceiling["workers"] == 2
    assert ceiling["images_per_s"] == pytest.approx(400.0)  # 2 workers x 8 images / 40 ms
    assert ceiling["bare_batch_scaling"] == pytest.approx(1.0)
    assert ceiling["over_unbatched"] == pytest.approx(400.0 / 300.0, abs=1e-4)

    # a model 4x faster per image in batches of 8: the ceiling moves with it
    steep = [dict(v, in_process={"npy-1": {"predict_ms": 8.0}, "npy-8": {"predict_ms": 16.0}})
             for v in flat]
    ceiling = serving_load.ratios(steep, workers=2, batch=8)["batched_over_unbatched"][
        "onnx-batched/onnx"]["ceiling"]
    assert ceiling["bare_batch_scaling"] == pytest.approx(4.0)
    assert ceiling["over_unbatched"] == pytest.approx(1000.0 / 300.0, abs=1e-4)


def test_no_ceiling_without_its_bare_figures(serving_load: Any) -> None:
    pair = [variant("chainer", [cell("npy-1", 4, 60.0)], npy_1=26.0),
            variant("chainer-batched", [cell("npy-1", 4, 120.0)], npy_1=26.0)]
    row = serving_load.ratios(pair, workers=2, batch=2)["batched_over_unbatched"][
        "chainer-batched/chainer"]
    assert row["images_per_s"] == pytest.approx(2.0)
    assert row["ceiling"] is None  # npy-2 was not timed
    assert serving_load.ratios(pair)["batched_over_unbatched"][
        "chainer-batched/chainer"]["ceiling"] is None  # no batch given


@pytest.mark.parametrize(("variants", "concurrency", "workers", "max_batch", "expected"), [
    (["onnx", "onnx-batched"], [1, 4, 16], 2, 16, 8),    # 16 clients, 8 a worker
    (["onnx", "onnx-batched"], [1, 4, 16], 1, 16, 16),
    (["onnx", "onnx-batched"], [1, 4, 40], 1, 16, 16),   # capped by --max-batch-size
    (["chainer-batched"], [5], 2, 16, 3),                 # an odd client more on one worker
    (["onnx", "torchserve"], [1, 4, 16], 2, 16, None),   # nothing batched: no ceiling
])
def test_the_ceiling_batch(serving_load: Any, variants: list[str], concurrency: list[int],
                           workers: int, max_batch: int, expected: int | None) -> None:
    args = argparse.Namespace(variants=variants, concurrency=concurrency, workers=workers,
                              max_batch_size=max_batch, npy_batches=[1, 10, 64])
    assert serving_load.ceiling_batch(args) == expected
    timed = serving_load.predict_batches(args)
    assert timed[:3] == [1, 10, 64]
    assert timed == [1, 10, 64] + ([expected] if expected not in (None, 1, 10, 64) else [])


def test_one_client_keeps_one_worker_busy(serving_load: Any) -> None:
    pair = [variant("onnx", [cell("npy-1", 1, 150.0)], npy_1=5.0),
            variant("onnx-batched", [cell("npy-1", 1, 140.0)], npy_1=5.0)]
    ceiling = serving_load.ratios(pair, workers=2, batch=1)["batched_over_unbatched"][
        "onnx-batched/onnx"]["ceiling"]
    assert ceiling["workers"] == 1 and ceiling["batch"] == 1
    assert ceiling["images_per_s"] == pytest.approx(200.0)
    assert ceiling["over_unbatched"] == pytest.approx(200.0 / 150.0, abs=1e-4)


def test_the_predict_child_sleeps_before_each_call_when_asked(serving_load: Any,
                                                              monkeypatch: Any) -> None:
    slept: list[float] = []
    monkeypatch.setattr(serving_load.time, "sleep", slept.append)
    made: list[str] = []
    answers: list[str] = []
    calls = {"npy-1": lambda: made.append("npy-1"), "npy-8": lambda: made.append("npy-8")}
    serving_load.serve_predicts(calls, ["npy-1 3\n", "npy-8 2 0.001\n"], answers.append)
    assert made == ["npy-1"] * 3 + ["npy-8"] * 2
    assert slept == [0.001, 0.001]  # only the second line asked for a gap
    assert [len(serving_load.json.loads(a)) for a in answers] == [3, 2]
