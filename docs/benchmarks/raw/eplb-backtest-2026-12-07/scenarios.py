"""Tried and not kept: joint planned on drift scenarios of the last window instead of the
window itself (the replay of `moectl backtest --history 1 --stride 1 --steps 24`, driven
through `moectl plan` and `moectl eval`, each step from the placement deployed the step before).

    python3 scenarios.py MOECTL TRACE SIGMA N    # N scenarios, each expert's count times
                                                 # exp(SIGMA * normal), seeded
With SIGMA 0 and N 1 it reproduces backtest's joint row (the window itself).
"""
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

moectl, trace_path, sigma, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
trace = json.load(open(trace_path))
steps, history = 24, 1
# As backtest without --previous: the start is joint's plan of the window before the first
# step kept; the latest 24 steps.
fit = len(trace) - 2 * history
offset = history + (fit - steps)
tmp = Path(tempfile.mkdtemp())


def run(*args):
    r = subprocess.run([moectl, *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return r.stdout


def dump(name, value):
    (tmp / name).write_text(json.dumps(value))
    return str(tmp / name)


shape = ["--ranks", "4", "--redundant", "4"]
run("plan", "--load", dump("start.json", [trace[offset - 1]]), *shape, "--output", str(tmp / "deployed.json"))
rng = random.Random(5)
pars = []
for k in range(steps):
    last = trace[offset + k]
    scenarios = [[[x * math.exp(sigma * rng.gauss(0, 1)) for x in row] for row in last] for _ in range(n)]
    run("plan", "--load", dump("scenarios.json", scenarios), *shape,
        "--previous", str(tmp / "deployed.json"), "--output", str(tmp / "new.json"))
    report = json.loads(run("eval", "--placement", str(tmp / "new.json"),
                            "--load", dump("next.json", [trace[offset + k + 1]]), "--json"))
    pars.append(report["mean_par"])
    (tmp / "new.json").replace(tmp / "deployed.json")
print(f"joint on {n} scenarios of the last window, sigma {sigma}: next PAR {sum(pars) / len(pars):.4f}")
