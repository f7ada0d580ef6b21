"""The rolling protocol: each peer replans K times, each time from what it deployed last.

`moectl bench --export DIR --rolling K [--stride T]` writes DIR/<slug>/rolling.json: H + (K-1)T
windows of token counts and the placement in use before step 0. At step k a peer plans on the H
windows `windows[kT : kT+H]` with, as the placement in use, what it deployed at step k-1 (step 0:
the shared `previous`), and DIR/<slug>/rolling/<id>.json receives what it deploys at each step and
the time of the step's one timed call. `moectl bench --peers DIR --rolling K` scores them.

What the engines keep between two rebalances (the sdists of peers.lock, read for this; paths
are inside each sdist):

- vLLM 0.34.0: `EplbState.__init__` / `add_model` (vllm/distributed/eplb/eplb_state.py) hold the
  policy as a class, `EPLB_POLICIES[policy]`, and `EplbState.rearrange` (and, async,
  `run_rebalance_experts` in async_worker.py) calls its classmethod `rebalance_experts(load
  window, ..., physical_to_logical_map)`: no policy state, only the map in use, which
  `_commit_eplb_maps` replaces with the returned one. That is what is deployed here. (On ROCm
  only, `rearrange` keeps the old map when the new one improves the rank imbalance by less
  than 5%; the CUDA path, modelled here, always commits.)
- SGLang 0.5.10.post1: `EPLBManager.rebalance` (sglang/srt/eplb/eplb_manager.py) builds a new
  `ExpertLocationMetadata.init_by_eplb` (expert_location.py) from the recorded logical counts
  alone, through the stateless `eplb_algorithms.rebalance_experts`; the placement in use is not
  even an input. Deployed: the returned phy2log (`rebalance` hands it to the model runner's
  `update_expert_location` for every layer).
- vllm-ascend 0.23.0: `NPUModelRunner.__init__` (vllm_ascend/worker/model_runner_v1.py) makes one
  `EplbProcess` for the engine's life; its `EplbWorker.__init__` (vllm_ascend/eplb/core/
  eplb_worker.py) calls `PolicyFactory.generate_policy` once and keeps `self.policy`, and
  `EplbProcess.worker_process` loops `do_update()` on that same worker in the EPLB subprocess.
  So one policy object plans every rebalance: here one object per peer per shape for all K
  steps. `do_update` plans from `self.old_expert_maps` (what it deployed last), then
  `check_expert_placement` puts back the old layer wherever the new one fails its tests, and
  the checked placement becomes `old_expert_maps`: that is deployed here
  (`policies.ascend_layer_ok` is the check). `change` and the priority list are ignored by the
  worker. DefaultEplb and SwiftBalancer recompute all they keep on every call; FlashLB keeps a
  per-layer ring buffer of hotness (`register_hotness`: its length is the number of stages
  of the latest call, so H windows a call replace the previous call's H entirely), the
  average-to-peak ratio it reached per layer (`average_to_peak_history`, set only for the layers
  of its priority list) and thresholds; `need_update` then skips the layers whose current
  ratio is still within 95% of that history and above 0.9 (below 32 ranks; 0.9 / 0.85 above),
  returning their current rows. `ascend-flashlb-fresh` runs FlashLB with a new object every
  step, so the effect of that state shows.

The stride T is H by default, so successive steps see disjoint windows, as the engines collect
them: vLLM records only the last window_size steps before each rearrangement
(`_should_record_current_step`), SGLang asserts its rebalance interval is at least its
recorder's buffer, and vllm-ascend clears its counters after each cycle
(`EplbUpdator.update_iteration`). With `--stride 1` the windows slide by one per step (the
same for every algorithm); FlashLB's trigger then sees little change between calls.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import policies as rp
from policies import Inputs, Modules, Peer, Result

FRESH_ID = "ascend-flashlb-fresh"
EXTRA_IDS = (FRESH_ID,)  # ids of the rolling protocol only (policies.select accepts them)


@dataclass
class Rolling:
    """One shape's rolling.json: the shape (as inputs.json), H, K, the stride T and the
    H + (K - 1) T windows."""

    meta: dict[str, Any]  # shape, num_layers, ... num_groups: the keys Inputs.from_json reads
    history_windows: int
    steps: int
    stride: int  # windows between consecutive steps (T)
    windows: np.ndarray  # [H+(K-1)T][L][E] float64, oldest first
    previous: np.ndarray  # [L][R*S] int64: the placement in use before step 0

    KEYS = ("shape", "num_layers", "num_experts", "num_ranks", "slots_per_rank", "num_nodes", "num_groups")

    @staticmethod
    def from_json(d: dict[str, Any]) -> Rolling:
        """Parses and checks rolling.json; step 0's Inputs checks the shapes of the arrays."""
        roll = Rolling(
            meta={k: d[k] for k in Rolling.KEYS},
            history_windows=int(d["history_windows"]),
            steps=int(d["steps"]),
            stride=int(d["stride"]),
            windows=np.asarray(d["windows"], dtype=np.float64),
            previous=np.asarray(d["previous"], dtype=np.int64),
        )
        if min(roll.history_windows, roll.steps, roll.stride) < 1:
            raise ValueError(
                f"history_windows {roll.history_windows}, steps {roll.steps} and stride {roll.stride} must be at least 1"
            )
        want = roll.history_windows + (roll.steps - 1) * roll.stride
        if roll.windows.ndim != 3 or roll.windows.shape[0] != want:
            raise ValueError(f"windows has shape {list(roll.windows.shape)}, want [{want}][L][E] (H + (K - 1) T windows)")
        roll.inputs(0, roll.previous)
        return roll

    @property
    def shape(self) -> str:
        return str(self.meta["shape"])

    def inputs(self, k: int, previous: np.ndarray) -> Inputs:
        """Step k's inputs: windows[kT : kT+H], and `previous` as the placement in use."""
        first = k * self.stride
        history = self.windows[first : first + self.history_windows]
        return Inputs.from_json({**self.meta, "history": history, "previous": previous})


