"""Stand-ins for the few names the peers' policy files import but never compute with.

The policies are loaded by path from the verified sdists (see run_peers.py); their packages are
never imported, so the names they import from the rest of vLLM / vllm-ascend / torch_npu have to
exist. Each stand-in below says why it cannot change a plan: it is either never called on the
path that plans, or it answers exactly what the real object answers in a deployment of the shape.
Nothing here replaces a function that computes a placement.
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass

import torch


@dataclass
class Deployment:
    """What the stand-ins report about the (simulated) cluster: set per shape by the driver."""

    num_ranks: int = 1
    ranks_per_node: int = 1


_DEPLOYMENT = Deployment()


@dataclass(frozen=True)
class _EplbGroup:
    """The one attribute of vllm-ascend's GroupCoordinator that FlashLB reads."""

    world_size: int


def _get_dynamic_eplb_group() -> _EplbGroup:
    """vllm_ascend.distributed.parallel_state.get_dynamic_eplb_group, as a deployment sees it.

    Faithful: vllm-ascend builds the "dynamic_eplb" group from the same rank lists as its MC2 group
    (dp x pcp x tp ranks, i.e. every expert-parallel rank), so its world_size is the shape's
    number of ranks. FlashLB reads only `.world_size`, and only to pick the thresholds of
    `need_update` (stricter below 32 ranks); a fresh FlashLB object forces an update of every
    layer on its first call whatever the thresholds, so this value cannot change a single-shot
    plan. In the rolling protocol (rolling.py) one object plans every step and the thresholds
    do decide which layers it skips: there the value matters, and it is the deployment's.
    """
    return _EplbGroup(world_size=_DEPLOYMENT.num_ranks)


def _npu_device_count() -> int:
    """torch.npu.device_count(): the NPUs of one host, i.e. the ranks per node of the shape.

    Faithful: SwiftBalanceEplb stores it as `num_die_per_host` and uses it only to split ranks
    into nodes when `is_node_redundant=True`; vllm-ascend's EplbWorker calls
    `rebalance_experts(old_placement, load_info)` with the default `is_node_redundant=False`.
    """
    return _DEPLOYMENT.ranks_per_node


def _module(name: str, package: bool = False) -> types.ModuleType:
    """An empty module registered in sys.modules (a package when `package`)."""
    mod = types.ModuleType(name)
    if package:
        mod.__path__ = []  # a namespace with no files: only the stand-ins below resolve
    sys.modules[name] = mod
    return mod


def install() -> None:
    """Registers the stand-ins; refuses to shadow a real vllm / vllm_ascend / torch_npu.

    - `vllm.logger.logger` (imported by vllm-ascend's FlashLB): a plain `logging` logger named
      "vllm". Faithful: vLLM's own `vllm.logger.logger` is a `logging.Logger` too; FlashLB only
      logs through it (once, when the EPLB group is missing), it never reads anything back.
    - `vllm_ascend.distributed.parallel_state.get_dynamic_eplb_group` (FlashLB): see
      `_get_dynamic_eplb_group`.
    - `torch_npu` (imported for its side effect by SwiftBalancer): an empty module. Faithful: the
      policy uses no name from it; on a real host the import registers the NPU device with torch,
      which a CPU run has no use for (the policies compute with numpy on the host).
    - `torch.npu.device_count` (SwiftBalancer's constructor): see `_npu_device_count`.
    """
    for real in ("vllm", "vllm_ascend", "torch_npu"):
        if real in sys.modules and not getattr(sys.modules[real], "__moe_shim__", False):
            raise RuntimeError(f"a real {real} is already imported; the peers run on stand-ins")
    vllm = _module("vllm", package=True)
    logger_mod = _module("vllm.logger")
    logger_mod.logger = logging.getLogger("vllm")
    vllm.logger = logger_mod

    ascend = _module("vllm_ascend", package=True)
    dist = _module("vllm_ascend.distributed", package=True)
    ps = _module("vllm_ascend.distributed.parallel_state")
    ps.get_dynamic_eplb_group = _get_dynamic_eplb_group
    ascend.distributed = dist
    dist.parallel_state = ps

    npu_ext = _module("torch_npu")
    for mod in (vllm, logger_mod, ascend, dist, ps, npu_ext):
        mod.__moe_shim__ = True

    # torch has no `npu` attribute without torch_npu; one that exists is left alone except for
    # device_count, which must answer for the simulated host, not this machine.
    npu = getattr(torch, "npu", None)
    if npu is None:
        npu = types.SimpleNamespace()
        torch.npu = npu  # type: ignore[attr-defined]
    npu.device_count = _npu_device_count


def set_deployment(num_ranks: int, ranks_per_node: int) -> None:
    """Makes the stand-ins answer for a cluster of `num_ranks` ranks, `ranks_per_node` a host."""
    _DEPLOYMENT.num_ranks = num_ranks
    _DEPLOYMENT.ranks_per_node = ranks_per_node
