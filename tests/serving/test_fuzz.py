"""/invocations fuzzed on a real server: at least 2,000 hostile bodies, no answer >= 500.

The server is what the field runs: the built-in VGG (a small one, saved as
the trainer saves it) with the image plugin, several threads. Bodies are the
kinds that have broken servers (see ``tests/test_decoders_fuzz.py``), plus
PNGs and zips bent byte by byte, under every Content-Type the server knows
and some it does not, with assorted Accept headers. Derandomized (hypothesis
seed fixed by ``derandomize``): the same 2,100 bodies every run, in seconds.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.test_decoders_fuzz import json_bodies, npy_bodies

#: Bodies sent in this module; the fixture's teardown holds the run to the count.
EXAMPLES = 2100
sent: list[tuple[int, str]] = []


def png_of(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def zip_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


PNG = png_of(0)


@st.composite
def bent(draw, original: bytes) -> bytes:
    """``original`` with a few bytes replaced, cut short, or grown."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=8))


valid_vgg_npy = st.integers(1, 3).map(
    lambda n: np.save(buffer := io.BytesIO(), np.full((n, 3, 32, 32), 0.5, np.float32))
    or buffer.getvalue())

requests = st.one_of(
    st.tuples(npy_bodies(), st.just("application/x-npy")),
    st.tuples(valid_vgg_npy, st.just("application/x-npy")),
    st.tuples(json_bodies, st.just("application/json")),
    st.tuples(st.text(max_size=100).map(str.encode), st.just("text/csv")),
    st.tuples(bent(PNG), st.sampled_from(["image/png", "image/jpeg", "application/x-image"])),
    st.tuples(st.lists(st.tuples(st.text("ab.p/", min_size=1, max_size=6), bent(PNG)),
                       max_size=3, unique_by=lambda member: member[0]).map(zip_of).flatmap(bent),
              st.just("application/zip")),
    st.tuples(st.binary(max_size=300),
              st.sampled_from(["application/x-npy", "application/json", "text/csv",
                               "image/png", "application/zip", "text/plain", "", "x/y"])),
)
accepts = st.sampled_from(["application/json", "application/x-npy", "text/csv", "*/*",
                           "text/html", "application/*;q=0.5, text/csv", "image/*", ""])


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    from smchainer.default_plugins.vgg.modelfile import save_model
    from smchainer.models import VGG

    model_dir = tmp_path_factory.mktemp("vgg") / "model"
    np.random.seed(0)
    save_model(VGG(width=0.0625, depth=8), model_dir, [f"c{i}" for i in range(10)], {})
    yield start_server(["--model-dir", str(model_dir), "--workers", "1", "--threads", "4"],
                       env={"SMCHAINER_DISABLE_PLUGIN_AUTOLOAD": "0",
                            "SMCHAINER_LOAD_PLUGINS": "image"})
    assert len(sent) >= 2000, f"only {len(sent)} bodies were sent"


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(requests, accepts)
def test_no_body_gets_a_server_error(server, request_body, accept) -> None:
    body, content_type = request_body
    reply = server.post(body, content_type or None, accept or None, timeout=60)
    sent.append((reply.status, content_type))
    assert reply.status < 500, (content_type, accept, body[:200], reply.body[:300])
    assert reply.headers.get("content-type") in {"application/json", "application/x-npy",
                                                 "text/csv"}, reply.headers
    if reply.status >= 400:
        assert reply.json()["status"] == reply.status
