"""One layer of eplb's planning problem (eplb/src/planner/problem.rs) as a MILP (HiGHS) and as a
CP-SAT model, with a trace of (time, best objective, best bound) for checkpoints.

Problem: E experts, G ranks, S slots per rank (S <= E: no expert twice on a rank), N = G*S.
x[e][k] = v[k][e] * G / sum_e v[k][e]; omega[k] = 0.6^(W-1-k) / sum. Expert e has
c_e in 1..C replicas (C = min(G, N-E+1)), sum c_e = N, each carrying x[e][k]/c_e.
F = sum_k omega[k] max_r sum_{replicas on r} x[e][k]/c_e.

Model: z[e,c] (e has c replicas), y[e,r,c] (a replica of e on r while e has c replicas),
M_k >= rank loads. Valid strengthenings: y <= z; M_k >= 1 (mean rank load);
M_k >= sum_c x[e][k]/c z[e,c] (the rank holding a replica of e); sum_e,c c z = N.
Symmetry breaking (option sym=load): ranks ordered by their load in the newest window
(any placement can be permuted so; ties allowed).
"""
import json, math, sys, time

RECENCY = 0.6


def prep(inst):
    v = inst["windows"]
    W, E = len(v), len(v[0])
    G, N = inst["ranks"], inst["slots"]
    S = N // G
    assert S <= E
    x = [[0.0] * W for _ in range(E)]
    for k in range(W):
        tot = sum(v[k])  # same order as problem.rs (totals in expert order)
        for e in range(E):
            x[e][k] = v[k][e] * (G / tot)
    om = [RECENCY ** (W - 1 - k) for k in range(W)]
    so = sum(om)
    om = [o / so for o in om]
    # integer weights (0.6 = 3/5): 3^(W-1-k) 5^k, proportional to omega
    wint = [3 ** (W - 1 - k) * 5 ** k for k in range(W)]
    C = min(G, N - E + 1)
    return dict(E=E, G=G, S=S, N=N, W=W, x=x, om=om, wint=wint, C=C)


def water_fill_max(loads, slots, max_rep):
    """Smallest possible largest per-replica load (problem.rs water_fill), at least 0."""
    import heapq
    n = len(loads)
    cnt = [1] * n
    heap = [(-l, i) for i, l in enumerate(loads)]
    heapq.heapify(heap)
    extra = slots - n
    while extra > 0 and heap:
        _, i = heapq.heappop(heap)
        if cnt[i] >= max_rep:
            continue
        cnt[i] += 1
        extra -= 1
        heapq.heappush(heap, (-loads[i] / cnt[i], i))
    return max(loads[i] / cnt[i] for i in range(n))


def bounds(P):
    """problem.rs lower_bound's pieces: per window max(1, water-fill), and the shared-count bound."""
    E, W, x, om = P["E"], P["W"], P["x"], P["om"]
    wk = [max(1.0, water_fill_max([x[e][k] for e in range(E)], P["N"], P["C"])) for k in range(W)]
    agg = [sum(om[k] * x[e][k] for k in range(W)) for e in range(E)]
    shared = max(1.0, water_fill_max(agg, P["N"], P["C"]))
    return wk, shared, max(sum(om[k] * wk[k] for k in range(W)), shared)


def objective(P, ranks):
    """F of a placement given as a list of G lists of experts, computed as problem.rs does."""
    cnt = [0] * P["E"]
    for r in ranks:
        for e in r:
            cnt[e] += 1
    assert sorted(len(r) for r in ranks) == [P["S"]] * P["G"], ranks
    assert all(c >= 1 for c in cnt)
    f = 0.0
    for k in range(P["W"]):
        best = -math.inf
        for r in ranks:
            l = 0.0
            for e in r:
                l += P["x"][e][k] if cnt[e] == 1 else P["x"][e][k] / cnt[e]
            best = max(best, l)
        f += P["om"][k] * best
    return f


