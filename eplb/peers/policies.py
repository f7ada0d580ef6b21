"""The peers' own EPLB policies, called as their engines call them: loading the pinned policy
files, the inputs (`moectl bench --export`'s inputs.json), one runner per peer, and the one-shot
protocol (each peer plans once per shape; DIR/<slug>/peers/<id>.json). `run_peers.py` is the
command line; `rolling.py` runs the same peers step after step.

The policy files are loaded by path under synthetic package names, so the peers' package
__init__s (which pull in the rest of vLLM, SGLang or vllm-ascend) never run; the few names they
import but never compute with are stand-ins (shims.py). numba, llvmlite and scipy (FlashLB's
imports) come from PYTHONPATH.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shims  # noqa: E402  (beside this file; must be installed before the peers load)

VLLM = "vllm-0.34.0"
SGLANG = "sglang-0.5.10.post1"
ASCEND = "vllm_ascend-0.23.0"

# Synthetic package -> folder of an sdist (relative to SRC) holding the files it loads.
PACKAGES = {
    "peer_vllm_policy": f"{VLLM}/vllm/distributed/eplb/policy",
    "peer_sglang_eplb": f"{SGLANG}/sglang/srt/eplb/eplb_algorithms",
    "peer_ascend_policy": f"{ASCEND}/vllm_ascend/eplb/core/policy",
}


@dataclass
class Inputs:
    """One shape's inputs (the schema of eplb::bench::peers::PeerInputs), as arrays."""

    shape: str
    num_layers: int
    num_experts: int
    num_ranks: int
    slots_per_rank: int
    num_nodes: int
    num_groups: int
    history: np.ndarray  # [H][L][E] float64 token counts, oldest window first
    previous: np.ndarray  # [L][R*S] int64: slot p is on rank p // S

    @staticmethod
    def from_json(d: dict[str, Any]) -> Inputs:
        """Parses and checks inputs.json: a malformed export should fail here, not in a peer."""
        inp = Inputs(
            shape=d["shape"],
            num_layers=int(d["num_layers"]),
            num_experts=int(d["num_experts"]),
            num_ranks=int(d["num_ranks"]),
            slots_per_rank=int(d["slots_per_rank"]),
            num_nodes=int(d["num_nodes"]),
            num_groups=int(d["num_groups"]),
            history=np.asarray(d["history"], dtype=np.float64),
            previous=np.asarray(d["previous"], dtype=np.int64),
        )
        want_h = (inp.num_layers, inp.num_experts)
        if inp.history.ndim != 3 or inp.history.shape[1:] != want_h:
            raise ValueError(f"history has shape {inp.history.shape}, want [H]{list(want_h)}")
        if inp.previous.shape != (inp.num_layers, inp.slots):
            raise ValueError(f"previous has shape {inp.previous.shape}, want [{inp.num_layers}][{inp.slots}]")
        return inp

    @property
    def slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    @property
    def windows(self) -> int:
        return self.history.shape[0]

    def summed(self) -> np.ndarray:
        """[L][E] load over all windows: what vLLM, SGLang's deepseek and the NPUs' accumulated
        moe_load hand their policies (each sums its collection window)."""
        return self.history.sum(axis=0)

    def replicas(self) -> np.ndarray:
        """[L][E] replicas of each expert in the placement in use."""
        cnt = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            np.add.at(cnt[layer], self.previous[layer], 1)
        return cnt

    def slot_workload(self) -> np.ndarray:
        """[H][L][R][S] load of each physical slot of `previous`, per window.

        What the NPUs record per slot under even dispatch: an expert's tokens split equally
        over its replicas (vllm-ascend reads per-slot counters, not per-expert ones).
        """
        cnt = self.replicas()
        share = self.history / np.maximum(cnt, 1)[None]
        idx = np.broadcast_to(self.previous[None], (self.windows, *self.previous.shape))
        per_slot = np.take_along_axis(share, idx, axis=2)
        return per_slot.reshape(self.windows, self.num_layers, self.num_ranks, self.slots_per_rank)

    def table(self) -> np.ndarray:
        """[L][R][S] expert of each slot of `previous`: vllm-ascend's current_expert_table."""
        return self.previous.reshape(self.num_layers, self.num_ranks, self.slots_per_rank)

    def sglang_groups(self) -> int | None:
        """SGLang's num_groups: None for models without expert groups.

        Its Qwen3-MoE (and every model without get_model_config_for_expert_location's n_group)
        reports None; DeepSeek reports config.n_group. Our inputs say 1 for "no groups".
        """
        return None if self.num_groups == 1 else self.num_groups

    def sglang_hierarchical(self) -> bool:
        """sglang/srt/eplb/eplb_algorithms/__init__.py compute_algorithm("auto", ...): the
        hierarchical variant iff there are groups and they divide evenly over the nodes."""
        g = self.sglang_groups()
        return g is not None and g % self.num_nodes == 0


