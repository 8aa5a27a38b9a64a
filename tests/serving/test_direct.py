"""The direct path: inference requests read, queued and answered on the worker's event loop.

First the recognizer, held to gunicorn's parser: every head it takes must mean
to gunicorn exactly what it means to the direct path, over generated heads
that stray from a plain one in every way a client (or an attacker) might.
Then a real server, on raw sockets: pipelined requests, bodies in pieces,
``Connection: close``, a 504 from the loop's own timer, an answer larger than
the socket's buffers, an unwritable header, and a body over the direct limit.
"""
from __future__ import annotations

import json
import random
import socket
import time

import numpy as np
import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from smchainer.serving.direct import (
    CACHED_HEADS,
    DIRECT_BODY_BYTES,
    Limits,
    Recognizer,
    answer_bytes,
    direct_head,
)
from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes, predict_directly

ROUTES = frozenset({b"/invocations"})
PLAIN = [b"POST /invocations HTTP/1.1", b"Host: 127.0.0.1:8080", b"Accept-Encoding: identity",
         b"Content-Length: 5", b"Content-Type: application/x-npy", b"Accept: application/json"]


def limits(cfg: Config | None = None) -> Limits:
    return Limits.of(cfg or Config(), 6 * 1024 * 1024)


class NoSocket:
    def recv(self, size: int) -> bytes:
        return b""


def gunicorns_reading(data: bytes, cfg: Config) -> tuple[dict[str, str], int]:
    """The environ keys the app reads and the body's length, as gunicorn's parser finds them."""
    request = next(RequestParser(cfg, [data], ("127.0.0.1", 40000)))
    _, environ = wsgi.create(request, NoSocket(), ("127.0.0.1", 40000), ("127.0.0.1", 8080), cfg)
    keys = {key: value for key, value in environ.items()
            if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH",
                                                  "REQUEST_METHOD", "PATH_INFO",
                                                  "SERVER_PROTOCOL")}
    return keys, len(request.body.read())


#: Pieces a generated head is made of: ordinary, unusual and hostile.
NAMES = [b"Host", b"Accept", b"Content-Type", b"Content-Length", b"content-length", b"X-Trace",
         b"Authorization", b"Connection", b"Transfer-Encoding", b"Expect", b"Upgrade",
         b"X-Forwarded-Proto", b"X-Forwarded-For", b"Forwarded", b"X_Underscore", b"ContentType",
         b"Accept ", b" Accept", b"Acc\xe9pt", b"X(Y)", b"", b"TE", b"Trailer", b"Script_Name",
         b"X-Forwarded-Ssl", b"Http2-Settings", b"Proxy-Connection"]
VALUES = [b"5", b"05", b"+5", b"5 ", b" 5", b"-1", b"5, 5", b"0x5", b"99999999999999999999",
          b"chunked", b"100-continue", b"close", b"keep-alive", b"Upgrade", b"Keep-Alive",
          b"application/json", b"text/csv;q=0.5, */*", b"https", b"a\tb", b"a\x00b", b"a\x7fb",
          b"\xff\xfe", b"caf\xc3\xa9", b"", b"  spaced  ", b"Bearer t0k3n", b"x" * 9000]
