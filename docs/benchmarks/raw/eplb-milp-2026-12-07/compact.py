"""Compact per-layer table of the open phase: best F at 1/10/60 s per solver and threads, best bound."""
import json
rs = [json.loads(l) for l in open("results/open.jsonl")]
names = list(dict.fromkeys(r["name"] for r in rs))
f = lambda v: "-" if v is None else f"{v:.4f}"
print("| layer | ours obj / bound / gap | HiGHS t1 1/10/60 s | HiGHS t2 1/10/60 s | CP-SAT t1 1/10/60 s | CP-SAT t2 1/10/60 s | best solver bound at 60 s | best solver plan vs ours |")
print("|---|---|---|---|---|---|---|---|")
for n in names:
    row = {(r["solver"], r["threads"]): r for r in rs if r["name"] == n}
    any_r = next(iter(row.values()))
    cells = []
    for k in [("highs", 1), ("highs", 2), ("cpsat", 1), ("cpsat", 2)]:
        c = row[k]["checkpoints"]
        cells.append(" / ".join(f(c[t]["best"]) for t in ("1", "10", "60")))
    bound = max(r["checkpoints"]["60"]["bound"] for r in row.values())
    best = min(r["best"] for r in row.values())
    o = any_r["our_objective"]
    print(f"| {n} | {o:.6f} / {any_r['our_bound']:.6f} / {100*(o/any_r['our_bound']-1):.3f}% | " + " | ".join(cells)
          + f" | {bound:.6f} | {best:.6f} ({100*(best/o-1):+.3f}%) |")
