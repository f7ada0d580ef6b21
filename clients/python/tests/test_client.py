"""ExpertClient against a FAKE in-process worker (tests/fake_worker.py): transports, rank
spreading, concurrency and out-of-order answers, shapes and dtypes, errors, retries. The real
worker is exercised by scripts/parity."""

import threading
import time
import unittest

import numpy as np

from fake_worker import HIDDEN, FakeWorker, bf16_to_f32, f32_to_bf16
from moe_client import ExpertClient, ExpertConnectionError, ExpertError

try:
    import torch
except ImportError:  # the client needs no torch; its torch paths are skipped then
    torch = None


class ClientAgainstFake(unittest.TestCase):
    def setUp(self):
        self.workers = [FakeWorker(), FakeWorker()]
        self.urls = [w.url for w in self.workers]

    def tearDown(self):
        for w in self.workers:
            w.close()

    def test_numpy_shapes_and_both_transports(self):
        x = np.random.default_rng(0).standard_normal((2, 3, HIDDEN)).astype(np.float32)
        for transport in ("stream", "post"):
            with ExpertClient(self.urls, transport=transport) as c:
                y = c.forward(2, x)
                self.assertEqual((y.shape, y.dtype), (x.shape, np.float32))
                # f32 on the wire: exact
                np.testing.assert_array_equal(y, 2 * x + 2)
                y64 = c.forward(1, x.astype(np.float64))
                self.assertEqual(y64.dtype, np.float64)

    def test_requests_spread_over_ranks(self):
        x = np.ones((4, HIDDEN), np.float32)
        with ExpertClient(self.urls) as c:
            for _ in range(10):
                c.forward(1, x)
        self.assertEqual([w.requests for w in self.workers], [5, 5])

    def test_many_threads_share_one_stream_per_rank(self):
        errors = []

        def run(seed):
            rng = np.random.default_rng(seed)
            for _ in range(20):
                x = rng.standard_normal((int(rng.integers(0, 9)), HIDDEN)).astype(np.float32)
                layer = int(rng.integers(1, 4))
                try:
                    np.testing.assert_array_equal(c.forward(layer, x), 2 * x + layer)
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    errors.append(e)

        with ExpertClient(self.urls) as c:
            threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.assertEqual(errors, [])
        self.assertEqual(sum(w.requests for w in self.workers), 160)
        self.assertEqual([w.connections for w in self.workers], [1, 1])

    def test_large_input_split_into_requests(self):
        x = np.arange(10 * HIDDEN, dtype=np.float32).reshape(10, HIDDEN)
        with ExpertClient(self.urls, max_rows=3) as c:
            np.testing.assert_array_equal(c.forward(3, x), 2 * x + 3)
        self.assertEqual(sum(w.requests for w in self.workers), 4)

    def test_caller_routing_travels(self):
        x = np.zeros((2, HIDDEN), np.float32)
        ids = np.array([[1, 2], [3, 0]])
        w = np.array([[0.5, 0.5], [1.0, 0.0]], np.float32)
        with ExpertClient(self.urls[0]) as c:
            y = c.forward(1, x, topk_ids=ids, topk_weights=w)
        np.testing.assert_array_equal(y[:, 0], [1 + 1.5, 1 + 3.0])

    def test_server_errors_carry_status_and_reason(self):
        for transport in ("stream", "post"):
            with ExpertClient(self.urls, transport=transport) as c:
                with self.assertRaises(ExpertError) as e:
                    c.forward(0, np.zeros((1, HIDDEN), np.float32))
                self.assertEqual(e.exception.status, 400)
                self.assertIn("layer 0 is a dense decoder layer", e.exception.reason)
                with self.assertRaises(ExpertError) as e:
                    c.forward(1, np.zeros((1, HIDDEN + 1), np.float32))
                self.assertIn("hidden 9 does not match", str(e.exception))
                # the connection survives a refused request
                np.testing.assert_array_equal(c.forward(1, np.zeros((1, HIDDEN), np.float32)), 1)

    def test_token(self):
        w = FakeWorker(token="s3cret")
        try:
            for transport in ("stream", "post"):
                with self.assertRaises(ExpertError) as e, ExpertClient(w.url, transport=transport) as c:
                    c.forward(1, np.zeros((1, HIDDEN), np.float32))
                self.assertEqual(e.exception.status, 401)
                with ExpertClient(w.url, token="s3cret", transport=transport) as c:
                    c.forward(1, np.zeros((1, HIDDEN), np.float32))
        finally:
            w.close()

    def test_503_is_retried_then_raised(self):
        w = FakeWorker(busy=2, retry_after=1)
        try:
            with ExpertClient(w.url, retries=3) as c:
                t = time.monotonic()
                c.forward(1, np.zeros((1, HIDDEN), np.float32))
                self.assertGreaterEqual(time.monotonic() - t, 2.0)  # waited Retry-After twice
            w.busy = 5
            with ExpertClient(w.url, retries=1, transport="post") as c:
                with self.assertRaises(ExpertError) as e:
                    c.forward(1, np.zeros((1, HIDDEN), np.float32))
                self.assertEqual((e.exception.status, e.exception.retry_after), (503, 1))
        finally:
            w.close()

    def test_503_without_retry_after_is_not_retried(self):
        w = FakeWorker(busy=1, retry_after=0)  # "this group does not serve the forward API"
        try:
            for transport in ("stream", "post"):
                w.busy = 1
                with ExpertClient(w.url, retries=3, transport=transport) as c:
                    with self.assertRaises(ExpertError) as e:
                        c.forward(1, np.zeros((1, HIDDEN), np.float32))
                    self.assertEqual((e.exception.status, e.exception.retry_after), (503, 0))
            self.assertEqual(w.requests, 0)
        finally:
            w.close()

    def test_reconnects_after_the_worker_drops_connections(self):
        x = np.ones((1, HIDDEN), np.float32)
        for transport in ("stream", "post"):
            with ExpertClient(self.urls[0], transport=transport) as c:
                c.forward(1, x)
                self.workers[0].drop_all()
                np.testing.assert_array_equal(c.forward(1, x), 3)

    def test_unreachable_rank(self):
        with ExpertClient("http://127.0.0.1:1", retries=0) as c:
            with self.assertRaises(ExpertConnectionError):
                c.forward(1, np.zeros((1, HIDDEN), np.float32))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "endpoints"):
            ExpertClient([])
        with self.assertRaisesRegex(ValueError, "transport"):
            ExpertClient(self.urls, transport="grpc")
        with self.assertRaisesRegex(ValueError, "without a path"):
            ExpertClient("http://h:1/v1/forward")
        c = ExpertClient(self.urls)
        self.addCleanup(c.close)
        with self.assertRaisesRegex(TypeError, "torch.Tensor or a numpy.ndarray"):
            c.forward(1, [[1.0] * HIDDEN])
        with self.assertRaisesRegex(TypeError, "not supported"):
            c.forward(1, np.zeros((1, HIDDEN), np.int32))
        with self.assertRaisesRegex(ValueError, "layer"):
            c.forward(-1, np.zeros((1, HIDDEN), np.float32))

    @unittest.skipIf(torch is None, "torch not installed")
    def test_torch_bf16_and_f32(self):
        x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
        with ExpertClient(self.urls) as c:
            y = c.forward(3, x)
            self.assertEqual((y.dtype, tuple(y.shape)), (torch.float32, (2, 5, HIDDEN)))
            torch.testing.assert_close(y, 2 * x + 3, rtol=0, atol=0)
            xb = x.to(torch.bfloat16)
            yb = c.forward(3, xb)
            self.assertEqual(yb.dtype, torch.bfloat16)
            # the fake rounds its f32 result to bf16 as the worker does
            want = f32_to_bf16(2 * bf16_to_f32(xb.view(torch.int16).numpy().view(np.uint16)) + 3)
            np.testing.assert_array_equal(yb.view(torch.int16).numpy().view(np.uint16), want)
            ids = torch.tensor([[1, 2]] * 10).reshape(2, 5, 2)
            yr = c.forward(1, x, topk_ids=ids, topk_weights=torch.full((2, 5, 2), 0.5))
            torch.testing.assert_close(yr, 2 * x + 1 + 1.5, rtol=0, atol=0)
            # a non-contiguous view goes as its values
            xt = x.transpose(0, 1)
            torch.testing.assert_close(c.forward(1, xt), 2 * xt + 1, rtol=0, atol=0)


if __name__ == "__main__":
    unittest.main()