METHODS = [b"POST", b"post", b"GET", b"PUT", b"POST "]
TARGETS = [b"/invocations", b"/invocations?x=1", b"/ping", b"//invocations", b"/invocations/",
           b"http://h/invocations", b"/invocations#f", b"*"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.10"]


def generated_head(rng: random.Random) -> list[bytes]:
    lines = list(PLAIN)
    for _ in range(rng.randrange(4)):
        kind = rng.randrange(6)
        if kind == 0:
            lines[0] = b" ".join([rng.choice(METHODS), rng.choice(TARGETS), rng.choice(VERSIONS)])
        elif kind in (1, 2):
            lines.insert(rng.randrange(1, len(lines) + 1),
                         rng.choice(NAMES) + rng.choice([b": ", b":", b" : ", b":\t"])
                         + rng.choice(VALUES))
        elif kind == 3 and len(lines) > 1:
            del lines[rng.randrange(1, len(lines))]
        elif kind == 4:
            lines.insert(rng.randrange(2, len(lines) + 1), rng.choice([b" folded", b"\tfolded"]))
        else:
            lines.insert(rng.randrange(1, len(lines) + 1), bytes(
                rng.randrange(256) for _ in range(rng.randrange(1, 12))))
    return lines


def test_every_head_the_direct_path_takes_means_the_same_to_gunicorns_parser() -> None:
    cfg = Config()
    rng = random.Random(20261202)
    taken = 0
    for _ in range(4000):
        head = b"\r\n".join(generated_head(rng)) + b"\r\n\r\n"
        data = head + b"12345" + b"GET /ping HTTP/1.1\r\n\r\n"  # the next request behind it
        direct = direct_head(data, ROUTES, limits(cfg))
        if direct is None:
            continue
        taken += 1
        environ, body_length = gunicorns_reading(data, cfg)
        assert direct.environ == environ, head
        assert (direct.head_bytes, direct.length) == (len(head), body_length), head
    assert taken > 400  # the plain head and its harmless variants are among them


def test_the_recognizer_answers_a_repeated_head_as_the_first_time_with_its_own_environ() -> None:
    rng = random.Random(11)
    recognize = Recognizer(ROUTES, limits())
    heads = [b"\r\n".join(generated_head(rng)) + b"\r\n\r\n12345" for _ in range(CACHED_HEADS)]
    for data in heads + heads[::-1] + heads:  # seen, seen again, and again after being forgotten
        first, again = direct_head(data, ROUTES, limits()), recognize(data)
        assert (first is None) == (again is None)
        if first is not None and again is not None:
            assert (again.path, again.environ, again.head_bytes, again.length,
                    again.keep_alive) == (first.path, first.environ, first.head_bytes,
                                          first.length, first.keep_alive)
    plain = b"\r\n".join(PLAIN) + b"\r\n\r\n12345"
    one, two = recognize(plain), recognize(plain)
    assert one is not None and two is not None
    assert one.environ is not two.environ and two.arrived >= one.arrived


@pytest.mark.parametrize("lines", [
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Transfer-Encoding: chunked"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Content-Length: 5"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: +5"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Expect: 100-continue"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"X-Forwarded-Proto: https"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"X_Forwarded_For: 10.0.0.1"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Connection: Upgrade"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Accept: a", b" folded"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Accept: caf\xc3\xa9"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"Accept: a", b"accept: b"],
    [b"POST /invocations HTTP/1.1"],
    [b"POST /invocations HTTP/1.0", b"Content-Length: 5"],
    [b"POST /invocations?x=1 HTTP/1.1", b"Content-Length: 5"],
    [b"GET /invocations HTTP/1.1", b"Content-Length: 5"],
    [b"POST /invocations HTTP/1.1", b"Content-Length: " + str(DIRECT_BODY_BYTES + 1).encode()],
    [b"POST /invocations HTTP/1.1", b"Content-Length: 5", b"X-Big: " + b"b" * 9000],
], ids=["cl-and-te", "cl-twice", "cl-signed", "expect", "forwarded-proto", "underscore",
        "connection-upgrade", "obs-fold", "non-ascii", "repeated-name", "no-length",
        "http-1.0", "query", "get", "over-the-direct-limit", "over-gunicorns-field-limit"])
def test_heads_that_gunicorn_must_judge_go_to_gunicorn(lines) -> None:
    assert direct_head(b"\r\n".join(lines) + b"\r\n\r\n12345", ROUTES, limits()) is None


def test_the_servers_trusted_scheme_headers_go_to_gunicorn_too() -> None:
    cfg = Config()
    cfg.set("secure_scheme_headers", {"X-SCHEME": "https"})
    data = b"POST /invocations HTTP/1.1\r\nContent-Length: 0\r\nX-Scheme: https\r\n\r\n"
    assert direct_head(data, ROUTES, limits()) is not None
    assert direct_head(data, ROUTES, limits(cfg)) is None


def test_random_bytes_never_raise_in_the_recognizer() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        direct_head(b"POST /invocations HTTP/1.1\r\n" + noise + b"\r\n\r\n", ROUTES, limits())


@pytest.mark.parametrize("name, value", [("Content-Type", "text/plain\r\nSet-Cookie: x=1"),
                                         ("X-A", "\x00"), ("X:Y", "v"), ("X-B", "caf\u00e9")])
def test_an_answer_header_with_a_control_or_foreign_character_is_refused(name, value) -> None:
    with pytest.raises(ValueError, match="not plain ASCII text"):
        answer_bytes("200 OK", [(name, value)], b"", True)


# -- a real server -------------------------------------------------------------------------

SLOW_OR_ODD = MODEL_FN + '''
import time

import numpy as np


def predict_fn(input_data, model):
    seconds = float(input_data.reshape(-1)[0]) if input_data.size else 0.0
    if seconds >= 100:  # a request for an oversized answer: that many kilobytes
        return np.zeros((int(seconds) * 256,), np.float32)
    time.sleep(max(seconds, 0.0))
    return input_data


def output_fn(prediction, accept):
    import io
    if prediction.size == 2:
        return b"odd", "text/plain\\r\\nSet-Cookie: stolen=1"
    buffer = io.BytesIO()
    np.save(buffer, prediction)
    return buffer.getvalue(), "application/x-npy"
'''


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("model"), code=SLOW_OR_ODD)
    return start_server(["--model-dir", str(model_dir), "--workers", "1", "--timeout", "2",
                         "--client-timeout", "2", "--log-level", "info"])