# --------------------------------------------------------------------------------------------
# Loading the peers' files


def register_package(name: str, folder: Path) -> None:
    """An empty package `name` whose submodules are the .py files of `folder`.

    Its __init__.py is deliberately not run: vLLM's policy/__init__.py imports vllm.config,
    SGLang's eplb_algorithms/__init__.py imports the elastic-EP state manager.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing (scripts/bench-peers extracts it)")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    pkg = importlib.util.module_from_spec(spec)
    pkg.__path__ = [str(folder)]
    sys.modules[name] = pkg


@dataclass
class Modules:
    """The peers' modules, loaded once per process."""

    vllm_default: types.ModuleType
    sglang_deepseek: types.ModuleType
    sglang_deepseek_vec: types.ModuleType
    ascend_default: types.ModuleType
    ascend_swift: types.ModuleType
    ascend_flashlb: types.ModuleType | None
    flashlb_error: str


def load_modules(src: Path) -> Modules:
    """Installs the stand-ins and imports each policy file from `src` by path."""
    shims.install()
    for name, rel in PACKAGES.items():
        register_package(name, src / rel)
    flashlb: types.ModuleType | None = None
    flashlb_error = ""
    try:
        flashlb = importlib.import_module("peer_ascend_policy.policy_flashlb")
    except ImportError as e:  # numba / scipy missing: the other peers still run
        flashlb_error = f"cannot import policy_flashlb: {e} (numba, llvmlite, scipy on PYTHONPATH?)"
    return Modules(
        vllm_default=importlib.import_module("peer_vllm_policy.default"),
        sglang_deepseek=importlib.import_module("peer_sglang_eplb.deepseek"),
        sglang_deepseek_vec=importlib.import_module("peer_sglang_eplb.deepseek_vec"),
        ascend_default=importlib.import_module("peer_ascend_policy.policy_default_eplb"),
        ascend_swift=importlib.import_module("peer_ascend_policy.policy_swift_balancer"),
        ascend_flashlb=flashlb,
        flashlb_error=flashlb_error,
    )


# --------------------------------------------------------------------------------------------
# The peers: each prepares its arguments untimed, then times exactly one entry-point call.


@dataclass
class Result:
    """One repetition: the plan as [L][R*S] and the entry point's wall time."""

    phy2log: np.ndarray
    ms: float
    note: str = ""


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """The call's value and its wall time in ms."""
    t0 = time.perf_counter()
    out = call()
    return out, (time.perf_counter() - t0) * 1e3


def run_vllm_default(m: Modules, inp: Inputs) -> Result:
    """vLLM 0.34.0 DefaultEplbPolicy.rebalance_experts (vllm/distributed/eplb/policy/default.py).

    vLLM's EplbState.rearrange (eplb_state.py) passes the load window summed over its steps
    ([L][E]), model.num_physical_experts, model.num_expert_groups, the node count (forced to 1
    when the GPUs do not divide evenly over the nodes), the EP size, and the current
    physical_to_logical_map so experts staying on a GPU keep their slots.
    """
    nodes = inp.num_nodes if inp.num_ranks % inp.num_nodes == 0 else 1
    weight = torch.from_numpy(inp.summed())
    old = torch.from_numpy(inp.previous.copy())
    policy = m.vllm_default.DefaultEplbPolicy
    out, ms = timed(
        lambda: policy.rebalance_experts(weight, inp.slots, inp.num_groups, nodes, inp.num_ranks, old)
    )
    return Result(np.asarray(out, dtype=np.int64), ms)