def build_highs(P, threads, limit, sym, cutoff=None):
    import highspy
    import numpy as np
    E, G, S, N, W, C, x, om = (P[k] for k in "E G S N W C x om".split())
    wk, shared, _ = bounds(P)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", threads)
    h.setOptionValue("time_limit", float(limit))
    h.setOptionValue("mip_rel_gap", 1e-7)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("random_seed", 0)
    if cutoff is not None:
        h.setOptionValue("objective_bound", cutoff)
    zi = lambda e, c: e * C + (c - 1)
    yi = lambda e, r, c: E * C + (e * G + r) * C + (c - 1)
    mi = lambda k: E * C + E * G * C + k
    n = E * C + E * G * C + W
    lb = np.zeros(n); ub = np.ones(n); cost = np.zeros(n)
    for k in range(W):
        lb[mi(k)] = wk[k]; ub[mi(k)] = highspy.kHighsInf; cost[mi(k)] = om[k]
    h.addVars(n, lb, ub)
    h.changeColsCost(n, np.arange(n, dtype=np.int32), cost)
    nint = E * C + E * G * C
    h.changeColsIntegrality(nint, np.arange(nint, dtype=np.int32),
                            np.array([highspy.HighsVarType.kInteger] * nint))
    rows = []  # (lo, hi, idx, val)
    inf = highspy.kHighsInf
    for e in range(E):
        rows.append((1, 1, [zi(e, c) for c in range(1, C + 1)], [1.0] * C))
        for c in range(1, C + 1):
            rows.append((0, 0, [yi(e, r, c) for r in range(G)] + [zi(e, c)], [1.0] * G + [-float(c)]))
            for r in range(G):
                rows.append((-inf, 0, [yi(e, r, c), zi(e, c)], [1.0, -1.0]))
        for r in range(G):
            rows.append((-inf, 1, [yi(e, r, c) for c in range(1, C + 1)], [1.0] * C))
        for k in range(W):
            rows.append((0, inf, [mi(k)] + [zi(e, c) for c in range(1, C + 1)],
                         [1.0] + [-x[e][k] / c for c in range(1, C + 1)]))
    rows.append((N, N, [zi(e, c) for e in range(E) for c in range(1, C + 1)],
                 [float(c) for e in range(E) for c in range(1, C + 1)]))
    for r in range(G):
        rows.append((S, S, [yi(e, r, c) for e in range(E) for c in range(1, C + 1)], [1.0] * (E * C)))
        for k in range(W):
            rows.append((0, inf, [mi(k)] + [yi(e, r, c) for e in range(E) for c in range(1, C + 1)],
                         [1.0] + [-x[e][k] / c for e in range(E) for c in range(1, C + 1)]))
    rows.append((shared, inf, [mi(k) for k in range(W)], list(om)))
    if sym == "load":
        k = W - 1
        for r in range(G - 1):
            idx, val = [], []
            for e in range(E):
                for c in range(1, C + 1):
                    idx += [yi(e, r, c), yi(e, r + 1, c)]
                    val += [x[e][k] / c, -x[e][k] / c]
            rows.append((0, inf, idx, val))
    for lo, hi, idx, val in rows:
        h.addRow(lo, hi, len(idx), np.array(idx, dtype=np.int32), np.array(val))
    def decode(sol):
        ranks = [[] for _ in range(G)]
        for e in range(E):
            for r in range(G):
                for c in range(1, C + 1):
                    if sol[yi(e, r, c)] > 0.5:
                        ranks[r].append(e)
        return ranks
    return h, decode


def solve_highs(P, threads, limit, sym, cutoff=None):
    h, decode = build_highs(P, threads, limit, sym, cutoff)
    trace = []  # (t, best F of a found plan (float, recomputed), dual bound)
    state = dict(best=math.inf, dual=-math.inf)
    t0 = time.perf_counter()

    def on_sol(ev):
        try:
            pl = decode(ev.data_out.mip_solution)
            f = objective(P, pl)
        except AssertionError:
            return
        if f < state["best"]:
            state["best"] = f
            state["plan"] = pl
            trace.append((time.perf_counter() - t0, state["best"], state["dual"]))

    def on_int(ev):
        d = ev.data_out.mip_dual_bound
        if d > state["dual"] + 1e-12:
            state["dual"] = d
            trace.append((time.perf_counter() - t0, state["best"], d))

    h.cbMipImprovingSolution.subscribe(on_sol)
    h.cbMipInterrupt.subscribe(on_int)
    h.run()
    t = time.perf_counter() - t0
    st = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    final_dual = info.mip_dual_bound
    if h.getInfo().primal_solution_status == 2:
        pl = decode(h.getSolution().col_value)
        f = objective(P, pl)
        if f < state["best"]:
            state["best"] = f
            state["plan"] = pl
    state["dual"] = max(state["dual"], final_dual)
    trace.append((t, state["best"], state["dual"]))
    return dict(status=st, time=t, best=state["best"], bound=state["dual"], trace=trace, plan=state.get("plan"),
                nodes=info.mip_node_count, solver_obj=info.objective_function_value)