@dataclass
class RollingPeer:
    """A peer in the rolling protocol: a single-shot peer, and whether its policy object is new
    at every step (only FlashLB's second row; the engines keep theirs, see the module doc)."""

    id: str
    label: str
    peer: Peer
    fresh: bool = False


def _flashlb() -> Peer:
    return next(p for p in rp.PEERS if p.id == "ascend-flashlb")


PEERS = [RollingPeer(p.id, p.label, p) for p in rp.PEERS] + [
    RollingPeer(FRESH_ID, "vllm-ascend 0.23.0 FlashLB (fresh object each step)", _flashlb(), fresh=True),
]


def select(only: str | None) -> list[RollingPeer]:
    """The rolling peers named by --only (all when absent; policies.select checked the ids)."""
    if not only:
        return PEERS
    ids = only.split(",")
    return [p for p in PEERS if p.id in ids]


@dataclass
class Step:
    """One step of one peer: what it was given, what it returned, what the engine deploys."""

    k: int
    inp: Inputs  # inp.previous: what was deployed at step k-1
    result: Result  # the plan as the entry point returned it, its time and note
    deployed: np.ndarray  # [L][R*S]
    put_back: int  # layers vllm-ascend's check_expert_placement put back (0 for the others)
    policy: Any  # the vllm-ascend policy object that planned (None for vLLM / SGLang)


def deploy_ascend(inp: Inputs, plan: np.ndarray) -> tuple[np.ndarray, int]:
    """What vllm-ascend's EplbWorker.do_update deploys for `plan`: the plan, except that
    check_expert_placement (eplb_worker.py) writes back the old layer wherever the new one
    fails one of its three tests. Returns the placement and the number of layers put back."""
    old = inp.table()
    new = plan.reshape(old.shape).copy()
    put_back = 0
    for layer in range(inp.num_layers):
        if not rp.ascend_layer_ok(old[layer], new[layer]):
            new[layer] = old[layer]
            put_back += 1
    return new.reshape(inp.num_layers, -1), put_back


def roll(rpeer: RollingPeer, m: Modules, rolling: Rolling) -> Iterator[Step]:
    """Runs one peer through the K steps, yielding each; an exception propagates from the step
    that raised it (the steps before it have been yielded)."""
    spec = rpeer.peer.ascend
    policy = None
    deployed = rolling.previous
    for k in range(rolling.steps):
        inp = rolling.inputs(k, deployed)
        if spec is None:
            # vLLM, SGLang: stateless entry points; the state is the deployed map only.
            result = rpeer.peer.run(m, inp)
            rp.check_plan(inp, result.phy2log)
            deployed, put_back = result.phy2log, 0
        else:
            if policy is None or rpeer.fresh:
                policy = spec.new(m)  # untimed, as the engine makes it once at startup
            result = spec.run(m, inp, policy)
            rp.check_plan(inp, result.phy2log)
            deployed, put_back = deploy_ascend(inp, result.phy2log)
        yield Step(k, inp, result, deployed, put_back, policy)