def request_bytes(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def read_answers(sock: socket.socket, count: int, timeout: float = 10) -> list[tuple[int, dict[
        str, str], bytes]]:
    """``count`` answers read off ``sock`` in order: status, headers (lower case), body."""
    sock.settimeout(timeout)
    buffer, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed after {len(answers)} answers"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "the server closed mid-answer"
            buffer += chunk
        answers.append((int(lines[0].split()[1]), headers, buffer[:length]))
        buffer = buffer[length:]
    return answers


def decoded(body: bytes) -> np.ndarray:
    import io
    return np.load(io.BytesIO(body), allow_pickle=False)


def test_pipelined_requests_are_answered_in_order_on_one_connection(server) -> None:
    bodies = [npy_bytes(np.full((1, 4), 0.001 * k, np.float32)) for k in range(5)]
    chunked = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(bodies[0]):x}".encode() + b"\r\n"
               + bodies[0] + b"\r\n0\r\n\r\n")  # gunicorn's path, between two direct ones
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"".join(request_bytes(body) for body in bodies[:3]) + chunked
                     + request_bytes(bodies[3]))
        answers = read_answers(sock, 5)
    assert [status for status, _, _ in answers] == [200] * 5
    expected = [bodies[0], bodies[1], bodies[2], bodies[0], bodies[3]]
    for (_, _, body), sent in zip(answers, expected, strict=True):
        np.testing.assert_array_equal(decoded(body), decoded(sent))
    # Which path answered: gunicorn's answers name it, the direct path's do not. The last
    # request was read ahead by gunicorn's parser with the chunked one: gunicorn's too.
    assert ["server" in headers for _, headers, _ in answers] == [False] * 3 + [True, True]
    assert all("connection" not in headers for _, headers, _ in answers[:3])  # kept alive


def test_a_body_in_pieces_is_read_on_the_loop_and_answered(server) -> None:
    body = npy_bytes(np.full((1, 4), 0.002, np.float32))
    data = request_bytes(body)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for start in range(0, len(data), 37):
            sock.sendall(data[start:start + 37])
            time.sleep(0.005)
        [(status, _, answer)] = read_answers(sock, 1)
    assert status == 200
    np.testing.assert_array_equal(decoded(answer), decoded(body))


