"""results/*.jsonl -> markdown tables (printed)."""
import json, os

def load(ph):
    p = f"results/{ph}.jsonl"
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []

def f6(v):
    return "-" if v is None else f"{v:.6f}"

def cell(c):
    st = {"optimal": "opt", "feasible": "feas", "none": "none"}[c["status"]]
    return f"{f6(c['best'])} / {f6(c['bound'])} {st}"

def beat(r):
    return r["best"] is not None and r["best"] < r["our_objective"] - 1e-6

out = []
v = load("validate")
if v:
    out.append("## Validation on layers joint proved optimal\n")
    out.append("| layer | solver | threads | limit s | status | time s | solver best | solver bound | our objective (proven) | (best - ours) / ours |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in v:
        out.append(f"| {r['name']} | {r['solver']} | {r['threads']} | {r['limit']:.0f} | {r['status']} | {r['time']:.2f} | {f6(r['best'])} | {f6(r['bound'])} | {r['our_objective']:.6f} | {(r['best'] - r['our_objective']) / r['our_objective']:+.1e} |")
    out.append("")
for ph, title in [("open", "The 11 open layers (no cutoff)"), ("proven", "Larger layers joint proved optimal (consistency)"),
                  ("seeded", "Open layers with our objective (+1e-6) as cutoff"),
                  ("long", "Longer runs")]:
    rs = load(ph)
    if not rs:
        continue
    out.append(f"## {title}\n")
    out.append("Cells: best plan's F (recomputed in float from the solver's placement) / solver's bound, status at that time.\n")
    out.append("| layer | ours: objective / bound / gap | solver | threads | at 1 s | at 10 s | at end (limit) | end time s | beats ours |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        cp = r["checkpoints"]
        gap = r["our_objective"] / r["our_bound"] - 1
        out.append(f"| {r['name']} | {r['our_objective']:.6f} / {r['our_bound']:.6f} / {100*gap:.3f}% | {r['solver']} | {r['threads']} | {cell(cp['1'])} | {cell(cp['10'])} | {cell(cp['60']) + ' (60 s); end: ' + f6(r['best']) + ' / ' + f6(r['bound']) + ' ' + r['status'] if r['limit'] > 60 else cell(cp['60']) if r['limit'] == 60 else f6(r['best']) + ' / ' + f6(r['bound']) + ' ' + r['status']} ({r['limit']:.0f} s) | {r['time']:.1f} | {'YES' if beat(r) else 'no'} |")
    out.append("")
print("\n".join(out))