def _state_note(rpeer: RollingPeer) -> str:
    if rpeer.fresh:
        return "a new FlashLB object every step (not what vllm-ascend does: it keeps one; this row shows what that state does)"
    if rpeer.peer.ascend is not None:
        return ("one policy object for all steps (vllm-ascend's EplbWorker keeps PolicyFactory's object for the "
                "engine's life); deployed = the plan with the layers check_expert_placement puts back restored")
    return "stateless entry point; deployed = the returned phy2log, the next step's old placement"


def run_rolling_peer(rpeer: RollingPeer, m: Modules, rolling: Rolling) -> dict[str, Any]:
    """One peer's rolling/<id>.json; a step that raises ends the run with `error`."""
    peer = rpeer.peer
    first = rolling.inputs(0, rolling.previous)
    out = rp.run_header(
        peer,
        f"{peer.describe(first)}; rolling: {rolling.steps} steps, step k plans on "
        f"windows[{rolling.stride}k : {rolling.stride}k+{rolling.history_windows}] with previous = what it "
        "deployed at step k-1",
        id_=rpeer.id,
        label=rpeer.label,
    )
    out["note"] = _state_note(rpeer)
    steps: list[dict[str, Any]] = []
    try:
        for step in roll(rpeer, m, rolling):
            notes = [n for n in (step.result.note, rp.check_plan(step.inp, step.deployed)) if n]
            if peer.ascend is not None:
                notes.append(f"deployed with {step.put_back} layers put back to previous")
            steps.append({
                "phy2log": step.deployed.tolist(),
                "plan_ms": round(step.result.ms, 4),
                "note": "; ".join(notes),
            })
    except Exception as e:  # noqa: BLE001: a failing step is reported, the run goes on
        traceback.print_exc(file=sys.stderr)
        out["error"] = f"step {len(steps)}: {type(e).__name__}: {e}".strip()
    out["steps"] = steps
    return out


def run_rolling_export(dir_: Path, m: Modules, peers: list[RollingPeer]) -> int:
    """Every DIR/<slug>/rolling.json -> DIR/<slug>/rolling/<id>.json; the number of failures."""
    manifest = dir_ / "manifest.json"
    # moectl writes {"steps": K, "stride": T}
    want = json.loads(manifest.read_text()).get("rolling") if manifest.is_file() else None
    failures = 0
    for path in sorted(dir_.glob("*/rolling.json")):
        rolling = Rolling.from_json(json.loads(path.read_text()))
        if want is not None and (int(want["steps"]), int(want["stride"])) != (rolling.steps, rolling.stride):
            raise SystemExit(
                f"run_peers.py: {path} has {rolling.steps} steps {rolling.stride} windows apart, manifest.json says {want}"
            )
        warm = any(p.peer.id == "ascend-flashlb" for p in peers)
        rp.prepare_shape(m, rolling.inputs(0, rolling.previous), warm_flashlb=warm)
        out_dir = path.parent / "rolling"
        out_dir.mkdir(exist_ok=True)
        for rpeer in peers:
            plan = run_rolling_peer(rpeer, m, rolling)
            (out_dir / f"{rpeer.id}.json").write_text(json.dumps(plan) + "\n")
            failures += "error" in plan
            print(f"{rolling.shape} (rolling): {summary_line(plan)}", file=sys.stderr)
    return failures


def summary_line(plan: dict[str, Any]) -> str:
    """One line on a rolling run for the progress log."""
    ms = "/".join(f"{s['plan_ms']:.1f}" for s in plan["steps"])
    line = f"{plan['id']}: {len(plan['steps'])} steps, ms {ms or '-'}"
    if "error" in plan:
        return f"{line}; ERROR {plan['error']}"
    changed = [s["note"] for s in plan["steps"]]
    return f"{line}; last step: {changed[-1]}" if changed and changed[-1] else line