def test_a_body_that_stops_coming_is_a_408_at_the_client_timeout(server) -> None:
    data = request_bytes(npy_bytes(np.zeros((1, 4), np.float32)))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(data[:-10])
        started = time.monotonic()
        [(status, headers, body)] = read_answers(sock, 1)
        assert sock.recv(1) == b""  # and the connection is closed
    assert status == 408 and 1.5 < time.monotonic() - started < 5
    assert headers["connection"] == "close"
    assert "did not arrive within 2" in json.loads(body)["error"]


def in_flight(server) -> float:
    text = server.request("GET", "/metrics").body.decode()
    [line] = [line for line in text.splitlines()
              if line.startswith("smchainer_requests_in_flight ")]
    return float(line.split()[1])


def test_a_body_being_read_on_the_loop_counts_in_flight_until_it_ends(server) -> None:
    data = request_bytes(npy_bytes(np.zeros((1, 4), np.float32)))
    assert in_flight(server) == 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(data[:-10])
        time.sleep(0.3)
        assert in_flight(server) == 1
        [(status, _, _)] = read_answers(sock, 1)  # the 408
    assert status == 408 and in_flight(server) == 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(data[:-10])
        time.sleep(0.3)
    time.sleep(0.3)  # the client left mid-body: nobody to answer, nothing left counted
    assert in_flight(server) == 0


def test_connection_close_is_honoured(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request_bytes(npy_bytes(np.zeros((1, 4), np.float32)),
                                   b"Connection: close\r\n"))
        [(status, headers, _)] = read_answers(sock, 1)
        sock.settimeout(5)
        assert sock.recv(1) == b""
    assert status == 200 and headers["connection"] == "close"


