"""The HTTP layer's limits (issue 12 item 5), over real sockets: the in-process app (stand-in engine) served
by uvicorn with the options ``darkroom serve`` uses (server/api/http.py ``uvicorn_options``), in a thread.

Oversized headers get 431, malformed requests (CL+TE, TLS bytes, absurd lengths) 400, slow heads and slow
bodies 408 and a closed connection, all in Together's error shape; a client that leaves mid-body is logged
as 499 without a traceback; connections past ``server.max_connections`` make room or get 503 server_busy;
request bodies held at once stay within ``server.max_inflight_body_bytes``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from server.api.http import uvicorn_options

from .support.inprocess import InProcessServer
from .support.launch import free_port

MAX_CONNECTIONS = 12
BODY_BUDGET = 3000  # bytes of request bodies held at once


class Served:
    def __init__(self, app: InProcessServer, port: int) -> None:
        self.app = app
        self.port = port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        return sock


@pytest.fixture(scope="module")
def served(make_app: Callable[..., InProcessServer]) -> Iterator[Served]:
    app = make_app({"server": {"default_response_format": "base64", "header_timeout_s": 1.0,
                               "body_read_timeout_s": 1.0, "body_timeout_s": 3.0, "max_header_bytes": 8192,
                               "max_connections": MAX_CONNECTIONS, "max_inflight_body_bytes": BODY_BUDGET,
                               "slot_wait_s": 0.3}}, engine="stand-in")
    port = free_port()
    # The app's lifespan already runs (make_app): uvicorn only serves it.
    config = uvicorn.Config(app.app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                            access_log=False, **uvicorn_options(app.settings.server))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    yield Served(app, port)
    server.should_exit = True
    thread.join(10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): one response, and whether the server closed the connection after."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    try:
        closed = sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        closed = True
    return status, headers, rest[:length], closed


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["code"])


def exchange(served: Served, raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    with served.connect() as sock:
        sock.sendall(raw)
        return read_response(sock)


def test_a_plain_request_still_works(served: Served) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, body, _ = exchange(served, request)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_oversized_headers_get_431(served: Served) -> None:
    raw = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
    try:
        status, _, body, closed = exchange(served, raw)
    except ConnectionResetError:
        pytest.fail("the connection was reset instead of answered 431")
    assert status == 431 and error_code(body) == "headers_too_large" and closed


@pytest.mark.parametrize("raw", [
    # Content-Length and Transfer-Encoding together (request smuggling's ingredient).
    b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # A TLS ClientHello on the plain port.
    bytes.fromhex("160301012c010001280303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00",
    # A length no integer parser should be asked to hold.
    b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    b"GET /\x00health HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_requests_get_400_in_the_error_shape(served: Served, raw: bytes) -> None:
    status, _, body, closed = exchange(served, raw)
    assert status == 400 and closed
    assert error_code(body) == "invalid_http_request"


def test_a_slow_body_gets_408_and_the_connection_closes(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        status, headers, body, closed = read_response(sock)  # before: no answer, ever
    assert status == 408 and error_code(body) == "request_timeout"
    assert headers["connection"] == "close" and closed


def test_a_slow_head_gets_408_and_the_connection_closes(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, _, body, closed = read_response(sock)
    assert status == 408 and error_code(body) == "request_timeout" and closed


def test_a_client_leaving_mid_body_is_logged_as_499(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nX-Request-Id: leaver-1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while "request_id=leaver-1" not in served.app.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in served.app.log().splitlines() if "request_id=leaver-1" in x)
    assert "status=499" in line
    assert "Traceback" not in served.app.log() and "internal_error" not in served.app.log()


def test_idle_connections_past_the_limit_make_room(served: Served) -> None:
    """Sockets holding half a request head (slowloris) past server.max_connections: a new connection (a
    probe) is still served, and the oldest idle one is closed with 503 server_busy in the error shape."""
    held = [served.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head still arriving
        time.sleep(0.1)
        status, _, body, _ = exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        # One idle connection (among the oldest) made room, answered in the error shape; the others end at
        # their head deadline (408).
        answers = [read_response(sock) for sock in held]
        busy = [(headers, body) for status, headers, body, closed in answers if status == 503 and closed]
        assert len(busy) == 1 and sorted(status for status, *_ in answers) == [408] * 11 + [503], answers
        headers, body = busy[0]
        assert error_code(body) == "server_busy" and headers["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()


def test_when_every_connection_serves_a_request_a_new_one_gets_503_in_the_error_shape(served: Served) -> None:
    head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{")  # its body still arriving: a request in progress
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = served.connect()
            sock.sendall(head)
            held.append(sock)
        time.sleep(0.2)
        status, headers, body, closed = exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and headers["content-type"] == "application/json", (status, headers, body)
        assert error_code(body) == "server_busy" and headers["retry-after"] == "1" and closed
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    status, _, _, _ = exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_request_bodies_held_at_once_are_bounded(served: Served, path: str) -> None:
    """server.max_inflight_body_bytes: a body counts from before it is read (its Content-Length) until its
    answer; past the budget a request gets 503 server_busy with retry-after within slot_wait_s, and once the
    held body goes, the same request is served. The reported case: concurrent 19 MB edit uploads."""
    big = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2990\r\n\r\n{")
    body = b'{"prompt": "a", "steps": 1, "width": 64, "height": 64}'
    ctype = b"application/json"
    if path.endswith("edits"):
        boundary = b"b0undary"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--'
                + boundary + b"--\r\n")
        ctype = b"multipart/form-data; boundary=" + boundary
    small = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
             + ctype + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    holder = served.connect()
    try:
        holder.sendall(big)
        time.sleep(0.2)
        status, headers, answer, _ = exchange(served, small)
        assert status == 503 and error_code(answer) == "server_busy" and headers["retry-after"] == "1", answer
    finally:
        holder.close()
    time.sleep(0.2)
    status, _, answer, _ = exchange(served, small)
    assert status != 503 and status < 500, answer  # served (200, or the edit's 400 for its missing image)


def test_websocket_upgrade_is_refused_in_the_error_shape(served: Served) -> None:
    raw = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    status, headers, body, _ = exchange(served, raw)
    assert status == 400 and headers["content-type"] == "application/json", body
    assert error_code(body) == "websocket_not_supported"


def test_head_answers_the_get_headers_and_no_body(served: Served) -> None:
    get = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    _, get_headers, get_body, _ = exchange(served, get)
    with served.connect() as sock:
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == b"", data
    assert f"content-length: {len(get_body)}".encode() in head.lower()
    assert get_headers["content-type"].encode() in head
