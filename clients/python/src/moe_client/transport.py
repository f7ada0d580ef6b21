"""Connections to one worker rank: HTTP/1.1 over a plain socket (``POST /v1/forward``) and the
pipelined stream (``POST /v1/forward/stream``, upgraded to ``moe-forward/1``), stdlib only.

The stream keeps one TCP connection open; any number of threads submit request frames on it
(writes are serialised by a lock) and one reader thread matches response frames to their
waiters by request id, so many requests are in flight at once and answers may come back in
any order.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import wire

FORWARD_PATH = "/v1/forward"
STREAM_PATH = "/v1/forward/stream"
STREAM_PROTOCOL = "moe-forward/1"
# Largest response frame accepted: the worker's row limit (4096 by default) times a wide
# hidden size in f32 stays far below this; a larger length means a broken stream.
MAX_FRAME = 1 << 31


class ExpertError(Exception):
    """The expert tier refused or failed a request.

    ``status`` is the HTTP status code the worker answered (400, 401, 413, 503, ...; ``None``
    when the connection itself failed), ``reason`` the worker's one-line reason, and
    ``retry_after`` the seconds a 503 asked the caller to wait (0 otherwise).
    """

    def __init__(self, status: int | None, reason: str, endpoint: str = "", retry_after: int = 0):
        self.status = status
        self.reason = reason
        self.endpoint = endpoint
        self.retry_after = retry_after
        where = f" from {endpoint}" if endpoint else ""
        code = f"{status}" if status is not None else "connection failed"
        super().__init__(f"expert tier{where}: {code}: {reason}")


class ExpertTimeout(ExpertError, TimeoutError):
    """No answer within the client's timeout (``status`` is None)."""

    def __init__(self, reason: str, endpoint: str = ""):
        super().__init__(None, reason, endpoint)


class ExpertConnectionError(ExpertError, ConnectionError):
    """The connection to a rank failed or closed before the answer came (``status`` is None).
    A forward pass is a pure function of its input, so the client may send it again."""

    def __init__(self, reason: str, endpoint: str = ""):
        super().__init__(None, reason, endpoint)


