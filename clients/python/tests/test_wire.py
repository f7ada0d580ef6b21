"""The wire encoding against the byte tables of docs/forward-api.md (the contract), written out
by hand here so that the encoder is not checked against itself."""

import struct
import unittest

import numpy as np

from moe_client import wire


def bf16_bits(values):
    """float32 -> bf16 bit patterns, round to nearest even (exact for the values used here)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


class RequestLayout(unittest.TestCase):
    def test_header_offsets_bf16_without_routing(self):
        rows = bf16_bits([[1.0, -2.0, 0.5], [0.0, 3.0, -0.25]])
        msg = wire.encode_request(0x0102030405060708, 5, wire.DTYPE_BF16, rows)
        self.assertEqual(msg[0:4], b"\x4d\x4f\x45\x46")          # magic MOEF
        self.assertEqual(msg[4:6], b"\x01\x00")                  # version 1, u16 LE
        self.assertEqual(msg[6], 0)                              # dtype bf16
        self.assertEqual(msg[7], 0)                              # flags: no routing
        self.assertEqual(msg[8:12], b"\x05\x00\x00\x00")         # layer
        self.assertEqual(msg[12:16], b"\x02\x00\x00\x00")        # rows T
        self.assertEqual(msg[16:20], b"\x03\x00\x00\x00")        # hidden H
        self.assertEqual(msg[20:22], b"\x00\x00")                # top_k 0 without routing
        self.assertEqual(msg[22:24], b"\x00\x00")                # reserved
        self.assertEqual(msg[24:32], bytes([8, 7, 6, 5, 4, 3, 2, 1]))  # request id, u64 LE
        # bf16 of 1.0 is 0x3F80, stored little-endian; -2.0 is 0xC000; 0.5 is 0x3F00.
        self.assertEqual(msg[32:38], b"\x80\x3f\x00\xc0\x00\x3f")
        self.assertEqual(len(msg), 32 + 2 * 3 * 2)

    def test_f32_with_routing(self):
        rows = np.array([[1.5, 2.0], [-1.0, 0.0], [4.0, 8.0]], dtype=np.float32)
        ids = np.array([[3, 1], [0, 2], [7, 6]])
        weights = np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
        msg = wire.encode_request(9, 1, wire.DTYPE_F32, rows, ids, weights)
        self.assertEqual(msg[6], 1)                              # dtype f32
        self.assertEqual(msg[7], 1)                              # flags bit 0: routing supplied
        self.assertEqual(struct.unpack_from("<H", msg, 20)[0], 2)  # top_k
        body = msg[32:]
        self.assertEqual(body[:24], struct.pack("<6f", 1.5, 2.0, -1.0, 0.0, 4.0, 8.0))
        self.assertEqual(body[24:48], struct.pack("<6I", 3, 1, 0, 2, 7, 6))
        self.assertEqual(body[48:72], struct.pack("<6f", 0.75, 0.25, 0.5, 0.5, 1.0, 0.0))
        self.assertEqual(len(msg), 32 + 3 * 2 * 4 + 2 * 3 * 2 * 4)

    def test_zero_rows(self):
        msg = wire.encode_request(1, 0, wire.DTYPE_F32, np.zeros((0, 64), np.float32))
        self.assertEqual(len(msg), 32)
        self.assertEqual(struct.unpack_from("<II", msg, 12), (0, 64))

    def test_round_trip(self):
        rows = bf16_bits(np.linspace(-3, 3, 4 * 8).reshape(4, 8))
        ids = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
        w = np.full((4, 2), 0.5)
        req = wire.decode_request(wire.encode_request(77, 3, wire.DTYPE_BF16, rows, ids, w))
        self.assertEqual((req.request_id, req.layer, req.dtype), (77, 3, wire.DTYPE_BF16))
        np.testing.assert_array_equal(req.rows, rows)
        np.testing.assert_array_equal(req.topk_ids, ids)
        np.testing.assert_array_equal(req.topk_weights, w)

    def test_bad_inputs_are_refused(self):
        f32 = np.zeros((2, 4), np.float32)
        with self.assertRaisesRegex(ValueError, "must be uint16"):
            wire.encode_request(1, 0, wire.DTYPE_BF16, f32)
        with self.assertRaisesRegex(ValueError, r"\[T, H\]"):
            wire.encode_request(1, 0, wire.DTYPE_F32, np.zeros(4, np.float32))
        with self.assertRaisesRegex(ValueError, "go together"):
            wire.encode_request(1, 0, wire.DTYPE_F32, f32, np.zeros((2, 1)), None)
        with self.assertRaisesRegex(ValueError, r"topk_ids must be \[T=2, K\]"):
            wire.encode_request(1, 0, wire.DTYPE_F32, f32, np.zeros((3, 1)), np.zeros((3, 1)))
        with self.assertRaisesRegex(ValueError, "layer -1"):
            wire.encode_request(1, -1, wire.DTYPE_F32, f32)
        with self.assertRaises(wire.WireError):
            wire.encode_request(1, 0, 7, f32)


class ResponseLayout(unittest.TestCase):
    def header(self, dtype, layer, t, h, status, retry, rid):
        return (b"MOER" + struct.pack("<HBB", 1, dtype, 0) + struct.pack("<III", layer, t, h)
                + struct.pack("<HH", status, retry) + struct.pack("<Q", rid))

    def test_ok_bf16(self):
        out = bf16_bits([[1.0, -2.0]])
        msg = self.header(0, 4, 1, 2, 200, 0, 123) + out.astype("<u2").tobytes()
        r = wire.decode_response(msg)
        self.assertEqual((r.request_id, r.layer, r.status, r.dtype), (123, 4, 200, 0))
        np.testing.assert_array_equal(r.rows, out)

    def test_ok_f32(self):
        msg = self.header(1, 2, 2, 1, 200, 0, 5) + struct.pack("<2f", 0.5, -7.0)
        r = wire.decode_response(msg)
        np.testing.assert_array_equal(r.rows, np.array([[0.5], [-7.0]], np.float32))

    def test_error_with_retry_after(self):
        msg = self.header(0, 1, 3, 64, 503, 2, 9) + b"remap in progress: try again\n"
        r = wire.decode_response(msg)
        self.assertEqual((r.status, r.retry_after, r.request_id), (503, 2, 9))
        self.assertEqual(r.reason, "remap in progress: try again")
        self.assertIsNone(r.rows)

    def test_malformed(self):
        with self.assertRaisesRegex(wire.WireError, "shorter"):
            wire.decode_response(b"MOER")
        with self.assertRaisesRegex(wire.WireError, "not a version-1"):
            wire.decode_response(b"MOEF" + bytes(28))
        with self.assertRaisesRegex(wire.WireError, "must be 40 bytes"):
            wire.decode_response(self.header(1, 0, 1, 2, 200, 0, 1) + bytes(4))

    def test_encoder_matches_the_table(self):
        rows = np.array([[0.5, -7.0]], np.float32)
        self.assertEqual(wire.encode_response(5, 2, 1, rows),
                         self.header(1, 2, 1, 2, 200, 0, 5) + struct.pack("<2f", 0.5, -7.0))
        self.assertEqual(wire.encode_response(6, 1, 0, status=413, reason="too many rows", shape=(9, 4)),
                         self.header(0, 1, 9, 4, 413, 0, 6) + b"too many rows")

    def test_frame(self):
        self.assertEqual(wire.frame(b"abc"), b"\x03\x00\x00\x00abc")
        self.assertEqual(wire.frame_length(b"\x10\x01\x00\x00"), 272)


if __name__ == "__main__":
    unittest.main()
