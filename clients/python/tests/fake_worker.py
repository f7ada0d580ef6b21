"""A FAKE worker for the client's unit tests: an in-process HTTP server speaking the forward API's
two transports (docs/forward-api.md) with a made-up "MoE block" (``out = 2 x + layer``, computed
in f32 and rounded to bf16 for bf16 requests). It knows nothing of experts; the real worker is
exercised by scripts/parity."""

from __future__ import annotations

import random
import socket
import threading
import time

import numpy as np

from moe_client import wire

HIDDEN = 8
MOE_LAYERS = (1, 2, 3)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def fake_block(layer: int, rows: np.ndarray, dtype: int, ids=None, weights=None) -> np.ndarray:
    x = bf16_to_f32(rows) if dtype == wire.DTYPE_BF16 else rows.astype(np.float32)
    y = 2 * x + layer
    if ids is not None:  # make supplied routing visible in the answer
        y = y + (ids.astype(np.float32) * weights).sum(axis=1, keepdims=True)
    return f32_to_bf16(y) if dtype == wire.DTYPE_BF16 else y.astype(np.float32)


class FakeWorker:
    """Serves on 127.0.0.1:<port>. ``token``: required bearer token. ``busy``: answer this many
    requests 503 (with ``retry_after``; 0: without Retry-After) before serving. ``shuffle``: answer stream frames in random
    order. ``requests`` counts the requests it computed."""

    def __init__(self, token: str | None = None, busy: int = 0, shuffle: bool = True, retry_after: int = 1):
        self.token, self.busy, self.shuffle, self.retry_after = token, busy, shuffle, retry_after
        self.requests = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        for c in list(self._open):
            self.drop(c)

    @staticmethod
    def drop(conn: socket.socket) -> None:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    def drop_all(self) -> None:
        """Kill every open connection (a worker that restarted)."""
        for c in list(self._open):
            self.drop(c)
        self._open.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._open.append(conn)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _answer(self, req: wire.Request) -> bytes:
        with self._lock:
            if self.busy > 0:
                self.busy -= 1
                return wire.encode_response(req.request_id, req.layer, req.dtype, status=503,
                                            reason="a stop-the-world remap is running; retry",
                                            retry_after=self.retry_after, shape=req.rows.shape)
            self.requests += 1
        if req.layer not in MOE_LAYERS:
            return wire.encode_response(req.request_id, req.layer, req.dtype, status=400,
                                        reason=f"layer {req.layer} is a dense decoder layer (MoE layers: [1, 2, 3])",
                                        shape=req.rows.shape)
        if req.rows.shape[1] != HIDDEN:
            return wire.encode_response(req.request_id, req.layer, req.dtype, status=400,
                                        reason=f"hidden {req.rows.shape[1]} does not match the model's hidden size {HIDDEN}",
                                        shape=req.rows.shape)
        out = fake_block(req.layer, req.rows, req.dtype, req.topk_ids, req.topk_weights)
        return wire.encode_response(req.request_id, req.layer, req.dtype, out)

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := reader.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = reader.read(int(headers.get("content-length", "0")))
                if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                    self._plain(conn, 401, "invalid bearer token")
                    continue
                if path == "/v1/forward":
                    try:
                        answer = self._answer(wire.decode_request(body))
                    except wire.WireError as e:
                        self._plain(conn, 400, str(e))
                        continue
                    r = wire.decode_response(answer)
                    if r.status != 200:
                        self._plain(conn, r.status, r.reason, retry=r.retry_after or None)
                        continue
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 + f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
                elif path == "/v1/forward/stream" and headers.get("upgrade") == "moe-forward/1":
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: moe-forward/1\r\n\r\n")
                    self._stream(conn, reader)
                    return
                else:
                    self._plain(conn, 404, "not found")
        except (OSError, ValueError):
            return

    def _plain(self, conn, status: int, reason: str, retry: int | None = None) -> None:
        body = (reason + "\n").encode()
        extra = f"Retry-After: {retry}\r\n" if retry is not None else ""
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n{extra}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def _stream(self, conn: socket.socket, reader) -> None:
        write = threading.Lock()

        def reply(answer: bytes, delay: float) -> None:
            time.sleep(delay)
            with write:
                conn.sendall(wire.frame(answer))

        while True:
            prefix = reader.read(4)
            if len(prefix) < 4:
                return
            message = reader.read(wire.frame_length(prefix))
            try:
                req = wire.decode_request(message)
            except wire.WireError as e:
                reply(wire.encode_response(0, 0, 0, status=400, reason=str(e)), 0)
                self.drop(conn)
                return
            delay = random.uniform(0, 0.01) if self.shuffle else 0
            threading.Thread(target=reply, args=(self._answer(req), delay), daemon=True).start()
