"""The forward API's binary messages (docs/forward-api.md), encoded and decoded with numpy.

A request is a 32-byte header, the hidden states, and optionally the caller's routing; a
response is a 32-byte header and either the MoE block output or a one-line reason. All integers
are little-endian. bf16 travels as its raw 16-bit patterns (numpy has no bf16 type): the
callers hand in and get back ``uint16`` arrays for it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

REQUEST_MAGIC = b"MOEF"
RESPONSE_MAGIC = b"MOER"
VERSION = 1
HEADER_SIZE = 32

DTYPE_BF16 = 0
DTYPE_F32 = 1
# numpy element type that carries each wire dtype (bf16 as raw bits).
_WIRE_ELEMENT = {DTYPE_BF16: np.dtype("<u2"), DTYPE_F32: np.dtype("<f4")}
DTYPE_NAMES = {DTYPE_BF16: "bf16", DTYPE_F32: "f32"}

FLAG_ROUTING = 1

# magic, version, dtype, flags, layer, rows, hidden, top_k, reserved, request id
_REQUEST = struct.Struct("<4sHBBIIIHHQ")
# magic, version, dtype, reserved, layer, rows, hidden, status, retry_after, request id
_RESPONSE = struct.Struct("<4sHBBIIIHHQ")
_FRAME_LENGTH = struct.Struct("<I")
assert _REQUEST.size == HEADER_SIZE and _RESPONSE.size == HEADER_SIZE


class WireError(ValueError):
    """A message that does not follow the format (from the server: a protocol fault)."""


def element_type(dtype: int) -> np.dtype:
    try:
        return _WIRE_ELEMENT[dtype]
    except KeyError:
        raise WireError(f"unknown wire dtype {dtype} (0 = bf16, 1 = f32)") from None


def encode_request(
    request_id: int,
    layer: int,
    dtype: int,
    rows: np.ndarray,
    topk_ids: np.ndarray | None = None,
    topk_weights: np.ndarray | None = None,
) -> bytes:
    """One request message. ``rows`` is ``[T, H]`` of :func:`element_type` (``uint16`` bf16
    bits or ``float32``); routing, when given, is ``[T, K]`` ids and weights."""
    want = element_type(dtype)
    if rows.ndim != 2:
        raise ValueError(f"rows must be [T, H], got shape {rows.shape}")
    if rows.dtype != want:
        raise ValueError(f"rows of wire dtype {DTYPE_NAMES[dtype]} must be {want}, got {rows.dtype}")
    t, h = rows.shape
    flags, k = 0, 0
    parts = []
    if (topk_ids is None) != (topk_weights is None):
        raise ValueError("topk_ids and topk_weights go together: give both or neither")
    if topk_ids is not None:
        ids = np.asarray(topk_ids)
        weights = np.asarray(topk_weights)
        if ids.ndim != 2 or ids.shape[0] != t:
            raise ValueError(f"topk_ids must be [T={t}, K], got shape {ids.shape}")
        if weights.shape != ids.shape:
            raise ValueError(f"topk_weights must have topk_ids' shape {ids.shape}, got {weights.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > 0xFFFFFFFF):
            raise ValueError("topk_ids must be expert ids in 0..2^32-1")
        k = ids.shape[1]
        if k == 0 or k > 0xFFFF:
            raise ValueError(f"top_k must be in 1..65535, got {k}")
        flags |= FLAG_ROUTING
        parts = [
            np.ascontiguousarray(ids, dtype="<u4").tobytes(),
            np.ascontiguousarray(weights, dtype="<f4").tobytes(),
        ]
    for name, value, limit in (("layer", layer, 0xFFFFFFFF), ("rows", t, 0xFFFFFFFF),
                               ("hidden", h, 0xFFFFFFFF), ("request id", request_id, 2**64 - 1)):
        if not 0 <= value <= limit:
            raise ValueError(f"{name} {value} does not fit the wire format (0..{limit})")
    header = _REQUEST.pack(REQUEST_MAGIC, VERSION, dtype, flags, layer, t, h, k, 0, request_id)
    return b"".join([header, np.ascontiguousarray(rows).tobytes(), *parts])


@dataclass
class Request:
    """A decoded request (the fake servers of the unit tests read them)."""

    request_id: int
    layer: int
    dtype: int
    rows: np.ndarray
    topk_ids: np.ndarray | None
    topk_weights: np.ndarray | None


def decode_request(message: bytes) -> Request:
    if len(message) < HEADER_SIZE:
        raise WireError(f"request of {len(message)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, dtype, flags, layer, t, h, k, _, rid = _REQUEST.unpack_from(message)
    if magic != REQUEST_MAGIC or version != VERSION:
        raise WireError(f"not a version-{VERSION} request (magic {magic!r}, version {version})")
    elem = element_type(dtype)
    end = HEADER_SIZE + t * h * elem.itemsize
    rows = np.frombuffer(message, dtype=elem, count=t * h, offset=HEADER_SIZE).reshape(t, h)
    ids = weights = None
    if flags & FLAG_ROUTING:
        ids = np.frombuffer(message, dtype="<u4", count=t * k, offset=end).reshape(t, k)
        weights = np.frombuffer(message, dtype="<f4", count=t * k, offset=end + 4 * t * k).reshape(t, k)
        end += 8 * t * k
    if len(message) != end:
        raise WireError(f"request body is {len(message)} bytes, its header says {end}")
    return Request(rid, layer, dtype, rows, ids, weights)


@dataclass
class Response:
    """A decoded response: ``rows`` (``[T, H]``, wire element type) when ``status`` is 200,
    else ``reason``."""

    request_id: int
    layer: int
    dtype: int
    status: int
    retry_after: int
    rows: np.ndarray | None
    reason: str


def encode_response(
    request_id: int,
    layer: int,
    dtype: int,
    rows: np.ndarray | None = None,
    status: int = 200,
    reason: str = "",
    retry_after: int = 0,
    shape: tuple[int, int] = (0, 0),
) -> bytes:
    """One response message (what the worker sends; the unit tests' fake server uses it)."""
    if status == 200:
        assert rows is not None
        t, h = rows.shape
        body = np.ascontiguousarray(rows, dtype=element_type(dtype)).tobytes()
    else:
        t, h = shape
        body = reason.encode("utf-8")
    header = _RESPONSE.pack(RESPONSE_MAGIC, VERSION, dtype, 0, layer, t, h, status, retry_after, request_id)
    return header + body


def decode_response(message: bytes | memoryview) -> Response:
    if len(message) < HEADER_SIZE:
        raise WireError(f"response of {len(message)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, dtype, _, layer, t, h, status, retry, rid = _RESPONSE.unpack_from(message)
    if magic != RESPONSE_MAGIC or version != VERSION:
        raise WireError(f"not a version-{VERSION} response (magic {bytes(magic)!r}, version {version})")
    if status != 200:
        reason = bytes(message[HEADER_SIZE:]).decode("utf-8", "replace").strip()
        return Response(rid, layer, dtype, status, retry, None, reason)
    elem = element_type(dtype)
    want = HEADER_SIZE + t * h * elem.itemsize
    if len(message) != want:
        raise WireError(f"response of {t}x{h} {DTYPE_NAMES[dtype]} must be {want} bytes, got {len(message)}")
    rows = np.frombuffer(message, dtype=elem, count=t * h, offset=HEADER_SIZE).reshape(t, h)
    return Response(rid, layer, dtype, status, retry, rows, "")


def frame(message: bytes) -> bytes:
    """A stream frame: the message's length (u32) and the message."""
    return _FRAME_LENGTH.pack(len(message)) + message


def frame_length(prefix: bytes) -> int:
    return _FRAME_LENGTH.unpack(prefix)[0]
