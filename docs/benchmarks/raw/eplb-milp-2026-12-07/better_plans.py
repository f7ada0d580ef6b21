"""Lists the solver plans better than joint's (results/*.jsonl with a plan), re-evaluated with
models.objective (problem.rs's F), as JSON: layer, solver, threads, phase, F, ours, ranks, counts."""
import json, os, sys
import models
I = {i["name"]: i for i in json.load(open("instances.json"))}
out = []
for ph in ["open", "proven", "seeded", "long"]:
    p = f"results/{ph}.jsonl"
    if not os.path.exists(p):
        continue
    for l in open(p):
        r = json.loads(l)
        if r.get("plan") is None or r["best"] >= r["our_objective"] - 1e-6:
            continue
        P = models.prep(I[r["name"]])
        f = models.objective(P, r["plan"])
        cnt = [sum(e in rk for rk in r["plan"]) for e in range(P["E"])]
        out.append(dict(layer=r["name"], phase=ph, solver=r["solver"], threads=r["threads"], F=f,
                        ours=r["our_objective"], rel=(f - r["our_objective"]) / r["our_objective"],
                        ranks=[sorted(rk) for rk in r["plan"]], counts=cnt))
json.dump(out, sys.stdout, indent=1)