def run_sglang_deepseek(m: Modules, inp: Inputs) -> Result:
    """SGLang 0.5.10.post1 deepseek.rebalance_experts (eplb_algorithms/deepseek.py).

    What eplb_algorithms.rebalance_experts does for algorithm "auto" when compute_algorithm picks
    deepseek[_hierarchical] (ExpertLocationMetadata.init_by_eplb passes the recorder's
    logical_count [steps][L][E], num_physical_experts, num_physical_experts // ep_size local
    experts, the model's num_groups and server_args.nnodes): weight = the sum over steps (done
    inside the timed call, as that dispatcher does), num_gpus = physical // local.
    """
    tokens = torch.from_numpy(inp.history)
    mod = m.sglang_deepseek
    out, ms = timed(
        lambda: mod.rebalance_experts(
            weight=tokens.sum(dim=0),
            num_replicas=inp.slots,
            num_groups=inp.sglang_groups(),
            num_nodes=inp.num_nodes,
            num_gpus=inp.slots // inp.slots_per_rank,
            enable_hierarchical=inp.sglang_hierarchical(),
        )
    )
    phy2log, _log2phy, _logcnt = out
    return Result(np.asarray(phy2log, dtype=np.int64), ms, f"hierarchical={inp.sglang_hierarchical()}")


def run_sglang_deepseek_vec(m: Modules, inp: Inputs) -> Result:
    """SGLang 0.5.10.post1 deepseek_vec.rebalance_experts (eplb_algorithms/deepseek_vec.py).

    The dispatcher's deepseek_vec[_hierarchical] branch: the per-step counts [H][L][E] themselves
    (this variant balances each step, not only their sum), num_local_physical_experts = S, and the
    same hierarchical rule as "auto".
    """
    tokens = torch.from_numpy(inp.history)
    mod = m.sglang_deepseek_vec
    out, ms = timed(
        lambda: mod.rebalance_experts(
            tokens_per_expert=tokens,
            num_physical_experts=inp.slots,
            num_local_physical_experts=inp.slots_per_rank,
            num_groups=inp.sglang_groups(),
            num_nodes=inp.num_nodes,
            enable_hierarchical=inp.sglang_hierarchical(),
        )
    )
    phy2log, _log2phy, _count = out
    return Result(np.asarray(phy2log, dtype=np.int64), ms, f"hierarchical={inp.sglang_hierarchical()}")


def ascend_note(inp: Inputs, new: np.ndarray, change: Any, priority: Any, subset: bool) -> str:
    """What vllm-ascend's engine would make of the plan, beside the plan itself.

    EplbWorker.do_update applies the returned deployment to every layer: it ignores `change`
    (the policy's own "worth it" flag) and the priority list, after check_expert_placement puts
    back the old placement of any layer that drops an expert, holds one expert twice on an NPU,
    or moves an expert between slots of the same NPU. The plan is written as returned; the
    layers that check would put back are counted here, not altered. `subset`: the priority is
    FlashLB's list of the layers it would update (DefaultEplb and SwiftBalancer return an order
    of all layers instead).
    """
    old = inp.table()
    new3 = new.reshape(old.shape)
    changed = int((new3 != old).any(axis=(1, 2)).sum())
    reverted = sum(1 for layer in range(inp.num_layers) if not ascend_layer_ok(old[layer], new3[layer]))
    parts = [f"change={int(bool(change))} (the worker applies the plan either way)"]
    if subset:
        parts.append(f"priority_idx holds {len(np.asarray(priority).reshape(-1))}/{inp.num_layers} layers")
    parts.append(f"{changed}/{inp.num_layers} layers differ from previous")
    parts.append(f"{reverted} layers the worker's check_expert_placement would put back")
    return ", ".join(parts)


def ascend_layer_ok(old: np.ndarray, new: np.ndarray) -> bool:
    """vllm-ascend EplbWorker.check_expert_placement's three tests on one layer [R][S]."""
    if np.unique(new).size < np.unique(old).size:
        return False
    for rank_new, rank_old in zip(new, old):
        if np.unique(rank_new).size != rank_new.size:
            return False
        stay = np.isin(rank_new, rank_old)
        if not np.array_equal(rank_new[stay], rank_old[stay]):
            return False
    return True