@dataclass(frozen=True)
class Endpoint:
    """A rank's forward address, parsed from ``http://host:port`` (or ``https://``)."""

    url: str
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"endpoint {url!r}: scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"endpoint {url!r} has no host (expected e.g. http://10.0.0.5:8081)")
        if parts.path not in ("", "/"):
            raise ValueError(f"endpoint {url!r}: give the rank's base URL without a path")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        return cls(url.rstrip("/"), parts.hostname, port, tls)

    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def connect(self, timeout: float) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise ExpertConnectionError(f"cannot connect: {e}", self.url) from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        return sock


def _request_head(endpoint: Endpoint, path: str, token: str | None, extra: dict[str, str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {endpoint.host_header()}", f"Content-Length: {length}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_head(reader, endpoint: Endpoint) -> tuple[int, dict[str, str]]:
    """Status code and headers (lower-case names) of an HTTP/1.1 response."""
    line = reader.readline(65537)
    if not line:
        raise ExpertConnectionError("the worker closed the connection before answering", endpoint.url)
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ExpertConnectionError(f"not an HTTP response: {line[:80]!r}", endpoint.url)
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(65537)
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ExpertConnectionError("the connection closed inside the response headers", endpoint.url)
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _read_exact(reader, n: int, endpoint: Endpoint) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise ExpertConnectionError(f"the connection closed after {len(data)} of {n} bytes", endpoint.url)
    return data


def _read_body(reader, headers: dict[str, str], endpoint: Endpoint) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int(reader.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(_read_exact(reader, size, endpoint))
            reader.readline(1024)
    length = headers.get("content-length")
    if length is None:
        return reader.read()
    return _read_exact(reader, int(length), endpoint)


def _retry_after(headers: dict[str, str]) -> int:
    value = headers.get("retry-after", "0")
    return int(value) if value.isdigit() else 0


class PostConnection:
    """``POST /v1/forward`` over one keep-alive connection, one request at a time."""

    def __init__(self, endpoint: Endpoint, token: str | None, timeout: float):
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        self._sock: socket.socket | None = None
        self._reader = None
        self.lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._reader.close()
                self._sock.close()
            finally:
                self._sock = self._reader = None

    def call(self, message: bytes) -> wire.Response:
        """Sends one request message, returns its response (raises ExpertError on a non-200)."""
        with self.lock:
            # A kept-alive connection the worker closed meanwhile fails on first use: retry once
            # on a fresh one (the request is a pure function of its input).
            for attempt in (0, 1):
                fresh = self._sock is None
                try:
                    if fresh:
                        self._sock = self.endpoint.connect(self.timeout)
                        self._reader = self._sock.makefile("rb")
                    self._sock.sendall(
                        _request_head(self.endpoint, FORWARD_PATH, self.token,
                                      {"Content-Type": "application/octet-stream"}, len(message)) + message)
                    status, headers = _read_head(self._reader, self.endpoint)
                    body = _read_body(self._reader, headers, self.endpoint)
                except (OSError, ExpertConnectionError) as e:
                    self.close()
                    if fresh or attempt == 1:
                        if isinstance(e, ExpertConnectionError):
                            raise
                        raise ExpertConnectionError(str(e), self.endpoint.url) from e
                    continue
                if headers.get("connection", "").lower() == "close":
                    self.close()
                if status != 200:
                    reason = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
                    raise ExpertError(status, reason, self.endpoint.url, _retry_after(headers))
                return wire.decode_response(body)
        raise AssertionError("unreachable")


class _Waiter:
    __slots__ = ("event", "response", "error")

    def __init__(self):
        self.event = threading.Event()
        self.response: wire.Response | None = None
        self.error: ExpertError | None = None


class StreamConnection:
    """One upgraded ``moe-forward/1`` connection: frames both ways, many requests in flight."""

    def __init__(self, endpoint: Endpoint, token: str | None, timeout: float):
        self.endpoint = endpoint
        sock = endpoint.connect(timeout)
        reader = sock.makefile("rb", buffering=1 << 16)
        try:
            sock.sendall(_request_head(endpoint, STREAM_PATH, token,
                                       {"Connection": "Upgrade", "Upgrade": STREAM_PROTOCOL}, 0))
            status, headers = _read_head(reader, endpoint)
            if status != 101:
                body = _read_body(reader, headers, endpoint) if status != 204 else b""
                reason = body.decode("utf-8", "replace").strip() or f"HTTP {status} instead of 101"
                raise ExpertError(status, reason, endpoint.url, _retry_after(headers))
        except BaseException:
            reader.close()
            sock.close()
            raise
        # Frames may take long between requests (an idle client); the reader blocks without
        # a timeout, waiters time out on their own.
        sock.settimeout(None)
        self._sock, self._reader = sock, reader
        self._write_lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._pending_lock = threading.Lock()
        self._closed: ExpertError | None = None
        self._thread = threading.Thread(target=self._read_loop, name=f"moe-stream-{endpoint.url}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._closed is None

    def close(self, reason: str = "closed by the client") -> None:
        self._fail_all(ExpertConnectionError(reason, self.endpoint.url))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        self._reader.close()

    def _fail_all(self, error: ExpertError) -> None:
        with self._pending_lock:
            if self._closed is None:
                self._closed = error
            waiters, self._pending = self._pending, {}
        for w in waiters.values():
            w.error = error
            w.event.set()

    def _read_loop(self) -> None:
        try:
            while True:
                prefix = self._reader.read(4)
                if len(prefix) < 4:
                    raise ExpertConnectionError("the worker closed the stream", self.endpoint.url)
                n = wire.frame_length(prefix)
                if n < wire.HEADER_SIZE or n > MAX_FRAME:
                    raise ExpertConnectionError(f"bad frame length {n}", self.endpoint.url)
                response = wire.decode_response(_read_exact(self._reader, n, self.endpoint))
                with self._pending_lock:
                    waiter = self._pending.pop(response.request_id, None)
                if waiter is None:
                    if response.status != 200 and response.request_id == 0:
                        # The worker could not read a frame's header and closes the stream.
                        raise ExpertError(response.status, response.reason, self.endpoint.url)
                    continue  # an answer to a request whose caller gave up (timed out)
                waiter.response = response
                waiter.event.set()
        except ExpertError as e:
            self._fail_all(e)
        except (OSError, ValueError) as e:
            self._fail_all(ExpertConnectionError(f"stream broken: {e}", self.endpoint.url))

    def submit(self, request_id: int, message: bytes) -> _Waiter:
        waiter = _Waiter()
        with self._pending_lock:
            if self._closed is not None:
                raise self._closed
            if request_id in self._pending:
                raise ValueError(f"request id {request_id} is already in flight on this connection")
            self._pending[request_id] = waiter
        try:
            with self._write_lock:
                self._sock.sendall(wire.frame(message))
        except OSError as e:
            error = ExpertConnectionError(f"sending failed: {e}", self.endpoint.url)
            self._fail_all(error)
            raise error from e
        return waiter

    def wait(self, request_id: int, waiter: _Waiter, timeout: float) -> wire.Response:
        if not waiter.event.wait(timeout):
            with self._pending_lock:
                self._pending.pop(request_id, None)
            raise ExpertTimeout(f"no answer within {timeout:g} s", self.endpoint.url)
        if waiter.error is not None:
            raise waiter.error
        response = waiter.response
        assert response is not None
        if response.status != 200:
            raise ExpertError(response.status, response.reason, self.endpoint.url, response.retry_after)
        return response

    def call(self, request_id: int, message: bytes, timeout: float) -> wire.Response:
        return self.wait(request_id, self.submit(request_id, message), timeout)
