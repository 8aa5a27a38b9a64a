"""A real smchainer-serve answers CIFAR-10 JPEGs, zips of them, and refuses bad ones.

The model is a small VGG saved exactly as the built-in trainer saves it
(``model.npz`` and ``smchainer-model.json``), served with no user code; every
expected answer is the model's own, computed here on the same images decoded
by the test itself.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from image_helpers import (
    CLASSES,
    cifar_jpegs,
    encode,
    forged_png,
    make_zip,
    model_scores,
    pixels,
    png,
    save_vgg,
    softmax,
)
from PIL import Image

from smchainer.testing import ServerProcess

TOP_K = 3
MAX_BATCH = 12
#: One JPEG per class, and a second cat.
JPEGS = [f"test/{name}/0003.jpg" for name in CLASSES] + ["test/cat/0000.jpg"]


class Server(ServerProcess):
    """The image plugin's server: a small VGG saved as the trainer saves it."""

    model: object
    timeout = 120  # a zip of many images on a busy 2-core machine


def start_server(tmp: Path, plugins: str, **env: str) -> Iterator[Server]:
    model_dir = tmp / "model"
    model = save_vgg(model_dir)
    # Only the plugins named: none of this environment's SMCHAINER_ settings.
    environment: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith("SMCHAINER_")}
    environment.update(SMCHAINER_LOAD_PLUGINS=plugins, SMCHAINER_DEVICE="cpu", **env)
    server = Server(["--model-dir", str(model_dir), "--workers", "1", "--log-level", "info"],
                    tmp / "server.log", environment)
    server.model = model
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop(60)


@pytest.fixture(scope="module")
def cifar(shared_dir) -> dict[str, bytes]:
    folder = shared_dir / "data" / "cifar10"
    if not (folder / "test.zip").exists():
        pytest.skip(f"CIFAR-10 not found at {folder} (set SMCHAINER_SHARED)")
    return cifar_jpegs(folder, JPEGS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, cifar) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("image-server"), "image",
                            SMCHAINER_TOP_K=str(TOP_K),
                            SMCHAINER_IMAGE_MAX_BATCH=str(MAX_BATCH))


def test_a_jpeg_as_json_gives_the_top_classes_with_names(server, cifar) -> None:
    jpeg = cifar["test/cat/0000.jpg"]
    status, content_type, body = server.post(jpeg, "image/jpeg", "application/json")
    assert status == 200, body
    assert content_type == "application/json"
    (entry,) = json.loads(body)["predictions"]
    expected = model_scores(server.model, pixels(jpeg)[None])
    probabilities = softmax(expected)[0]
    ranked = np.argsort(-probabilities)[:TOP_K].tolist()
    assert [c["label"] for c in entry["top_k"]] == ranked
    assert [c["class"] for c in entry["top_k"]] == [CLASSES[label] for label in ranked]
    np.testing.assert_allclose([c["probability"] for c in entry["top_k"]],
                               probabilities[ranked], rtol=1e-4)
    assert entry["label"] == ranked[0] and entry["class"] == CLASSES[ranked[0]]
    assert entry["probability"] == entry["top_k"][0]["probability"]
    np.testing.assert_allclose(entry["scores"], expected[0], rtol=1e-4, atol=1e-5)


def test_a_415_names_the_image_types_beside_the_numpy_ones(server) -> None:
    status, content_type, body = server.post(b"<x/>", "application/xml", "application/json")
    assert status == 415 and content_type == "application/json", body
    message = json.loads(body)["error"]
    for media_type in ("application/x-npy", "text/csv", "image/png", "image/jpeg",
                       "application/zip"):
        assert media_type in message, message


def test_a_jpeg_as_npy_gives_the_models_own_scores(server, cifar) -> None:
    jpeg = cifar["test/ship/0003.jpg"]
    status, content_type, body = server.post(jpeg, "image/jpeg", "application/x-npy")
    assert status == 200 and content_type == "application/x-npy", body
    got = np.load(io.BytesIO(body))
    np.testing.assert_allclose(got, model_scores(server.model, pixels(jpeg)[None]),
                               rtol=1e-4, atol=1e-5)


