#!/usr/bin/env python3
"""Generation parity: transformers models generate exactly the tokens of transformers alone with
their MoE blocks served by a real 2-rank CPU worker group (moe_client.hf.attach), before, during
and after a remap that the load of those requests drove. Run through scripts/parity.

Per family (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V2, DeepSeek-V3; ``--seed`` varies models
and prompts):

1. the parity model: the reference fixtures' tiny model (fixtures/generate.py: config, weights
   of a useful scale, dense layers included) with its token embeddings scaled up (EMBED_SCALE,
   why below), saved by transformers in bf16, loaded back in float32: transformers' run and the
   attention side both compute in f32, the worker in bf16 (as it serves checkpoints).
2. the prompts: random prompts of 8 tokens, kept only where transformers' own greedy run
   (16 new tokens) leads every step by at least LOGIT_MARGIN and makes every expert choice that
   the group could make otherwise by at least ROUTE_MARGIN; the first 12 kept (of 256, 1024
   where the worker routes: few random prompts have 46 expert choices that clear). Chosen from
   transformers' run alone, before a group exists.
3. ``reference``: model.generate (greedy) on them wholly in transformers (its MoE blocks
   recorded through a pass-through, the same computation).
4. start two moe-worker processes (--traffic api, --weights <dir>, separate forward ports,
   client and control tokens, --remap-layer-delay-ms 150) from a generation-0 placement that
   puts the experts the reference traffic uses most on rank 0 (so the group starts out of
   balance), and wait for /readyz.
5. ``before``: the same generation with the MoE blocks attached to the group; the rows the
   ranks' /v1/load counted must be the rows sent. Mixtral lets the worker route
   (routing="remote"); the others send transformers' routing along (routing="local").
6. the remap: both ranks' /v1/load (the rows of step 5), ``moectl plan --physical-load`` on
   them with the served placement as --previous, posted as the next generation to rank 0's
   POST /v1/remap (async, control token).
7. ``during``: generation again, with the remap posted once a quarter of its requests are
   done; the requests answered between the remap's start and end (status remap progress) are
   counted and must be > 0.
8. ``after``: every rank serves the planned placement; generation again; the measured PAR of
   the served traffic is lower than before.
9. errors: a dense layer (400), a wrong token (401), too many rows (413) on both transports
   raise ExpertError with the worker's status and reason.
10. concurrent clients: 8 threads on the shared stream client and on POST clients of their
   own send random bf16 rows at once; every answer equals the answer to the same rows sent alone.
11. the other routing mode: Mixtral with transformers' routing (its tokens compared as in 5-8);
   the others with the worker routing, their answers checked row by row (below).
12. negative control: a client that sends each MoE block's rows to the *other* MoE layer must
   fail the comparison: its answer rows are off and its logits move by 0.1-1, far past
   LOGIT_MARGIN / 2 (its tokens diverge too in most families and seeds; printed).

What is compared. Each generation through the group (5, 7, 8, and Mixtral's 11):
- the tokens equal transformers' run in every prompt and every step, exactly;
- the logits at every step are within LOGIT_MARGIN / 2 of transformers' (measured 0.8-4e-3):
  then no step that transformers leads by LOGIT_MARGIN can change, so the equal tokens are
  the consequence of a measured bound, not of luck (and the bound holds 2.5-12x over);
- every answer row is within ROW_TOL (3 %, relative L2) of transformers' own MoE block run in
  float32 on the same input row (measured 0.7-1 %; a wrong expert or layer is 10-100 % off).
The tokens before, during and after the remap are also equal to each other bit for bit: a row's
answer does not depend on the placement or on the rows it was pooled with. The worker-routed
runs of the other families (11) only check answers: their prompts were not chosen for the
worker's router, so a row there may be off where its expert choice is a near-tie (routing gap
at most route_tie, counted and printed).

Why the margins and the embedding scale. The worker computes the experts like a bf16 model
(bf16 operands, f32 accumulation) and so answers within ~0.5 % of the f32 block, not bit for bit
like transformers; in a random tiny model some greedy steps and expert choices are decided by
less than that moves them (in bf16 even exact ties occur), and a test that ran on such prompts
would be deciding coin flips (the previous version accepted divergences after them). The
embedding scale makes the MoE block's share of the residual stream small enough that its
rounding moves the logits by ~1e-3 while a wrong answer still moves them by 0.1-0.7 (printed
by the negative control); the margins make every decision of the kept prompts stand 5x clear of
the rounding. The worker's router sees the rows rounded to bf16 (its router logits move by up
to ~8e-3: ROUTE_MARGIN 0.02 for Mixtral), transformers' router on the attention side only the
rows after earlier MoE answers (~1e-4: 0.005, on all MoE layers but the first, whose rows are
the same bits in both runs). Each family prints its smallest margins and the largest logit
deviation seen.
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import generate as fixtures  # noqa: E402  (fixtures/generate.py: the tiny models' definitions)
import moe_client  # noqa: E402
import moe_client.hf  # noqa: E402
from worker_group import WorkerGroup  # noqa: E402

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]
# Families whose generations (before, during and after the remap) let the worker route (the
# others send transformers' own routing along, routing="local"; each gets the other mode too,
# see run_family).
WORKER_ROUTING = {"mixtral"}
REMAP_LAYER_DELAY_MS = 150  # --remap-layer-delay-ms of the workers
# The parity models are the reference fixtures' models with the token embeddings scaled up
# (powers of two: still bf16-exact): the residual stream is then mostly the token's embedding,
# and the worker's bf16 rounding of the MoE output (0.5 % of it) moves logits by ~1e-3 instead
# of ~1e-2, while a wrong answer (100 % of it) still changes tokens (the negative control).
# Per family, as their MoE blocks' outputs differ in size (DeepSeek-V2: x16 routed scaling and
# two shared experts; Mixtral: two small experts).
EMBED_SCALE = {"qwen3_moe": 8.0, "qwen2_moe": 8.0, "mixtral": 4.0, "deepseek_v2": 32.0, "deepseek_v3": 16.0}
# Prompts are kept only where transformers' own run decides every greedy step and every expert
# choice by at least these margins (f32 logits; the routing margin of routing_margin(); a
# quarter of it for DeepSeek-V3, whose choice goes through a sigmoid of slope <= 1/4). The
# group's logits stay within ~1e-3 of transformers' (printed, checked < LOGIT_MARGIN / 2);
# the worker's router sees the rows rounded to bf16 (router logits off by <= ~8e-3), the
# local router the rows after earlier MoE answers (~1e-4).
LOGIT_MARGIN = 0.02
ROUTE_MARGIN = {"worker": 0.02, "local": 0.005}
CANDIDATES = {"worker": 1024, "local": 256}  # prompts tried per family to find --prompts decisive ones
# A row's answer within this (relative L2) of transformers' f32 block is right. The worker's
# bf16 computation is measured at 0.3-1 % (docs/worker.md, Numerics); a wrong expert is 10-100 %.
ROW_TOL = 0.03


# ------------------------------------------------------------------------------------------------
# Generation and comparison
# ------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    tokens: torch.Tensor  # [N, new]
    scores: torch.Tensor  # [N, new, V] (the logits generate chose by)
    seconds: float
    # MoE block inputs and answers of every forward pass, in call order: (decoder layer,
    # [N, S, H] in, [N, S, H] out).
    inputs: list = field(default_factory=list)
    rows: list | None = None  # RowCheck.rows, once computed


def generate(model, prompts: torch.Tensor, new_tokens: int, recorder: Recorder | None = None) -> Generation:
    first = len(recorder.inputs) if recorder is not None else 0
    t = time.monotonic()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    seconds = time.monotonic() - t
    inputs = recorder.inputs[first:] if recorder is not None else []
    return Generation(out.sequences[:, prompts.shape[1]:], torch.stack(out.scores, 1).float(), seconds, inputs)


class Recorder:
    """Stands between attach and a client: records the MoE block inputs and the (start, end,
    layer, rows) of every call (unix seconds); ``layer_map`` redirects layers (the negative
    control)."""

    def __init__(self, client, layer_map: dict[int, int] | None = None):
        self.client, self.layer_map = client, layer_map or {}
        self.calls: list[tuple[float, float, int, int]] = []
        self.inputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.lock = threading.Lock()

    def forward(self, layer, hidden_states, **kw):
        t0 = time.time()
        out = self.client.forward(self.layer_map.get(layer, layer), hidden_states, **kw)
        with self.lock:
            self.calls.append((t0, time.time(), layer, hidden_states.numel() // hidden_states.shape[-1]))
            self.inputs.append((layer, hidden_states.detach().clone(), out.detach().clone()))
        return out


class LocalExperts:
    """transformers' own MoE blocks behind the client interface (exactly the plain model's
    computation): lets a Recorder see the reference run's block inputs."""

    def __init__(self, model):
        self.blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers)}

    def forward(self, layer, hidden_states):
        block = self.blocks[layer]
        return type(block).forward(block, hidden_states)


