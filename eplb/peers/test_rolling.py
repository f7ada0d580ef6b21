"""Checks of the rolling protocol (rolling.py) on a tiny shape; scripts/bench-peers runs them.

    PYTHONPATH=<cache>/site python -m unittest discover -s eplb/peers -p 'test_*.py'

The peers' files come from $MOE_PEERS_SRC, else ~/.cache/moe-operator/peers/src (what
scripts/bench-peers --fetch extracts); the tests that run a peer are skipped without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rolling  # noqa: E402
import policies as rp  # noqa: E402
import shims  # noqa: E402

SRC = Path(os.environ.get("MOE_PEERS_SRC", Path.home() / ".cache/moe-operator/peers/src"))

# 2 layers, 8 experts, 4 ranks x 3 slots, one node; H = 2 windows a step.
L, E, R, S, H = 2, 8, 4, 3, 2
LOADS = np.array([100.0, 80.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0])
# The placement in use before step 0: experts 0..7 then 0..3 again, rank-major, so that rank 0
# holds experts 0, 1, 2 (the hottest three): every policy has something to fix.
PREVIOUS = np.array([list(range(E)) + list(range(4))] * L, dtype=np.int64)

_MODULES: rp.Modules | None = None


def modules(test: unittest.TestCase) -> rp.Modules:
    """The peers' modules, loaded once for all tests (the stand-ins can be installed once)."""
    global _MODULES
    if _MODULES is None:
        if not SRC.is_dir():
            test.skipTest(f"no peers' sources at {SRC} (scripts/bench-peers --fetch)")
        _MODULES = rp.load_modules(SRC)
    if _MODULES.ascend_flashlb is None:
        test.skipTest(_MODULES.flashlb_error)
    return _MODULES


def tiny(windows: np.ndarray, stride: int = 1) -> rolling.Rolling:
    """A rolling input of the tiny shape on `windows` [H+(K-1)T][L][E]."""
    steps = (windows.shape[0] - H) // stride + 1
    d = {
        "shape": "tiny", "num_layers": L, "num_experts": E, "num_ranks": R, "slots_per_rank": S,
        "num_nodes": 1, "num_groups": 1, "history_windows": H, "steps": steps, "stride": stride,
        "windows": windows.tolist(), "previous": PREVIOUS.tolist(),
    }
    shims.set_deployment(R, R)
    return rolling.Rolling.from_json(d)


def varying(k: int, stride: int = 1) -> np.ndarray:
    """The H + (k - 1) T windows of k steps T apart, all different (seeded)."""
    rng = np.random.default_rng(5)
    return LOADS[None, None] * rng.lognormal(0.0, 0.4, size=(H + (k - 1) * stride, L, E))


class DeployAscend(unittest.TestCase):
    """vllm-ascend deploys the plan except the layers check_expert_placement puts back."""

    def test_put_back(self) -> None:
        inp = tiny(varying(1)).inputs(0, PREVIOUS)
        plan = PREVIOUS.copy()
        plan[0, 0:3] = [4, 4, 5]  # layer 0: expert 4 twice on rank 0 -> the old layer 0
        plan[1, 11] = 4  # layer 1: rank 3's last slot 3 -> 4 (expert 3 is still on rank 1): valid
        deployed, put_back = rolling.deploy_ascend(inp, plan)
        self.assertEqual(put_back, 1)
        np.testing.assert_array_equal(deployed[0], PREVIOUS[0])
        np.testing.assert_array_equal(deployed[1], plan[1])

    def test_move_inside_a_rank_is_put_back(self) -> None:
        inp = tiny(varying(1)).inputs(0, PREVIOUS)
        plan = PREVIOUS.copy()
        plan[1, 0:3] = plan[1, [1, 0, 2]]  # same experts on rank 0, two slots swapped
        deployed, put_back = rolling.deploy_ascend(inp, plan)
        self.assertEqual(put_back, 1)
        np.testing.assert_array_equal(deployed, PREVIOUS)