def ascend_tensors(inp: Inputs, windows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """current_expert_table [L][R][S] and expert_workload as vllm-ascend's worker hands them.

    EplbUpdator.compute_and_set_moe_load all-gathers each NPU's per-slot moe_load: [L][R][S]
    accumulated over the collection interval for the single-stage policies, and
    [stages][L][R][S] for FlashLB (multi_stage, policy type 3). Both are torch tensors.
    """
    table = torch.from_numpy(inp.table().copy())
    load = inp.slot_workload()
    return table, torch.from_numpy(load if windows else load.sum(axis=0))


def run_ascend(inp: Inputs, policy: Any, windows: bool, subset: bool) -> Result:
    """One vllm-ascend policy object's rebalance_experts, called as the engine calls it.

    EplbWorker.calculate_rebalance_experts calls policy.rebalance_experts(old_placement,
    load_info) with the [L][R][S] table and the per-slot load: per stage [stages][L][R][S] for
    FlashLB (`windows`), summed [L][R][S] for the single-stage policies. Every policy returns
    (change, priority, new deployment [L][R][S]). `subset`: as for ascend_note.
    """
    table, load = ascend_tensors(inp, windows=windows)
    (change, prio, new), ms = timed(lambda: policy.rebalance_experts(table, load))
    phy2log = np.asarray(new, dtype=np.int64).reshape(inp.num_layers, -1)
    return Result(phy2log, ms, ascend_note(inp, phy2log, change, prio, subset=subset))


@dataclass(frozen=True)
class AscendPolicy:
    """One vllm-ascend policy as its engine holds and calls it.

    `new` makes the object PolicyFactory.generate_policy makes (EplbWorker.__init__ keeps it for
    the engine's life: see rolling.py); `windows` and `subset` are run_ascend's.
    """

    new: Callable[[Modules], Any]
    windows: bool
    subset: bool

    def run(self, m: Modules, inp: Inputs, policy: Any = None) -> Result:
        """run_ascend on `policy`, or on a fresh object when None (the single-shot protocol)."""
        return run_ascend(inp, self.new(m) if policy is None else policy, self.windows, self.subset)


def _new_flashlb(m: Modules) -> Any:
    if m.ascend_flashlb is None:
        raise RuntimeError(m.flashlb_error)
    return m.ascend_flashlb.FlashLB()


ASCEND_DEFAULT = AscendPolicy(lambda m: m.ascend_default.DefaultEplb(), windows=False, subset=False)
ASCEND_SWIFT = AscendPolicy(lambda m: m.ascend_swift.SwiftBalanceEplb(), windows=False, subset=False)
ASCEND_FLASHLB = AscendPolicy(_new_flashlb, windows=True, subset=True)


def run_ascend_default(m: Modules, inp: Inputs) -> Result:
    """vllm-ascend 0.23.0 DefaultEplb.rebalance_experts (policy_default_eplb.py; policy type 1),
    on the summed per-slot load."""
    return ASCEND_DEFAULT.run(m, inp)


def run_ascend_swift(m: Modules, inp: Inputs) -> Result:
    """vllm-ascend 0.23.0 SwiftBalanceEplb.rebalance_experts (policy_swift_balancer.py; type 2).

    Same call as DefaultEplb (is_node_redundant keeps its default False, as the worker passes
    two arguments).
    """
    return ASCEND_SWIFT.run(m, inp)


def run_ascend_flashlb(m: Modules, inp: Inputs) -> Result:
    """vllm-ascend 0.23.0 FlashLB.rebalance_experts (policy_flashlb.py; policy type 3).

    The worker passes the per-stage load [stages][L][R][S]; layers FlashLB does not update come
    back as the table's own rows. Its numba kernels are compiled before timing (flashlb_warm_up).
    """
    return ASCEND_FLASHLB.run(m, inp)


@dataclass
class Peer:
    """A peer policy: its ids for the table and how to run it."""

    id: str
    label: str
    package: str
    source: str
    run: Callable[[Modules, Inputs], Result]
    describe: Callable[[Inputs], str]
    ascend: AscendPolicy | None = None  # the policy object behind `run`, for the vllm-ascend peers


def _sum_desc(inp: Inputs) -> str:
    return f"weight = sum of the {inp.windows} windows [{inp.num_layers}][{inp.num_experts}]"


PEERS = [
    Peer(
        "vllm-default", "vLLM 0.34.0 default policy", "vllm==0.34.0",
        "vllm/distributed/eplb/policy/default.py", run_vllm_default,
        lambda i: f"{_sum_desc(i)}, num_replicas={i.slots}, num_groups={i.num_groups}, "
        f"num_nodes={i.num_nodes}, num_ranks={i.num_ranks}, old_global_expert_indices=previous",
    ),
    Peer(
        "sglang-deepseek", "SGLang 0.5.10.post1 deepseek (auto)", "sglang==0.5.10.post1",
        "sglang/srt/eplb/eplb_algorithms/deepseek.py", run_sglang_deepseek,
        lambda i: f"{_sum_desc(i)}, num_replicas={i.slots}, num_groups={i.sglang_groups()}, "
        f"num_nodes={i.num_nodes}, num_gpus={i.num_ranks}, enable_hierarchical={i.sglang_hierarchical()}",
    ),
    Peer(
        "sglang-deepseek-vec", "SGLang 0.5.10.post1 deepseek_vec", "sglang==0.5.10.post1",
        "sglang/srt/eplb/eplb_algorithms/deepseek_vec.py", run_sglang_deepseek_vec,
        lambda i: f"tokens_per_expert = the {i.windows} windows [{i.windows}][{i.num_layers}][{i.num_experts}], "
        f"num_physical_experts={i.slots}, num_local_physical_experts={i.slots_per_rank}, "
        f"num_groups={i.sglang_groups()}, num_nodes={i.num_nodes}, "
        f"enable_hierarchical={i.sglang_hierarchical()}",
    ),
    Peer(
        "ascend-default", "vllm-ascend 0.23.0 DefaultEplb", "vllm-ascend==0.23.0",
        "vllm_ascend/eplb/core/policy/policy_default_eplb.py", run_ascend_default,
        lambda i: f"current_expert_table = previous [{i.num_layers}][{i.num_ranks}][{i.slots_per_rank}], "
        f"expert_workload = per-slot load summed over the {i.windows} windows "
        f"[{i.num_layers}][{i.num_ranks}][{i.slots_per_rank}] (expert load / its replicas in previous)",
        ascend=ASCEND_DEFAULT,
    ),
    Peer(
        "ascend-swift-balancer", "vllm-ascend 0.23.0 SwiftBalancer", "vllm-ascend==0.23.0",
        "vllm_ascend/eplb/core/policy/policy_swift_balancer.py", run_ascend_swift,
        lambda i: f"current_expert_table = previous [{i.num_layers}][{i.num_ranks}][{i.slots_per_rank}], "
        f"expert_workload = per-slot load summed over the {i.windows} windows "
        f"[{i.num_layers}][{i.num_ranks}][{i.slots_per_rank}] (expert load / its replicas in previous)",
        ascend=ASCEND_SWIFT,
    ),
    Peer(
        "ascend-flashlb", "vllm-ascend 0.23.0 FlashLB", "vllm-ascend==0.23.0",
        "vllm_ascend/eplb/core/policy/policy_flashlb.py", run_ascend_flashlb,
        lambda i: f"current_expert_table = previous [{i.num_layers}][{i.num_ranks}][{i.slots_per_rank}], "
        f"expert_workload = per-slot load of each window "
        f"[{i.windows}][{i.num_layers}][{i.num_ranks}][{i.slots_per_rank}] (expert load / its replicas in previous)",
        ascend=ASCEND_FLASHLB,
    ),
]


# --------------------------------------------------------------------------------------------
# Running


def flashlb_warm_up(m: Modules, inp: Inputs) -> float:
    """Compiles FlashLB's numba kernels for this input's types before anything is timed; ms.

    vllm-ascend's PolicyFactory calls the module's warm_up() at startup, which compiles them for
    int64 loads (torch.randint); our loads are float64, on which numba compiles other
    specialisations at the first call. So the warm-up here is one untimed FlashLB call on the
    shape's own inputs, on a policy object that is then thrown away.
    """
    if m.ascend_flashlb is None:
        return 0.0
    table, load = ascend_tensors(inp, windows=True)
    _, ms = timed(lambda: m.ascend_flashlb.FlashLB().rebalance_experts(table, load))
    return ms


def check_plan(inp: Inputs, phy2log: np.ndarray) -> str:
    """Raises on a plan of the wrong size; returns a note on what the evaluator will refuse or
    count (experts without a replica, ids out of range), so the JSON says it too."""
    if phy2log.shape != (inp.num_layers, inp.slots):
        raise ValueError(f"plan has shape {list(phy2log.shape)}, want [{inp.num_layers}][{inp.slots}]")
    notes = []
    if phy2log.min() < 0 or phy2log.max() >= inp.num_experts:
        notes.append(f"expert ids outside 0..{inp.num_experts}")
    else:
        missing = sum(1 for row in phy2log if np.unique(row).size < inp.num_experts)
        if missing:
            notes.append(f"{missing} layers leave an expert without a replica")
    ranks = phy2log.reshape(inp.num_layers, inp.num_ranks, inp.slots_per_rank)
    twice = sum(
        1 for layer in ranks if any(np.unique(r).size < r.size for r in layer)
    )
    if twice:
        notes.append(f"{twice} layers hold an expert twice on one rank")
    return "; ".join(notes)


def run_header(peer: Peer, input_: str, id_: str | None = None, label: str | None = None) -> dict[str, Any]:
    """The fields every file of a peer's run starts with (eplb::bench::peers::PeerRun): who it
    is, what it was given, torch's threads; `id_` / `label` name a variant of the peer."""
    return {
        "id": id_ or peer.id,
        "label": label or peer.label,
        "package": peer.package,
        "source": peer.source,
        "input": input_,
        "threads": torch.get_num_threads(),
    }


def prepare_shape(m: Modules, inp: Inputs, warm_flashlb: bool) -> None:
    """Before a shape's peers run: the deployment the stand-ins report (ranks, ranks per node)
    and, when FlashLB runs, its numba kernels compiled for this input (flashlb_warm_up)."""
    shims.set_deployment(inp.num_ranks, inp.num_ranks // max(inp.num_nodes, 1))
    if warm_flashlb:
        ms = flashlb_warm_up(m, inp)
        print(f"{inp.shape}: FlashLB warm-up (numba compile + one untimed plan) {ms:.0f} ms", file=sys.stderr)


def run_peer(peer: Peer, m: Modules, inp: Inputs, repeats: int) -> dict[str, Any]:
    """Runs one peer `repeats` times (a fresh policy object each time: the vllm-ascend ones keep
    state between calls) and returns its PeerPlan JSON; an exception becomes `error`."""
    out = run_header(peer, peer.describe(inp))
    try:
        results = [peer.run(m, inp) for _ in range(repeats)]
        last = results[-1]
        notes = [n for n in (last.note, check_plan(inp, last.phy2log)) if n]
        differ = [i for i, r in enumerate(results[:-1]) if not np.array_equal(r.phy2log, last.phy2log)]
        if differ:
            notes.append(f"not deterministic: repeats {differ} differ from the last (kept)")
        out["phy2log"] = last.phy2log.tolist()
        out["plan_ms"] = [round(r.ms, 4) for r in results]
        out["note"] = "; ".join(notes)
    except Exception as e:  # noqa: BLE001: any failure of a peer is reported, the run goes on
        traceback.print_exc(file=sys.stderr)
        out["error"] = f"{type(e).__name__}: {e}".strip()
        out["note"] = ""
    return out


def select(only: str | None, extra: tuple[str, ...] = ()) -> list[Peer]:
    """The peers named by --only (all when absent); `extra`: ids that are valid elsewhere (the
    rolling protocol's own peers), accepted here and left out."""
    if not only:
        return PEERS
    ids = only.split(",")
    unknown = sorted(set(ids) - {p.id for p in PEERS} - set(extra))
    if unknown:
        known = [p.id for p in PEERS] + list(extra)
        raise SystemExit(f"run_peers.py: unknown peer(s) {unknown}; the peers: {known}")
    return [p for p in PEERS if p.id in ids]


def run_export(dir_: Path, m: Modules, peers: list[Peer], repeats: int) -> int:
    """Every DIR/<slug>/inputs.json -> DIR/<slug>/peers/<id>.json; the number of failures."""
    shapes = sorted(dir_.glob("*/inputs.json"))
    failures = 0
    for path in shapes:
        inp = Inputs.from_json(json.loads(path.read_text()))
        prepare_shape(m, inp, warm_flashlb=any(p.id == "ascend-flashlb" for p in peers))
        out_dir = path.parent / "peers"
        out_dir.mkdir(exist_ok=True)
        for peer in peers:
            plan = run_peer(peer, m, inp, repeats)
            (out_dir / f"{peer.id}.json").write_text(json.dumps(plan) + "\n")
            failures += "error" in plan
            print(f"{inp.shape}: {summary_line(plan)}", file=sys.stderr)
    return failures


def summary_line(plan: dict[str, Any]) -> str:
    """One line on a plan for the progress log."""
    if "error" in plan:
        return f"{plan['id']}: ERROR {plan['error']}"
    ms = plan["plan_ms"]
    note = f" ({plan['note']})" if plan["note"] else ""
    return f"{plan['id']}: median {sorted(ms)[len(ms) // 2]:.1f} ms over {len(ms)}{note}"


# --------------------------------------------------------------------------------------------
# The FlashLB issue's example

EXAMPLE_LOADS = [600.0, 560.0, 120.0, 120.0, 20.0, 10.0, 10.0, 10.0]


def example_inputs() -> Inputs:
    """One layer, 8 experts, 8 ranks x 2 slots, 1 node, 1 group, one window; previous holds
    experts 0..7 twice, rank-major (rank r = slots 2r, 2r+1: rank 0 = experts 0,1, rank 4 = 0,1)."""
    return Inputs(
        shape="FlashLB example",
        num_layers=1, num_experts=8, num_ranks=8, slots_per_rank=2, num_nodes=1, num_groups=1,
        history=np.asarray([[EXAMPLE_LOADS]], dtype=np.float64),
        previous=np.asarray([list(range(8)) * 2], dtype=np.int64),
    )


def heaviest_rank(inp: Inputs, phy2log: np.ndarray) -> float:
    """The heaviest rank's load on the summed history, each expert split evenly over its replicas."""
    load = inp.summed()[0]
    row = phy2log[0]
    cnt = np.bincount(row, minlength=inp.num_experts)
    per_slot = load[row] / cnt[row]
    return float(per_slot.reshape(inp.num_ranks, inp.slots_per_rank).sum(axis=1).max())


def run_example(m: Modules, peers: list[Peer], repeats: int) -> None:
    """Prints each peer's plan of the FlashLB example and its heaviest rank load."""
    inp = example_inputs()
    shims.set_deployment(inp.num_ranks, inp.num_ranks)
    if any(p.id == "ascend-flashlb" for p in peers):
        flashlb_warm_up(m, inp)
    print(f"FlashLB example: loads {EXAMPLE_LOADS}, 8 ranks x 2 slots; previous = experts 0..7 twice "
          f"(rank-major); heaviest rank before {heaviest_rank(inp, inp.previous):.2f}")
    print("optimum 196.67, the FlashLB PR reports 205, our joint finds 196.67\n")
    print(f"{'peer':24} {'heaviest rank':>13}  {'ms':>8}  plan (rank: experts)")
    for peer in peers:
        plan = run_peer(peer, m, inp, repeats)
        if "error" in plan:
            print(f"{peer.id:24} {'ERROR':>13}  {'':>8}  {plan['error']}")
            continue
        p = np.asarray(plan["phy2log"])
        ranks = " ".join(f"{r}:{p[0, 2 * r]},{p[0, 2 * r + 1]}" for r in range(inp.num_ranks))
        ms = sorted(plan["plan_ms"])[len(plan["plan_ms"]) // 2]
        print(f"{peer.id:24} {heaviest_rank(inp, p):13.2f}  {ms:8.2f}  {ranks}")
        if plan["note"]:
            print(f"{'':24} note: {plan['note']}")
