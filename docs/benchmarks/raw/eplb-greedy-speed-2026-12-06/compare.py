#!/usr/bin/env python3
"""Times two builds of `examples/greedy_time` side by side: ROUNDS rounds, each running the
before and then the after binary (RUNS plans per shape and algorithm), and prints one table
with, per build, the fastest plan over all rounds and the median of the rounds' medians, and
whether the plan digests agree. Raw outputs go to OUT_DIR.

usage: compare.py BEFORE_BIN AFTER_BIN ROUNDS RUNS OUT_DIR"""
import statistics
import subprocess
import sys

before, after, rounds, runs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
res = {}  # (shape, algo) -> build -> [(min, median, digest)]
for r in range(rounds):
    for name, binary in (("before", before), ("after", after)):
        text = subprocess.run([binary, runs, ""], check=True, capture_output=True, text=True).stdout
        with open(f"{out}/{name}-round{r}.md", "w") as f:
            f.write(text)
        for line in text.splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            res.setdefault((cells[0], cells[1]), {}).setdefault(name, []).append(
                (float(cells[2]), float(cells[3]), cells[5]))
print("| shape | algorithm | before: fastest / median ms | after: fastest / median ms | speed-up (fastest) | plans identical |")
print("|---|---|---|---|---|---|")
for (shape, algo), b in res.items():
    cols = []
    for name in ("before", "after"):
        v = b[name]
        cols.append((min(x[0] for x in v), statistics.median(x[1] for x in v)))
    digests = {x[2] for name in b for x in b[name]}
    print(f"| {shape} | {algo} | {cols[0][0]:.2f} / {cols[0][1]:.2f} | {cols[1][0]:.2f} / {cols[1][1]:.2f} "
          f"| {cols[0][0] / cols[1][0]:.2f}x | {'yes' if len(digests) == 1 else 'NO'} |")
