"""The server under malformed and hostile requests, spoken on raw sockets.

HTTP clients would refuse to send most of these, or would hide what the
server answers; a socket sends the bytes as they are and reads the answer as
it comes.
"""
from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serving.conftest import inputs, make_model_dir, npy_bytes


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("model"))
    return start_server(["--model-dir", str(model_dir), "--workers", "1", "--log-level", "info"])


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            headers = dict(
                line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:]
                if ": " in line
            )
            length = int({k.lower(): v for k, v in headers.items()}.get("content-length", -1))
            if length >= 0 and len(body) >= length:
                break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return status, headers, body


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT A REQUEST LINE\r\n\r\n", 400),
    (b"GET /ping HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
], ids=["request-line", "http-version", "content-length-minus-one", "long-uri",
        "long-header", "transfer-coding"])  # the statuses are gunicorn's; the bodies ours
def test_protocol_errors_are_json_like_every_other_error(server, request_bytes, status) -> None:
    got, headers, body = exchange(server.port, request_bytes)
    assert got == status, body
    assert headers["content-type"] == "application/json", headers
    answer = json.loads(body)
    assert answer["status"] == status and answer["error"], answer
    assert server.ping() == 200  # and the worker goes on


@pytest.mark.parametrize("chunks", [
    b"zz\r\nabc\r\n0\r\n\r\n",            # a chunk size that is not hex
    b"3\r\nabcXX0\r\n\r\n",               # a chunk without its CRLF
], ids=["bad-size", "missing-terminator"])
def test_a_broken_chunked_body_is_a_400_and_the_connection_closes(server, chunks) -> None:
    request = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1, received  # one answer, then closed
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Type: application/json" in head
    assert json.loads(body)["status"] == 400


def test_a_crlf_in_the_path_cannot_forge_a_log_line(server) -> None:
    status, _, body = exchange(
        server.port, b"GET /ping%0D%0AFORGED%20LINE HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404, body
    assert "FORGED LINE" in json.loads(body)["error"]
    deadline = time.monotonic() + 10
    while "FORGED" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.log().splitlines()
    assert any("/ping\\x0d\\x0aFORGED LINE" in line for line in lines), server.log()
    assert not any(line.startswith("FORGED") for line in lines), server.log()


@pytest.mark.parametrize("body, words", [
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': "
     b"(100000, 100000), }" + b" " * 58 + b"\n", ["declares shape", "40000000000 bytes"]),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': "
     b"(18446744073709551616, 4), }" + b" " * 47 + b"\n", ["declares shape"]),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': "
     b"(3, 4" + b" " * 66 + b"\n", ["malformed header"]),
    (b"definitely not npy", ["not an npy file"]),
], ids=["huge-shape", "dimension-2-64", "malformed-header", "not-npy"])
def test_hostile_npy_headers_are_400s(server, body, words) -> None:
    reply = server.post(body, "application/x-npy", "application/json")
    assert reply.status == 400, reply.body
    for word in words:
        assert word in reply.json()["error"], reply.json()


@pytest.mark.parametrize("body, words", [
    (b"[" * 5000 + b"]" * 5000, ["nested too deeply"]),
    (b"[" + b"9" * 400 + b"]", ["float32 range"]),
    (b"[1e400]", ["float range"]),
], ids=["deep", "400-digit-integer", "1e400"])
def test_hostile_json_is_a_400(server, body, words) -> None:
    reply = server.post(body, "application/json", "application/json")
    assert reply.status == 400, reply.body
    for word in words:
        assert word in reply.json()["error"], reply.json()


def test_a_good_npy_body_is_still_answered_exactly(server) -> None:
    from tests.serving.conftest import predict_directly

    x = inputs(3)
    reply = server.post(npy_bytes(x), "application/x-npy", "application/x-npy")
    assert reply.status == 200, reply.body
    model_dir = server.args[server.args.index("--model-dir") + 1]
    np.testing.assert_array_equal(np.load(io.BytesIO(reply.body)),
                                  predict_directly(Path(model_dir) / "model.npz", x))


def test_the_default_bind_is_loopback(tmp_path) -> None:
    from tests.serving.conftest import Server

    model_dir = make_model_dir(tmp_path / "model")
    server = Server(["--model-dir", str(model_dir), "--workers", "1"], tmp_path / "log",
                    bind=False)
    try:
        server.wait_ready()
        assert f"Listening at: http://127.0.0.1:{server.port}" in server.log(), server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def guarded(start_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    model_dir = make_model_dir(folder / "model")
    (folder / "token").write_text("s3cret-token\n")
    return start_server(["--model-dir", str(model_dir), "--workers", "1",
                         "--auth-token-file", str(folder / "token")])


@pytest.mark.parametrize("path, method", [("/invocations", "POST"), ("/metrics", "GET"),
                                          ("/execution-parameters", "GET"),
                                          ("/nothing-here", "GET")])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic czNjcmV0",
                                           "Bearer s3cret-token-and-more"])
def test_with_a_token_other_paths_need_it(guarded, path, method, authorization) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    reply = guarded.request(method, path, b"[[1, 2, 3, 4]]" if method == "POST" else None,
                            headers)
    assert reply.status == 401, reply.body
    assert reply.json()["status"] == 401 and "authentication" in reply.json()["error"]
    assert reply.headers["www-authenticate"].startswith("Bearer")


def test_with_a_token_ping_stays_open_and_the_token_opens_the_rest(guarded) -> None:
    assert guarded.request("GET", "/ping").status == 200
    token = {"Authorization": "Bearer s3cret-token"}
    reply = guarded.request("POST", "/invocations", b"[[1, 2, 3, 4]]",
                            {**token, "Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    assert guarded.request("GET", "/metrics", headers=token).status == 200
    assert "s3cret" not in guarded.log()
