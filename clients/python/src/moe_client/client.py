"""``ExpertClient``: MoE layers computed by a worker group (the expert tier) over its forward API."""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

from . import wire
from .transport import (
    Endpoint,
    ExpertConnectionError,
    ExpertError,
    PostConnection,
    StreamConnection,
)

TRANSPORTS = ("stream", "post")
# The worker's default --max-request-rows; larger inputs are split into requests of this many rows.
DEFAULT_MAX_ROWS = 4096
# A 503 asks to come back after Retry-After seconds; never wait longer than this per attempt.
MAX_RETRY_WAIT = 5.0


def _torch():
    """The torch module if the caller already imported it (the client never imports it itself)."""
    return sys.modules.get("torch")


class _Rows:
    """An input turned into wire rows ``[T, H]``, and the way back to the caller's type."""

    def __init__(self, hidden_states: Any):
        torch = _torch()
        if torch is not None and isinstance(hidden_states, torch.Tensor):
            self._init_torch(torch, hidden_states)
        elif isinstance(hidden_states, np.ndarray):
            self._init_numpy(hidden_states)
        else:
            raise TypeError(
                f"hidden_states must be a torch.Tensor or a numpy.ndarray, got {type(hidden_states).__name__}")

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) < 1 or shape[-1] == 0:
            raise ValueError(f"hidden_states must be [..., H] with H > 0, got shape {tuple(shape)}")
        self.shape = tuple(shape)
        self.hidden = shape[-1]

    def _init_torch(self, torch, x) -> None:
        self._check_shape(tuple(x.shape))
        self.kind, self.device, self.torch_dtype = "torch", x.device, x.dtype
        x = x.detach().to("cpu").reshape(-1, self.hidden).contiguous()
        if x.dtype == torch.bfloat16:
            self.dtype = wire.DTYPE_BF16
            self.rows = x.view(torch.int16).numpy().view(np.uint16)
        elif x.dtype == torch.float32:
            self.dtype = wire.DTYPE_F32
            self.rows = x.numpy()
        elif x.dtype in (torch.float16, torch.float64):
            self.dtype = wire.DTYPE_F32  # widened/narrowed to f32 on the wire, back on return
            self.rows = x.to(torch.float32).numpy()
        else:
            raise TypeError(f"hidden_states dtype {x.dtype} is not supported (use bfloat16 or float32)")

    def _init_numpy(self, x: np.ndarray) -> None:
        self._check_shape(x.shape)
        self.kind, self.np_dtype = "numpy", x.dtype
        if x.dtype not in (np.float32, np.float16, np.float64):
            raise TypeError(f"hidden_states dtype {x.dtype} is not supported (use float32)")
        self.dtype = wire.DTYPE_F32
        self.rows = np.ascontiguousarray(x.reshape(-1, self.hidden), dtype="<f4")

    def restore(self, out: np.ndarray) -> Any:
        """``out`` (``[T, H]`` of the wire element type) in the caller's shape, type, dtype and device."""
        if self.kind == "numpy":
            return out.astype(self.np_dtype, copy=True).reshape(self.shape)
        torch = _torch()
        if self.dtype == wire.DTYPE_BF16:
            t = torch.from_numpy(out.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(out.copy())
        return t.reshape(self.shape).to(device=self.device, dtype=self.torch_dtype)


def _routing_array(x: Any, dtype: str, name: str) -> np.ndarray:
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    a = np.asarray(x)
    if a.ndim < 2:
        raise ValueError(f"{name} must be [..., K], got shape {a.shape}")
    if dtype == "<u4" and a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
        raise ValueError(f"{name} must hold expert ids in 0..2^32-1")
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]), dtype=dtype)