def test_an_inference_past_the_timeout_is_a_504_and_the_connection_lives_on(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sock.sendall(request_bytes(npy_bytes(np.full((1, 4), 3.0, np.float32))))
        [(status, headers, body)] = read_answers(sock, 1)
        waited = time.monotonic() - started
        assert status == 504 and 1.8 < waited < 2.9, waited
        assert "within the 2 s timeout" in json.loads(body)["error"]
        assert "connection" not in headers
        time.sleep(1.2)  # the stuck inference ends; the next one runs
        sock.sendall(request_bytes(npy_bytes(np.zeros((1, 4), np.float32))))
        [(status, _, _)] = read_answers(sock, 1)
    assert status == 200


def test_the_timeout_counts_from_the_head_so_a_slow_body_uses_it_up(server) -> None:
    data = request_bytes(npy_bytes(np.full((1, 4), 1.5, np.float32)))  # a 1.5 s inference
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(data[:-20])
        started = time.monotonic()
        time.sleep(1.2)  # within the 2 s client timeout, but 1.2 + 1.5 s is past --timeout 2
        sock.sendall(data[-20:])
        [(status, _, body)] = read_answers(sock, 1)
        waited = time.monotonic() - started
    assert status == 504 and 1.8 < waited < 2.6, (status, waited, body)


def test_an_answer_larger_than_the_sockets_buffers_arrives_whole(server) -> None:
    # 8 MB: more than the server's largest send buffer (tcp_wmem's 4 MB here) and the
    # client's receive buffer together, so the server's send cannot take it all at once.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        sock.sendall(request_bytes(npy_bytes(np.full((1, 4), 8192.0, np.float32))))
        time.sleep(0.5)  # the server's send fills every buffer; the rest waits for us
        [(status, _, body)] = read_answers(sock, 1, timeout=30)
        assert status == 200 and decoded(body).shape == (8192 * 256,)
        sock.sendall(request_bytes(npy_bytes(np.zeros((1, 4), np.float32))))
        [(status, _, _)] = read_answers(sock, 1)  # and the connection goes on
    assert status == 200


def test_an_answer_header_that_cannot_be_written_is_a_500_not_an_injection(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request_bytes(npy_bytes(np.zeros((1, 2), np.float32))))
        [(status, headers, body)] = read_answers(sock, 1)
    assert status == 500 and "set-cookie" not in headers
    assert "could not be written" in json.loads(body)["error"]
    assert server.request("GET", "/ping").status == 200  # the worker lives on


def test_a_body_over_the_direct_limit_is_served_through_the_pool(start_server, tmp_path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    server = start_server(["--model-dir", str(model_dir), "--workers", "1"])
    x = inputs(DIRECT_BODY_BYTES // 16 + 1000)
    body = npy_bytes(x)
    assert len(body) > DIRECT_BODY_BYTES
    reply = server.post(body, "application/x-npy", "application/x-npy")
    assert reply.status == 200
    np.testing.assert_allclose(decoded(reply.body), predict_directly(model_dir / "model.npz", x),
                               rtol=1e-5, atol=1e-6)


# -- the Open Inference Protocol's infer route -----------------------------------------------

def infer_bytes(body: bytes, path: bytes = b"/v2/models/model/infer",
                header_length: int | None = None) -> bytes:
    extra = (b"" if header_length is None
             else b"Inference-Header-Content-Length: " + str(header_length).encode() + b"\r\n")
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_open_inference_requests_take_the_direct_path_and_answer_as_the_pools(server) -> None:
    x = np.full((2, 4), 0.001, np.float32)  # the model sleeps a millisecond, returns its input
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 4]}
    as_json = json.dumps({"id": "r-7", "inputs": [{**tensor, "data": x.ravel().tolist()}]})
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "output", "parameters": {"binary_data": True}}]})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(infer_bytes(as_json.encode())
                     + infer_bytes(head.encode() + x.tobytes(), header_length=len(head))
                     + infer_bytes(b'{"inputs": [')  # not JSON: its own 400, the rest go on
                     + infer_bytes(as_json.encode(), b"/v2/models/model/versions/1/infer"))
        answers = read_answers(sock, 4)
    assert [status for status, _, _ in answers] == [200, 200, 400, 200]
    # The first three on the direct path (no Server header); a version's route is gunicorn's.
    assert ["server" in headers for _, headers, _ in answers] == [False, False, False, True]
    direct, pooled = json.loads(answers[0][2]), json.loads(answers[3][2])
    assert direct == pooled
    assert direct["id"] == "r-7" and direct["model_name"] == "model"
    [output] = direct["outputs"]
    assert output["datatype"] == "FP32" and output["shape"] == [2, 4]
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32), x.ravel())
    _, headers, body = answers[1]
    length = int(headers["inference-header-content-length"])
    [binary] = json.loads(body[:length])["outputs"]
    assert binary["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(2, 4), x)
    status, headers, body = answers[2]
    assert headers["content-type"] == "application/json"
    assert "not JSON" in json.loads(body)["error"]


def test_only_the_served_models_infer_route_is_direct(start_server, tmp_path) -> None:
    server = start_server(["--model-dir", str(make_model_dir(tmp_path / "model")),
                           "--workers", "1", "--model-name", "linear"])
    x = inputs(3)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 4],
                                   "data": x.ravel().tolist()}]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(infer_bytes(body, b"/v2/models/linear/infer")
                     + infer_bytes(body, b"/v2/models/model/infer"))
        answers = read_answers(sock, 2)
    assert [status for status, _, _ in answers] == [200, 404]
    assert "server" not in answers[0][1]  # its own name's route: direct
    assert "server" in answers[1][1]  # another name: gunicorn's path, and its 404
    assert "serves 'linear'" in json.loads(answers[1][2])["error"]
    np.testing.assert_allclose(
        np.asarray(json.loads(answers[0][2])["outputs"][0]["data"], np.float32).reshape(3, 3),
        predict_directly(tmp_path / "model" / "model.npz", x), rtol=1e-6)