def solve_cpsat(P, threads, limit, sym, cutoff=None, scale=10 ** 7, log=False, params=""):
    """Replica loads are floor(x/c * scale): any placement's integer objective is at most
    scale * 272 * F (W=4), so the integer bound / (scale * sum wint) is a valid lower bound on F;
    found plans are re-evaluated in float."""
    from ortools.sat.python import cp_model
    E, G, S, N, W, C, x, wint = (P[k] for k in "E G S N W C x wint".split())
    a = [[[0] + [math.floor(x[e][k] / c * scale) for c in range(1, C + 1)]
          for k in range(W)] for e in range(E)]
    m = cp_model.CpModel()
    z = {(e, c): m.NewBoolVar(f"z{e}_{c}") for e in range(E) for c in range(1, C + 1)}
    y = {(e, r, c): m.NewBoolVar(f"y{e}_{r}_{c}") for e in range(E) for r in range(G) for c in range(1, C + 1)}
    hi = int(G * scale) + 1
    wk, shared, _ = bounds(P)
    # valid: every placement's integer rank-load max is >= floor-rounded... use floor(bound*scale) - S
    M = [m.NewIntVar(max(0, math.floor(wk[k] * scale) - S), hi, f"M{k}") for k in range(W)]
    for e in range(E):
        m.AddExactlyOne(z[e, c] for c in range(1, C + 1))
        for c in range(1, C + 1):
            m.Add(sum(y[e, r, c] for r in range(G)) == c * z[e, c])
            for r in range(G):
                m.AddImplication(y[e, r, c], z[e, c])
        for r in range(G):
            m.AddAtMostOne(y[e, r, c] for c in range(1, C + 1))
        for k in range(W):
            m.Add(M[k] >= sum(a[e][k][c] * z[e, c] for c in range(1, C + 1)))
    m.Add(sum(c * z[e, c] for e in range(E) for c in range(1, C + 1)) == N)
    L = {}
    for r in range(G):
        m.Add(sum(y[e, r, c] for e in range(E) for c in range(1, C + 1)) == S)
        for k in range(W):
            L[r, k] = sum(a[e][k][c] * y[e, r, c] for e in range(E) for c in range(1, C + 1))
            m.Add(M[k] >= L[r, k])
    if sym == "load":
        for r in range(G - 1):
            m.Add(L[r, W - 1] >= L[r + 1, W - 1])
    obj = sum(wint[k] * M[k] for k in range(W))
    den = scale * sum(wint)
    m.Add(obj >= max(0, math.floor(shared * den) - S * sum(wint)))
    if cutoff is not None:
        m.Add(obj <= math.floor(cutoff * den))
    m.Minimize(obj)
    s = cp_model.CpSolver()
    s.parameters.num_workers = threads
    s.parameters.max_time_in_seconds = float(limit)
    s.parameters.random_seed = 0
    s.parameters.log_search_progress = log
    if params:
        from google.protobuf import text_format
        text_format.Merge(params, s.parameters)
    trace = []
    state = dict(best=math.inf, dual=-math.inf)
    t0 = time.perf_counter()

    class CB(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self):
            ranks = [[e for e in range(E) for c in range(1, C + 1) if self.Value(y[e, r, c])] for r in range(G)]
            f = objective(P, ranks)
            if f < state["best"]:
                state["best"] = f
                state["plan"] = ranks
            state["dual"] = max(state["dual"], self.BestObjectiveBound() / den)
            trace.append((time.perf_counter() - t0, state["best"], state["dual"]))

    def on_bound(b):
        state["dual"] = max(state["dual"], b / den)
        trace.append((time.perf_counter() - t0, state["best"], state["dual"]))

    s.best_bound_callback = on_bound
    st = s.Solve(m, CB())
    t = time.perf_counter() - t0
    state["dual"] = max(state["dual"], s.BestObjectiveBound() / den)
    trace.append((t, state["best"], state["dual"]))
    return dict(status=s.StatusName(st), time=t, best=state["best"], bound=state["dual"], trace=trace, plan=state.get("plan"),
                branches=s.NumBranches(), solver_obj=s.ObjectiveValue() / den if st in (2, 4) else None,
                rounding_note=f"floor scale {scale}: a plan's F exceeds its integer objective/den by < S/scale = {S/scale:.1e}")


def checkpoints(res, ts=(1, 10, 60)):
    out = {}
    for t in ts:
        best, bound = math.inf, -math.inf
        for (tt, b, d) in res["trace"]:
            if tt <= t + 1e-9:
                best, bound = b, d
        if res["status"] in ("OPTIMAL", "Optimal") and res["time"] <= t:
            st = "optimal"
        elif best < math.inf:
            st = "feasible"
        else:
            st = "none"
        out[str(t)] = dict(best=best if best < math.inf else None, bound=bound if bound > -math.inf else None, status=st)
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("instances")
    ap.add_argument("name")
    ap.add_argument("--solver", choices=["highs", "cpsat"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=float, default=60)
    ap.add_argument("--sym", default="load", choices=["load", "none"])
    ap.add_argument("--seed", action="store_true", help="cutoff at our objective (+1e-6, printed to 6 decimals)")
    ap.add_argument("--scale", type=float, default=1e7)
    ap.add_argument("--log", action="store_true")
    ap.add_argument("--params", default="", help="CP-SAT parameters, text format")
    a = ap.parse_args()
    inst = next(i for i in json.load(open(a.instances)) if i["name"] == a.name)
    P = prep(inst)
    cutoff = inst["our_objective"] + 1e-6 if a.seed else None
    f = solve_highs if a.solver == "highs" else solve_cpsat
    if a.solver == "cpsat":
        res = f(P, a.threads, a.limit, a.sym, cutoff, scale=int(a.scale), log=a.log, params=a.params)
    else:
        res = f(P, a.threads, a.limit, a.sym, cutoff)
    res["checkpoints"] = checkpoints(res)
    res.update(name=a.name, solver=a.solver, threads=a.threads, limit=a.limit, sym=a.sym, seeded=a.seed,
               our_objective=inst["our_objective"], our_bound=inst["our_bound"], our_optimal=inst["our_optimal"])
    print(json.dumps(res))