def test_a_zip_batch_answers_one_entry_per_image_in_name_order(server, cifar) -> None:
    # Written in reverse and mixed with a folder and macOS metadata, all skipped.
    members = [(name, cifar[name]) for name in reversed(JPEGS)]
    members.insert(3, ("test/", b""))
    members.append(("__MACOSX/test/._x.jpg", b"\x00\x05\x16\x07"))
    body = make_zip(members)
    in_order = sorted(JPEGS)
    expected = model_scores(server.model, np.stack([pixels(cifar[n]) for n in in_order]))

    status, content_type, answer = server.post(body, "application/zip", "application/json")
    assert status == 200 and content_type == "application/json", answer
    entries = json.loads(answer)["predictions"]
    assert [e["image"] for e in entries] == in_order
    assert [e["label"] for e in entries] == expected.argmax(axis=1).tolist()
    assert all(len(e["top_k"]) == TOP_K for e in entries)

    status, _, answer = server.post(body, "application/zip", "application/x-npy")
    assert status == 200, answer
    np.testing.assert_allclose(np.load(io.BytesIO(answer)), expected, rtol=1e-4, atol=1e-5)


def test_a_64_pixel_png_is_resized_to_the_models_32(server, cifar) -> None:
    with Image.open(io.BytesIO(cifar["test/horse/0003.jpg"])) as image:
        large = encode(image.convert("RGB").resize((64, 64), Image.BICUBIC))
    status, _, body = server.post(large, "image/png", "application/x-npy")
    assert status == 200, body
    expected = model_scores(server.model, pixels(large, size=(32, 32))[None])
    np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, rtol=1e-4, atol=1e-5)


def test_every_mode_in_one_zip_is_answered(server) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    members = [
        ("1-grey.png", png(rgb[..., 0])),
        ("2-grey16.png", png(rgb[..., 0].astype(np.uint16) * 257)),
        ("3-rgba.png", png(np.dstack([rgb, rgb[..., :1]]))),
        ("4-palette.png", encode(Image.fromarray(rgb).convert("P"))),
        ("5-cmyk.jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")),
        ("6-grey-alpha.png", encode(Image.fromarray(rgb).convert("LA"))),
    ]
    status, _, body = server.post(make_zip(members), "application/zip", "application/json")
    assert status == 200, body
    entries = json.loads(body)["predictions"]
    assert [e["image"] for e in entries] == [name for name, _ in members]
    # Grey and 16-bit grey hold the same picture: the model must see the same input.
    np.testing.assert_allclose(entries[0]["scores"], entries[1]["scores"], rtol=1e-5)


BAD_REQUESTS = [
    ("truncated jpeg", "image/jpeg", lambda c: c["test/cat/0000.jpg"][:300],
     "image is not a readable PNG or JPEG"),
    ("not an image", "image/png", lambda c: b"GIF89a? no, plain text",
     "image is not a readable PNG or JPEG"),
    ("huge png", "image/png", lambda c: forged_png(30000), "image is too large"),
    ("empty body", "image/jpeg", lambda c: b"", "image is empty"),
    ("bad zip member", "application/zip",
     lambda c: make_zip([("a.jpg", c["test/cat/0000.jpg"]),
                         ("b-broken.jpg", c["test/dog/0003.jpg"][:200])]),
     "b-broken.jpg is not a readable PNG or JPEG"),
    ("text member", "application/zip",
     lambda c: make_zip([("a.jpg", c["test/cat/0000.jpg"]), ("readme.txt", b"hi")]),
     "readme.txt is not a readable PNG or JPEG"),
    ("huge member", "application/zip",
     lambda c: make_zip([("a.jpg", c["test/cat/0000.jpg"]), ("huge.png", forged_png(20000))]),
     "huge.png is too large"),
    ("too many images", "application/zip",
     lambda c: make_zip([(f"{i:03}.jpg", c["test/cat/0000.jpg"]) for i in range(MAX_BATCH + 1)]),
     f"holds {MAX_BATCH + 1} images; at most {MAX_BATCH} per request"),
    ("not a zip", "application/zip", lambda c: c["test/cat/0000.jpg"],
     "body is not a readable zip archive"),
]