def routing_margin(model, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """Per row, how far transformers' expert choice of decoder layer ``layer`` is from changing:
    the smallest gap, in the values the family chooses by, between what is chosen and what is
    not (the k-th vs the (k+1)-th expert among the allowed groups, and the last kept vs the
    first dropped group). Logit units for the softmax families (a gap in softmax scores is one
    in logits), sigmoid-plus-bias units for DeepSeek-V3. Computed in f32 from the bf16 rows."""
    cfg, gate = model.config, model.model.layers[layer].mlp.gate
    with torch.no_grad():
        return _routing_margin(cfg, gate, torch.nn.functional.linear(rows.float(), gate.weight.float()))


def _routing_margin(cfg, gate, logits: torch.Tensor) -> torch.Tensor:
    k, e = cfg.num_experts_per_tok, logits.shape[-1]

    def kth_gap(values, kk):
        top = values.topk(kk + 1, dim=-1).values
        return top[:, kk - 1] - top[:, kk]

    mt = cfg.model_type
    if mt in ("qwen3_moe", "qwen2_moe", "mixtral") or (mt == "deepseek_v2" and cfg.topk_method == "greedy"):
        return kth_gap(logits, k)
    if mt == "deepseek_v2":  # group_limited_greedy: group score = the group's best
        choice, group = logits, logits.view(-1, cfg.n_group, e // cfg.n_group).max(-1).values
    elif mt == "deepseek_v3":  # sigmoid + bias, group score = sum of the group's top two
        choice = torch.sigmoid(logits) + gate.e_score_correction_bias.float()
        group = choice.view(-1, cfg.n_group, e // cfg.n_group).topk(2, dim=-1).values.sum(-1)
    else:
        raise KeyError(mt)
    keep = torch.zeros_like(group).scatter_(1, group.topk(cfg.topk_group, dim=-1).indices, 1)
    allowed = choice.masked_fill(keep.repeat_interleave(e // cfg.n_group, dim=1) == 0, -math.inf)
    return torch.minimum(kth_gap(allowed, k), kth_gap(group, cfg.topk_group))


def route_tie(model) -> float:
    """A routing gap at most this is a near-tie that the worker's routing can decide otherwise
    than transformers' f32 router: the worker routes the rows rounded to bf16 (router logits
    off by up to ~8e-3). DeepSeek-V3 chooses by sigmoid(logit) + bias (slope at most 1/4)."""
    return 0.0025 if model.config.model_type == "deepseek_v3" else 0.01


def route_margin(model, routing: str) -> float:
    """The expert-choice margin a kept prompt needs on its rows (ROUTE_MARGIN, in the units of
    routing_margin())."""
    return ROUTE_MARGIN[routing] * (0.25 if model.config.model_type == "deepseek_v3" else 1.0)


def logit_margins(scores: torch.Tensor) -> torch.Tensor:
    """[N, steps, V] -> [N, steps]: the greedy choice's lead over the runner-up (generate masks
    some tokens with -inf: they are never the runner-up)."""
    top = scores.nan_to_num(neginf=-1e30).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def route_margins(model, run: Generation, layers: list[int]) -> torch.Tensor:
    """[N]: per prompt, the smallest routing_margin() over its rows of the given MoE layers in
    every forward pass of ``run`` (inf when no layer is given)."""
    n = run.tokens.shape[0]
    out = torch.full((n,), math.inf)
    for layer, x, _ in run.inputs:
        if layer in layers:
            gap = routing_margin(model, layer, x.reshape(-1, x.shape[-1])).reshape(n, -1)
            out = torch.minimum(out, gap.amin(dim=1))
    return out


def routed_layers(routing: str, moe_layers: list[int]) -> list[int]:
    """The MoE layers whose expert choice can differ between transformers' run and the group's:
    with the worker routing, all; with transformers' router on this side, all but the first
    (its rows come from dense layers only, the same bits in both runs)."""
    return list(moe_layers) if routing == "worker" else list(moe_layers[1:])


def decisive_prompts(model, routing: str, moe_layers: list[int], args, gen: torch.Generator):
    """``args.prompts`` prompts on which transformers' own greedy run (its MoE blocks recorded,
    the same computation) leads every step by at least LOGIT_MARGIN and makes every expert choice
    that the group could make otherwise by at least route_margin(). Chosen from transformers'
    run alone, before any group exists: the group cannot influence which prompts are kept.
    Returns (prompts, candidates tried, candidates decisive)."""
    tried = CANDIDATES[routing]
    candidates = torch.randint(0, model.config.vocab_size, (tried, args.prompt_len), generator=gen)
    rec = Recorder(LocalExperts(model))
    with moe_client.hf.attach(model, rec):
        run = generate(model, candidates, args.new_tokens, rec)
    keep = (logit_margins(run.scores).amin(dim=1) >= LOGIT_MARGIN) & (
        route_margins(model, run, routed_layers(routing, moe_layers)) >= route_margin(model, routing))
    chosen = keep.nonzero().flatten()[:args.prompts]
    if len(chosen) < args.prompts:
        raise SystemExit(f"only {int(keep.sum())} of {tried} candidate prompts are decisive (margins "
                         f"{LOGIT_MARGIN}, {route_margin(model, routing)}): ask for fewer --prompts")
    return candidates[chosen], tried, int(keep.sum())


@dataclass
class Comparison:
    """The group's tokens against transformers' own, which must be equal in every prompt."""

    prompts: int
    identical: int
    tokens: int
    diverged: list  # (prompt, first differing step, transformers' margin at that step)
    deviation: float  # largest |logit difference| at steps where both had fed the same tokens
    margin: float  # transformers' smallest greedy margin over all steps

    @property
    def ok(self) -> bool:
        return self.identical == self.prompts and self.deviation < LOGIT_MARGIN / 2

    def describe(self) -> str:
        s = (f"{self.identical}/{self.prompts} prompts identical ({self.tokens} tokens); logits within "
             f"{self.deviation:.1e} of transformers' (smallest greedy margin {self.margin:.3f})")
        if self.diverged:
            s += "; DIVERGED: " + ", ".join(f"p{p}@{t} (margin {m:.3f})" for p, t, m in self.diverged[:6])
        return s


def compare(reference: Generation, got: Generation) -> Comparison:
    same = got.tokens == reference.tokens
    # Step t's logits are comparable while the tokens before it agree.
    fed_same = torch.cat([torch.ones_like(same[:, :1]), same[:, :-1]], dim=1).int().cumprod(dim=1).bool()
    finite = torch.isfinite(got.scores) & torch.isfinite(reference.scores)
    diff = torch.where(finite, (got.scores - reference.scores).abs(), torch.zeros(()))
    margins = logit_margins(reference.scores)
    diverged = []
    for p in (~same.all(dim=1)).nonzero().flatten().tolist():
        t = int((~same[p]).nonzero()[0])
        diverged.append((p, t, float(margins[p, t])))
    return Comparison(prompts=got.tokens.shape[0], identical=int(same.all(dim=1).sum()), tokens=same.numel(),
                      diverged=diverged, deviation=float(diff.amax(dim=-1)[fed_same].max()),
                      margin=float(margins.min()))


class RowCheck:
    """Every answer of a run, row by row, against transformers' own MoE block run in float32 on
    the same input row (an f32 copy of the block). Within ROW_TOL everywhere, or, where asked
    (a run whose prompts were not chosen for its routing), except rows whose expert choice is a
    near-tie (routing_margin <= route_tie): there the worker may have chosen the other expert (a
    "flip")."""

    def __init__(self, model):
        import copy

        self.model, self.tie = model, route_tie(model)
        self.blocks = {i: copy.deepcopy(d.mlp).float() for i, d in enumerate(model.model.layers)
                       if type(d.mlp).__name__ in moe_client.hf.MOE_BLOCKS.values()}
        self.per_pass = len(self.blocks)

    def rows(self, run: Generation):
        """Per call: (layer, rel. error [N, S], routing gap [N, S]) (computed once per run)."""
        if run.rows is not None:
            return run.rows
        out = []
        with torch.no_grad():
            for layer, x, y in run.inputs:
                block = self.blocks[layer]
                exact = type(block).forward(block, x.float())
                err = (y.float() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)
                gap = routing_margin(self.model, layer, x.reshape(-1, x.shape[-1])).reshape(err.shape)
                out.append((layer, err, gap))
        run.rows = out
        return out

    def summary(self, rows, allow_flips: bool = False) -> tuple[int, int, float, list[str]]:
        """(rows, rows off at a near-tie, worst error of the other rows, descriptions of bad
        rows); with allow_flips the rows off at a near-tie are not bad."""
        n = flips = 0
        worst, bad = 0.0, []
        for i, (layer, err, gap) in enumerate(rows):
            off = err > ROW_TOL
            n += err.numel()
            flips += int((off & (gap <= self.tie)).sum())
            rest = err[gap > self.tie] if allow_flips else err
            worst = max(worst, float(rest.max()) if rest.numel() else 0.0)
            for p, s in (off & (gap > self.tie) if allow_flips else off).nonzero().tolist():
                bad.append(f"layer {layer} pass {i // self.per_pass} prompt {p}: {float(err[p, s]):.1%} off "
                           f"(routing gap {float(gap[p, s]):.4f})")
        return n, flips, worst, bad


# ------------------------------------------------------------------------------------------------
# Load, planning, remap
# ------------------------------------------------------------------------------------------------


def rank_par(slot_counts: list[list[float]], ranks: int) -> list[float]:
    """Per layer: the busiest rank's rows over the mean (rank r holds slots r*S..(r+1)*S)."""
    out = []
    for row in slot_counts:
        s = len(row) // ranks
        loads = [sum(row[r * s:(r + 1) * s]) for r in range(ranks)]
        mean = sum(loads) / ranks
        out.append(max(loads) / mean if mean > 0 else 1.0)
    return out


def group_load(group: WorkerGroup) -> list[list[float]]:
    reports = [group.get(r, "/v1/load") for r in range(group.ranks)]
    total = [list(row) for row in reports[0]["slotCounts"]]
    for rep in reports[1:]:
        for acc, row in zip(total, rep["slotCounts"]):
            for i, v in enumerate(row):
                acc[i] += v
    return total


def logical(slot_counts, placement) -> list[list[float]]:
    out = []
    for row, phy2log in zip(slot_counts, placement["phy2log"]):
        load = [0.0] * placement["numLogicalExperts"]
        for count, expert in zip(row, phy2log):
            load[expert] += count
        out.append(load)
    return out


def slot_counts_under(load: list[list[float]], placement) -> list[list[float]]:
    """Logical load spread over a placement's slots (replicas share evenly)."""
    out = []
    for row, phy2log in zip(load, placement["phy2log"]):
        replicas = [phy2log.count(e) for e in range(len(row))]
        out.append([row[e] / replicas[e] for e in phy2log])
    return out


def plan(moectl: str, workdir: Path, slot_counts, placement, ranks: int) -> dict:
    load_file, prev_file, out_file = workdir / "load.json", workdir / "placement.json", workdir / "planned.json"
    load_file.write_text(json.dumps(slot_counts))
    prev_file.write_text(json.dumps(placement))
    cmd = [moectl, "plan", "--load", str(load_file), "--physical-load", "--previous", str(prev_file),
           "--ranks", str(ranks), "--redundant", "0", "--format", "document", "--output", str(out_file)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"moectl plan failed ({run.returncode}): {run.stderr.strip()}\n  {' '.join(cmd)}")
    planned = json.loads(out_file.read_text())
    planned["generation"] = placement["generation"] + 1
    return planned


def wait_remap(group: WorkerGroup, generation: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        statuses = [group.get(r, "/v1/status") for r in range(group.ranks)]
        remaps = [s.get("remap") or {} for s in statuses]
        if all(m.get("generation") == generation and m.get("state") in ("succeeded", "failed") for m in remaps):
            return statuses
        if time.monotonic() > deadline:
            raise SystemExit(f"remap to generation {generation} did not finish in {timeout:g} s: {remaps}")
        time.sleep(0.02)


class StatusPoller(threading.Thread):
    """Polls every rank's /v1/status while a phase runs (what the group said, when)."""

    def __init__(self, group: WorkerGroup):
        super().__init__(daemon=True)
        self.group, self.samples, self.stop_flag = group, [], threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            for r in range(self.group.ranks):
                try:
                    self.samples.append((time.time(), r, self.group.get(r, "/v1/status")))
                except OSError:
                    pass
            time.sleep(0.002)


# ------------------------------------------------------------------------------------------------
# One family
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    family: str
    checks: list = field(default_factory=list)  # (name, ok, detail)
    timings: dict = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        print(f"  {'PASS' if ok else 'FAIL'} {self.family} {name}: {detail}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def check_run(res: Result, checker: RowCheck, reference: Generation, run: Generation, name: str) -> None:
    """The tokens (equal to transformers' in every prompt, compare) and every answer row
    (within ROW_TOL of transformers' f32 block, RowCheck) of one generation through the group."""
    c = compare(reference, run)
    res.check(name, c.ok, c.describe())
    n, flips, worst, bad = checker.summary(checker.rows(run))
    res.check(f"{name}: answers", not bad,
              f"{n} rows within {worst:.2%} of transformers' f32 block" + ("; OFF: " + "; ".join(bad[:4]) if bad else ""))


def concurrent_clients(group: WorkerGroup, client, moe_layers: list[int], hidden: int,
                       threads: int = 8, calls: int = 12) -> tuple[bool, str]:
    """Threads sending random bf16 rows to random MoE layers at once, half on the shared
    pipelined client, half each on its own POST client: every answer must equal, bit for bit,
    the answer to the same rows sent alone (a row's answer does not depend on what it is pooled
    with, on the rank or on the transport)."""
    gen = torch.Generator().manual_seed(99)
    jobs = [[(moe_layers[int(torch.randint(len(moe_layers), (1,), generator=gen))],
              torch.randn(int(torch.randint(1, 20, (1,), generator=gen)), hidden, generator=gen).to(torch.bfloat16))
             for _ in range(calls)] for _ in range(threads)]
    alone = [[client.forward(layer, x) for layer, x in job] for job in jobs]
    results: list = [None] * threads
    start = threading.Barrier(threads)

    def run(i):
        own = None if i % 2 == 0 else moe_client.ExpertClient(group.forward_urls[i % group.ranks:], token=group.client_token,
                                                                transport="post")
        c = client if own is None else own
        try:
            start.wait()
            results[i] = [c.forward(layer, x) for layer, x in jobs[i]]
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e
        finally:
            if own is not None:
                own.close()

    t0 = time.monotonic()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        return False, f"{len(errors)} threads failed: {errors[0]}"
    same = sum(torch.equal(a, b) for got, want in zip(results, alone) for a, b in zip(got, want))
    return same == threads * calls, (f"{threads} threads x {calls} requests ({threads // 2} sharing the stream "
                                     f"client, {threads - threads // 2} on POST) in {seconds:.2f} s: "
                                     f"{same}/{threads * calls} answers equal to the same rows sent alone")


def errors_reported(group: WorkerGroup, moe_layers: list[int], decoder_layers: int, hidden: int) -> tuple[bool, str]:
    """A dense or missing layer (400), a wrong token (401) and too many rows (413), on both
    transports: each raises ExpertError carrying the worker's status and one-line reason."""
    dense = next((d for d in range(decoder_layers) if d not in moe_layers), decoder_layers)
    x = torch.zeros(2, hidden, dtype=torch.bfloat16)
    cases = [(400, group.client_token, dense, x), (401, "not-the-token", moe_layers[0], x),
             (413, group.client_token, moe_layers[0], torch.zeros(4097, hidden, dtype=torch.bfloat16))]
    seen = []
    for transport in ("stream", "post"):
        for want, token, layer, rows in cases:
            with moe_client.ExpertClient(group.forward_urls, token=token, transport=transport, max_rows=1 << 20) as c:
                try:
                    c.forward(layer, rows)
                    return False, f"{transport}: layer {layer} with {rows.shape[0]} rows was answered, expected {want}"
                except moe_client.ExpertError as e:
                    if e.status != want or not e.reason:
                        return False, f"{transport}: expected {want}, got {e}"
                    seen.append(f"{e.status} {e.reason!r}")
    return True, "; ".join(seen[:3])


def bad_placement(model, reference: Generation, moe_layers: list[int], ranks: int) -> dict:
    """A generation-0 placement that puts the experts the reference traffic uses most on rank 0,
    so that the group starts out of balance and the load-driven remap has something to fix."""
    counts = {}
    with torch.no_grad():
        for layer, x, _ in reference.inputs:
            logits, _, ids = model.model.layers[layer].mlp.gate(x.reshape(-1, x.shape[-1]))
            c = torch.bincount(ids.reshape(-1), minlength=logits.shape[-1])
            counts[layer] = counts.get(layer, 0) + c
    experts = int(counts[moe_layers[0]].numel())
    phy2log = [sorted(range(experts), key=lambda e: -int(counts[d][e])) for d in moe_layers]
    return {"generation": 0, "numLayers": len(moe_layers), "numLogicalExperts": experts,
            "numRanks": ranks, "numNodes": 1, "phy2log": phy2log}


def parity_model(name: str, seed: int, ckpt: Path):
    """The family's parity model: the reference fixtures' tiny model (fixtures/generate.py:
    config, weights of a useful scale, dense layers) built from seed ``case.seed + seed``, its
    token embeddings x EMBED_SCALE[name], saved by transformers (bf16) into ``ckpt`` and loaded back in
    float32 for both transformers' run and the attention side (the worker computes its bf16)."""
    case = next(c for c in fixtures.CASES if c.name == name)
    case = dataclasses.replace(case, seed=case.seed + seed)
    model, _ = fixtures.build_model(case)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBED_SCALE[name])
    fixtures.save_checkpoint(case, model, ckpt)
    del model
    return fixtures.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), case.seed


def run_family(name: str, args, tmp: Path) -> Result:
    res = Result(name)
    started = time.monotonic()
    ckpt = tmp / name / "checkpoint"
    model, seed = parity_model(name, args.seed, ckpt)
    routing = "worker" if name in WORKER_ROUTING else "local"
    attach_routing = "remote" if routing == "worker" else "local"
    checker = RowCheck(model)
    moe_layers = sorted(checker.blocks)
    t = time.monotonic()
    prompts, tried, decisive = decisive_prompts(model, routing, moe_layers, args, torch.Generator().manual_seed(seed))
    res.timings["prompts"] = time.monotonic() - t

    ref_rec = Recorder(LocalExperts(model))
    with moe_client.hf.attach(model, ref_rec):
        reference = generate(model, prompts, args.new_tokens, ref_rec)
    res.timings["reference"] = reference.seconds
    rmargin = float(route_margins(model, reference, routed_layers(routing, moe_layers)).min())
    print(f"  seed {seed}, routing by the {routing if routing == 'worker' else 'attention side (transformers)'}: "
          f"{args.prompts} of {tried} random prompts decisive ({decisive} were); transformers' run: smallest greedy "
          f"margin {float(logit_margins(reference.scores).min()):.3f} (>= {LOGIT_MARGIN}), smallest expert-choice "
          f"margin {rmargin:.4f} (>= {route_margin(model, routing)}, layers {routed_layers(routing, moe_layers)})",
          flush=True)

    # The group starts from a placement that the reference's traffic loads badly, and each
    # remap layer takes at least REMAP_LAYER_DELAY_MS, so the remap has something to fix and
    # is surely in flight while the generation's requests are served.
    workdir = tmp / name / "group"
    workdir.mkdir(parents=True)
    initial = bad_placement(model, reference, moe_layers, 2)
    (workdir / "initial-placement.json").write_text(json.dumps(initial))
    group = WorkerGroup(args.worker_bin, ckpt, workdir, extra_env={
        "MOE_REMAP_LAYER_DELAY_MS": str(REMAP_LAYER_DELAY_MS),
        "MOE_INITIAL_PLACEMENT": "file",
        "MOE_PLACEMENT_FILE": str(workdir / "initial-placement.json"),
    })
    try:
        t = time.monotonic()
        group.start()
        res.timings["group start"] = time.monotonic() - t
        model_info = group.get(0, "/v1/model")
        res.check("model", model_info["moeLayers"] == moe_layers,
                  f"the worker serves MoE layers {model_info['moeLayers']}, transformers has {moe_layers}")
        with moe_client.ExpertClient(group.forward_urls, token=group.client_token) as client:
            rec = Recorder(client)
            attachment = moe_client.hf.attach(model, rec, routing=attach_routing)
            res.check("attach", attachment.layers == moe_layers,
                      f"decoder layers {attachment.layers} attached, the worker serves {moe_layers}")

            # -- before -----------------------------------------------------------------------------
            before = generate(model, prompts, args.new_tokens, rec)
            res.timings["before"] = before.seconds
            check_run(res, checker, reference, before, "before remap")

            # -- plan the remap from the load of those requests --------------------------------------
            placement = group.get(0, "/v1/placement")
            counts = group_load(group)
            rows_sent = sum(r for _, _, _, r in rec.calls)
            rows_counted = sum(sum(row) for row in counts) / model_info["topK"]
            res.check("load counted", abs(rows_counted - rows_sent) < 1e-6,
                      f"{rows_sent} rows sent, the ranks' /v1/load counts {rows_counted:g} rows x top-{model_info['topK']}")
            planned = plan(args.moectl_bin, tmp / name, counts, placement, group.ranks)
            load = logical(counts, placement)
            par_before = rank_par(counts, group.ranks)
            par_planned = rank_par(slot_counts_under(load, planned), group.ranks)
            moved = sum(a != b for la, lb in zip(placement["phy2log"], planned["phy2log"]) for a, b in zip(la, lb))
            res.check("plan", moved > 0 and max(par_planned) < max(par_before),
                      f"moectl moves {moved} slots; PAR per MoE layer {fmt(par_before)} -> planned {fmt(par_planned)}")

            # -- during: the remap posted while a generation is under way -----------------------------
            calls_before = len(rec.calls)
            expected_calls = len(rec.calls)  # one generation's worth
            result: dict = {}

            def during_job():
                result["gen"] = generate(model, prompts, args.new_tokens, rec)

            poller = StatusPoller(group)
            poller.start()
            job = threading.Thread(target=during_job)
            job.start()
            while len(rec.calls) - calls_before < expected_calls // 4 and job.is_alive():
                time.sleep(0.001)
            code, body = group.remap(0, planned)
            posted_at = time.time()
            job.join()
            statuses = wait_remap(group, planned["generation"])
            poller.stop_flag.set()
            poller.join()
            during = result["gen"]
            res.timings["during"] = during.seconds
            res.check("remap accepted", code == 202, f"POST /v1/remap -> {code} {body.get('state', body)}")
            remaps = [s["remap"] for s in statuses]
            res.check("remap succeeded", all(m["state"] == "succeeded" for m in remaps),
                      "; ".join(f"rank {i}: {m['state']}, {m['layersDone']}/{m['layersTotal']} layers, "
                                f"{m['expertsMoved']} experts received" for i, m in enumerate(remaps)))
            start_ms = min(m["startedAtMs"] for m in remaps)
            end_ms = max(m["finishedAtMs"] for m in remaps)
            new_calls = rec.calls[calls_before:]
            inside = [c for c in new_calls if c[0] * 1000 >= start_ms and c[1] * 1000 <= end_ms]
            overlapping = [c for c in new_calls if c[1] * 1000 >= start_ms and c[0] * 1000 <= end_ms]
            after_posted = [c for c in new_calls if c[0] >= posted_at]
            running_seen = sum(1 for _, _, s in poller.samples
                               if (s.get("remap") or {}).get("generation") == planned["generation"]
                               and s["remap"]["state"] == "running")
            paced = end_ms - start_ms >= REMAP_LAYER_DELAY_MS * remaps[0]["layersTotal"]
            res.check("remap in flight during requests", len(inside) > 0 and paced,
                      f"remap ran {end_ms - start_ms} ms; of this generation's {len(new_calls)} requests "
                      f"{len(new_calls) - len(after_posted)} before the POST, {len(overlapping)} overlapping the "
                      f"remap, {len(inside)} answered inside it; status said running {running_seen} times")
            check_run(res, checker, reference, during, "during remap")
            res.check("during == before (bit-exact)", torch.equal(during.tokens, before.tokens),
                      "the group's tokens do not depend on the placement")

            # -- after --------------------------------------------------------------------------------
            served = [group.get(r, "/v1/placement") for r in range(group.ranks)]
            res.check("placement switched",
                      all(p["generation"] == planned["generation"] and p["phy2log"] == planned["phy2log"] for p in served),
                      f"every rank serves generation {planned['generation']}")
            after = generate(model, prompts, args.new_tokens, rec)
            res.timings["after"] = after.seconds
            check_run(res, checker, reference, after, "after remap")
            res.check("after == before (bit-exact)", torch.equal(after.tokens, before.tokens), "")
            # The windows restarted at the layer switches: they hold traffic served under the new
            # placement only (part of "during", all of "after": the same prompts).
            par_after = rank_par(group_load(group), group.ranks)
            res.check("PAR fell", max(par_after) < max(par_before),
                      f"measured PAR per MoE layer {fmt(par_before)} before -> {fmt(par_after)} after")
            attachment.detach()

            # -- errors come back as ExpertError with the worker's status and reason ------------------
            ok, detail = errors_reported(group, moe_layers, len(model.model.layers), model.config.hidden_size)
            res.check("errors", ok, detail)

            # -- many requests in flight: threads on both transports, rows pooled together -----------
            ok, detail = concurrent_clients(group, client, moe_layers, model.config.hidden_size)
            res.check("concurrent clients", ok, detail)

            # -- the other routing mode ----------------------------------------------------------------
            # The prompts were chosen for the family's routing mode; worker routing's choice is
            # the stricter one, so a worker-routed family's prompts are decisive for local
            # routing too and its tokens must match again. The other families' prompts were
            # not chosen for the worker's router (which sees the rows rounded to bf16): there
            # the answers are checked row by row, a flip allowed only at a near-tie.
            other = "local" if attach_routing == "remote" else "remote"
            other_rec = Recorder(client)
            with moe_client.hf.attach(model, other_rec, routing=other):
                run = generate(model, prompts, args.new_tokens, other_rec)
            if other == "local":
                check_run(res, checker, reference, run, "routing by the attention side")
            else:
                n, flips, worst, bad = checker.summary(checker.rows(run), allow_flips=True)
                res.check("routing by the worker: answers", not bad,
                          f"{n} rows: {flips} at routing near-ties decided otherwise, the others within {worst:.2%} "
                          f"of transformers' f32 block" + ("; OFF: " + "; ".join(bad[:4]) if bad else ""))

            # -- negative control: each MoE block's rows sent to the other MoE layer -----------------
            swap = {d: moe_layers[(i + 1) % len(moe_layers)] for i, d in enumerate(moe_layers)}
            wrong_rec = Recorder(client, swap)
            with moe_client.hf.attach(model, wrong_rec, routing=attach_routing):
                wrong = generate(model, prompts, args.new_tokens, wrong_rec)
            c = compare(reference, wrong)
            bad = checker.summary(checker.rows(wrong))[3]
            res.check("negative control (layers swapped) is caught", bool(bad) and not c.ok,
                      f"{len(bad)} answer rows off; tokens: {c.describe()}")
    except Exception as e:  # noqa: BLE001 - reported as this family's failure, with the logs
        res.check("ran", False, f"{type(e).__name__}: {e}\n" + "\n".join(group.tail(r) for r in range(group.ranks)))
    finally:
        codes = group.stop()
    res.check("group stopped cleanly", codes == [0] * group.ranks, f"exit codes {codes}")
    res.timings["total"] = time.monotonic() - started
    return res


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--worker-bin", required=True)
    ap.add_argument("--moectl-bin", required=True)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="added to each family's model and prompt seed")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (checkpoints, logs)")
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"parity: unknown --families {','.join(unknown)} (choose from {','.join(FAMILIES)})", file=sys.stderr)
        return 2
    for flag, path in (("--worker-bin", args.worker_bin), ("--moectl-bin", args.moectl_bin)):
        if not os.access(path, os.X_OK):
            print(f"parity: {flag} {path} is not an executable (build it: cargo build -p moe-worker -p moectl)",
                  file=sys.stderr)
            return 2
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the workers need the cores; one thread is also deterministic
    tmp = Path(tempfile.mkdtemp(prefix="moe-parity-"))
    results = []
    try:
        for family in families:
            print(f"==> {family}", flush=True)
            results.append(run_family(family, args, tmp))
    finally:
        if args.keep:
            print(f"parity: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\nfamily       | result | checks | reference s | before s | during s | after s | total s")
    print("-------------|--------|--------|-------------|----------|----------|---------|--------")
    for r in results:
        t = r.timings
        cells = [f"{t.get(k, math.nan):.2f}" for k in ("reference", "before", "during", "after", "total")]
        passed = sum(ok for _, ok, _ in r.checks)
        print(f"{r.family:<12} | {'PASS' if r.ok else 'FAIL':<6} | {passed:>2}/{len(r.checks):<3} | "
              + " | ".join(f"{c:>8}" for c in cells))
    ok = all(r.ok for r in results)
    print(f"\nparity: {'PASS' if ok else 'FAIL'} ({len(results)} families)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