class Rolling(unittest.TestCase):
    def test_each_step_starts_from_the_last_deployed(self) -> None:
        """Every peer, 3 steps 2 windows apart: step k plans on windows[2k:2k+H] from what step k-1
        deployed; the vllm-ascend peers keep one policy object, the fresh FlashLB row makes one a
        step."""
        m = modules(self)
        roll = tiny(varying(3, stride=2), stride=2)
        for rpeer in rolling.PEERS:
            with self.subTest(peer=rpeer.id):
                steps = list(rolling.roll(rpeer, m, roll))
                self.assertEqual([s.k for s in steps], [0, 1, 2])
                np.testing.assert_array_equal(steps[0].inp.previous, PREVIOUS)
                for a, b in zip(steps, steps[1:]):
                    np.testing.assert_array_equal(b.inp.previous, a.deployed)
                for s in steps:
                    np.testing.assert_array_equal(s.inp.history, roll.windows[2 * s.k : 2 * s.k + H])
                    self.assertEqual(s.deployed.shape, (L, R * S))
                objects = {id(s.policy) for s in steps}
                if rpeer.peer.ascend is None:
                    self.assertEqual([s.policy for s in steps], [None] * 3)
                else:
                    self.assertEqual(len(objects), 3 if rpeer.fresh else 1)
                plan = rolling.run_rolling_peer(rpeer, m, roll)
                self.assertNotIn("error", plan)
                self.assertEqual([s["phy2log"] for s in plan["steps"]], [s.deployed.tolist() for s in steps])

    def test_flashlb_state(self) -> None:
        """The same load twice: the persistent FlashLB finds its step-0 placement still fine and
        skips every layer at step 1 (need_update), the fresh one searches every layer again. Its
        hotness ring holds only the last call's H windows (the ring is as long as a call's stages)."""
        m = modules(self)
        roll = tiny(np.broadcast_to(LOADS, (H + 1, L, E)).copy())
        searches: list[int] = []
        tree = m.ascend_flashlb.FlashTree

        class Counting(tree):  # type: ignore[misc, valid-type]
            def __init__(self, *a: object, **kw: object) -> None:
                searches.append(1)
                super().__init__(*a, **kw)

        m.ascend_flashlb.FlashTree = Counting
        try:
            kept, fresh = (next(p for p in rolling.PEERS if p.id == i) for i in ("ascend-flashlb", rolling.FRESH_ID))
            counts = {}
            runs = {}
            for rpeer in (kept, fresh):
                per_step = []
                runs[rpeer.id] = []
                for step in rolling.roll(rpeer, m, roll):
                    per_step.append(len(searches))
                    searches.clear()
                    runs[rpeer.id].append(step)
                counts[rpeer.id] = per_step
        finally:
            m.ascend_flashlb.FlashTree = tree
        self.assertEqual(counts, {kept.id: [L, 0], fresh.id: [L, L]})
        k0, k1 = runs[kept.id]
        self.assertTrue(k1.policy.average_to_peak_history, "step 0 recorded no layer's ratio")
        np.testing.assert_array_equal(k1.deployed, k0.deployed)  # skipped layers: current rows
        self.assertFalse(np.array_equal(k0.deployed, PREVIOUS))
        for layer in range(L):
            ring = k1.policy.hotness_window[layer]
            self.assertEqual(ring["length"], H)
            # register_hotness adds 1 to each expert's load (summed back from the slots)
            np.testing.assert_allclose(ring["buffer"], roll.windows[1 : 1 + H, layer] + 1)

    def test_export_files(self) -> None:
        """DIR/<slug>/rolling.json -> DIR/<slug>/rolling/<id>.json with one entry per step; a peer
        that raises at step 1 keeps step 0 and says which step failed."""
        m = modules(self)
        roll = tiny(varying(2))
        calls = []

        def fails_second(mods: rp.Modules, inp: rp.Inputs) -> rp.Result:
            calls.append(1)
            if len(calls) == 2:
                raise ValueError("boom")
            return rp.run_vllm_default(mods, inp)

        vllm = next(p for p in rolling.PEERS if p.id == "vllm-default")
        broken = rolling.RollingPeer("broken", "broken", dataclasses.replace(vllm.peer, run=fails_second))
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "tiny").mkdir()
            doc = {**roll.meta, "history_windows": H, "steps": roll.steps, "stride": 1,
                   "windows": roll.windows.tolist(), "previous": PREVIOUS.tolist()}
            (d / "tiny" / "rolling.json").write_text(json.dumps(doc))
            (d / "manifest.json").write_text(json.dumps({"rolling": {"steps": roll.steps, "stride": 1}}))
            with contextlib.redirect_stderr(io.StringIO()):  # the progress lines, the traceback
                failures = rolling.run_rolling_export(d, m, [vllm, broken])
            self.assertEqual(failures, 1)
            ok = json.loads((d / "tiny/rolling/vllm-default.json").read_text())
            bad = json.loads((d / "tiny/rolling/broken.json").read_text())
        self.assertNotIn("error", ok)
        self.assertEqual(len(ok["steps"]), 2)
        self.assertEqual(set(ok["steps"][0]), {"phy2log", "plan_ms", "note"})
        self.assertEqual(bad["error"], "step 1: ValueError: boom")
        self.assertEqual(len(bad["steps"]), 1)
        self.assertEqual(bad["steps"][0]["phy2log"], ok["steps"][0]["phy2log"])


if __name__ == "__main__":
    unittest.main()