def test_bad_images_are_400s_with_a_message_and_the_server_survives(server, cifar) -> None:
    for case, content_type, make_body, message in BAD_REQUESTS:
        status, response_type, body = server.post(make_body(cifar), content_type,
                                                  "application/json")
        assert status == 400, (case, status, body)
        assert response_type == "application/json", case
        error = json.loads(body)
        assert error["status"] == 400 and message in error["error"], (case, error)
    assert server.process.poll() is None
    assert server.ping() == 200
    status, _, body = server.post(cifar["test/cat/0000.jpg"], "image/jpeg", "application/json")
    assert status == 200 and len(json.loads(body)["predictions"]) == 1
    log = server.log()
    assert "Traceback" not in log and "Worker exiting" not in log, log


def test_with_the_onnx_plugin_too_a_jpeg_gets_named_top_classes(tmp_path, cifar) -> None:
    """The issue's "done when": curl a CIFAR-10 JPEG with both plugins installed."""
    jpeg = cifar["test/cat/0000.jpg"]
    for server in start_server(tmp_path, "image,onnx"):
        status, content_type, body = server.post(jpeg, "image/jpeg", "application/json")
        assert status == 200 and content_type == "application/json", body
        (entry,) = json.loads(body)["predictions"]
        probabilities = softmax(model_scores(server.model, pixels(jpeg)[None]))[0]
        ranked = np.argsort(-probabilities)[:5].tolist()
        assert [c["class"] for c in entry["top_k"]] == [CLASSES[label] for label in ranked]
        np.testing.assert_allclose([c["probability"] for c in entry["top_k"]],
                                   probabilities[ranked], rtol=1e-3, atol=1e-5)
        names = sorted(JPEGS)
        status, _, body = server.post(make_zip([(n, cifar[n]) for n in names]),
                                      "application/zip", "application/x-npy")
        assert status == 200, body
        expected = model_scores(server.model, np.stack([pixels(cifar[n]) for n in names]))
        np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, rtol=1e-4, atol=1e-4)
    assert "through ONNX Runtime" in server.log()


def transparent_png(side: int) -> bytes:
    """A small file that is slow to decode: ``side`` x ``side`` pixels laid on white."""
    return encode(Image.new("RGBA", (side, side), (0, 0, 0, 0)))


def test_work_past_the_timeout_is_abandoned_between_images(tmp_path) -> None:
    """A zip that takes seconds to decode gets its 504 at the timeout, and the worker is
    free for the next request within a second of it, not when the decoding would end."""
    import time

    from image_helpers import forged_png

    # 250 x 1024 x 1024: 262 M pixels, within the budget, and seconds of decoding.
    members = [(f"{i:03d}.png", transparent_png(1024)) for i in range(250)]
    body = make_zip(members)
    buffer = io.BytesIO()
    np.save(buffer, np.full((1, 3, 32, 32), 0.5, np.float32))
    small = buffer.getvalue()
    for server in start_server(tmp_path / "untimed", "image", SMCHAINER_IMAGE_MAX_BATCH="1000"):
        started = time.monotonic()
        status, _, _ = server.post(body, "application/zip", "application/x-npy")
        decode_seconds = time.monotonic() - started
        assert status == 200 and decode_seconds > 3, decode_seconds  # slow enough to tell
    for server in start_server(tmp_path / "timed", "image", SMCHAINER_IMAGE_MAX_BATCH="1000",
                               SAGEMAKER_MODEL_SERVER_TIMEOUT="1"):
        status, _, answer = server.post(body, "application/zip", "application/x-npy")
        timed_out = time.monotonic()
        assert status == 504, answer
        status, _, answer = server.post(small, "application/x-npy", "application/json")
        waited = time.monotonic() - timed_out
        assert status == 200, answer
        assert waited < 1.0, (waited, decode_seconds)
        # Over the pixel budget, refused from the headers before decoding anything.
        bomb = make_zip([(f"{i:03d}.png", forged_png(4096)) for i in range(40)])
        status, _, answer = server.post(bomb, "application/zip", "application/json")
        assert status == 400, answer
        assert "more than 268435456 pixels in all" in json.loads(answer)["error"]