class ExpertClient:
    """A client of a worker group's forward API.

    ``endpoints``: one rank's base URL (``http://host:port``) or a list of them (every rank's
    forward port, or the expert Service). Calls are spread over the ranks round-robin; any rank
    serves any layer. ``token``: the client token (``--client-token-file`` of the workers).

    ``transport``: ``"stream"`` (default) keeps one pipelined connection per rank, shared by all
    threads, with many requests in flight; ``"post"`` sends each request as ``POST
    /v1/forward`` on a pool of keep-alive connections.

    Thread-safe. A request the worker refuses raises :class:`ExpertError` (``.status``,
    ``.reason``); a 503 with Retry-After (group not ready, a stop-the-world remap holding
    requests) is retried after it up to ``retries`` times, and so is a failed connection (on
    the next rank).
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        token: str | None = None,
        *,
        transport: str = "stream",
        timeout: float = 60.0,
        retries: int = 3,
        max_rows: int = DEFAULT_MAX_ROWS,
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("endpoints: give at least one rank URL, e.g. http://127.0.0.1:8081")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if token is not None:
            token = token.strip()
            if not token or any(c in token for c in "\r\n"):
                raise ValueError("token must be a non-empty single line")
        self.endpoints = [Endpoint.parse(e) for e in endpoints]
        self.token, self.transport, self.timeout = token, transport, timeout
        self.retries, self.max_rows = retries, max_rows
        self._ids = itertools.count(1)
        self._next_rank = itertools.count()
        self._lock = threading.Lock()
        self._streams: dict[int, StreamConnection] = {}
        self._connecting = [threading.Lock() for _ in self.endpoints]
        self._posts: dict[int, queue.SimpleQueue] = {i: queue.SimpleQueue() for i in range(len(self.endpoints))}
        self._closed = False

    # -- public API -----------------------------------------------------------------------------

    def forward(self, layer: int, hidden_states: Any, topk_ids: Any = None, topk_weights: Any = None) -> Any:
        """The MoE block output of decoder layer ``layer`` (the checkpoint's index) for
        ``hidden_states`` (``[..., H]``, the post-attention-norm hidden states): routed plus
        shared experts, without the residual, of the same shape, type and dtype (torch bf16 or
        f32 travel as they are; f16/f64 as f32; numpy float arrays as f32).

        ``topk_ids``/``topk_weights`` (``[..., K]``): routing computed by the caller (weights used
        as given); without them the expert tier runs the model's router.
        """
        if not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"layer must be a non-negative decoder-layer index, got {layer!r}")
        rows = _Rows(hidden_states)
        ids = weights = None
        if (topk_ids is None) != (topk_weights is None):
            raise ValueError("topk_ids and topk_weights go together: give both or neither")
        if topk_ids is not None:
            ids = _routing_array(topk_ids, "<u4", "topk_ids")
            weights = _routing_array(topk_weights, "<f4", "topk_weights")
        out = self.forward_rows(int(layer), rows.dtype, rows.rows, ids, weights)
        return rows.restore(out)

    def forward_rows(self, layer: int, dtype: int, rows: np.ndarray,
                     topk_ids: np.ndarray | None = None, topk_weights: np.ndarray | None = None) -> np.ndarray:
        """Wire-level call: ``rows`` ``[T, H]`` of :func:`wire.element_type` (``uint16`` bf16 bits
        or ``float32``) in, the same out. Inputs over ``max_rows`` go as several requests (in
        flight together on the stream transport, spread over the ranks)."""
        t = rows.shape[0]
        bounds = [(s, min(s + self.max_rows, t)) for s in range(0, t, self.max_rows)] or [(0, 0)]
        jobs = []
        for s, e in bounds:
            ids = topk_ids[s:e] if topk_ids is not None else None
            weights = topk_weights[s:e] if topk_weights is not None else None
            jobs.append((layer, dtype, rows[s:e], ids, weights))
        if len(jobs) == 1:
            return self._call(*jobs[0])
        if self.transport == "stream":
            pending = [self._submit(*job) for job in jobs]
            parts = [self._finish(job, p) for job, p in zip(jobs, pending)]
        else:
            parts = [self._call(*job) for job in jobs]
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.close()
        for q in self._posts.values():
            while True:
                try:
                    q.get_nowait().close()
                except queue.Empty:
                    break

    def __enter__(self) -> ExpertClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _pick(self) -> int:
        return next(self._next_rank) % len(self.endpoints)

    def _stream(self, rank: int) -> StreamConnection:
        # One connect at a time per rank (threads arriving meanwhile share its connection); a
        # slow rank holds up only its own callers.
        with self._connecting[rank]:
            with self._lock:
                if self._closed:
                    raise ExpertConnectionError("the client is closed")
                conn = self._streams.get(rank)
            if conn is not None:
                if conn.alive:
                    return conn
                conn.close("replaced after it broke")
            conn = StreamConnection(self.endpoints[rank], self.token, self.timeout)
            with self._lock:
                self._streams[rank] = conn
            return conn

    def _submit(self, layer, dtype, rows, ids, weights):
        """Sends a request on a stream without waiting; (rank, connection, id, waiter, error)."""
        rank = self._pick()
        rid = next(self._ids)
        message = wire.encode_request(rid, layer, dtype, rows, ids, weights)
        try:
            conn = self._stream(rank)
            return rank, conn, rid, conn.submit(rid, message), None
        except ExpertError as e:
            return rank, None, rid, None, e

    def _finish(self, job, pending) -> np.ndarray:
        rank, conn, rid, waiter, error = pending
        if error is None:
            try:
                return self._check(conn.wait(rid, waiter, self.timeout), job).rows
            except ExpertError as e:
                error = e
        if not self._retryable(error):
            raise error
        return self._call(*job, attempts_left=self.retries, first_error=error)

    def _retryable(self, e: ExpertError) -> bool:
        # A 503 with Retry-After is temporary (not ready yet, a stop-the-world remap); one
        # without says the group will not serve the forward API at all.
        return self.retries > 0 and (isinstance(e, ExpertConnectionError)
                                     or (e.status == 503 and e.retry_after > 0))

    def _call(self, layer, dtype, rows, ids, weights, attempts_left=None, first_error=None) -> np.ndarray:
        attempts_left = self.retries if attempts_left is None else attempts_left
        error = first_error
        while True:
            if error is not None:
                if not self._retryable(error) or attempts_left <= 0:
                    raise error
                attempts_left -= 1
                if error.status == 503:
                    time.sleep(min(error.retry_after, MAX_RETRY_WAIT))
            rank = self._pick()
            try:
                return self._once(rank, layer, dtype, rows, ids, weights)
            except ExpertError as e:
                error = e

    def _once(self, rank, layer, dtype, rows, ids, weights) -> np.ndarray:
        rid = next(self._ids)
        message = wire.encode_request(rid, layer, dtype, rows, ids, weights)
        job = (layer, dtype, rows, ids, weights)
        if self.transport == "stream":
            return self._check(self._stream(rank).call(rid, message, self.timeout), job).rows
        pool = self._posts[rank]
        try:
            conn = pool.get_nowait()
        except queue.Empty:
            conn = PostConnection(self.endpoints[rank], self.token, self.timeout)
        try:
            response = conn.call(message)
        except BaseException:
            conn.close()
            raise
        pool.put(conn)
        return self._check(response, job).rows

    @staticmethod
    def _check(response: wire.Response, job) -> wire.Response:
        layer, dtype, rows, _, _ = job
        if response.dtype != dtype or response.rows is None or response.rows.shape != rows.shape:
            got = None if response.rows is None else response.rows.shape
            raise wire.WireError(
                f"answer for layer {layer} has dtype {response.dtype} and shape {got}, "
                f"expected dtype {dtype} and shape {rows.shape}")
        return response
