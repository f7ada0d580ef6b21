"""The summary of run.sh's outputs (each NAME.txt: backtest's table and findings): joint and
multi-episode-lpt at H = 1 and 2 per layout.

    python3 summarize.py FOLDER > summary.md
"""
import glob
import os
import re
import sys

out = sys.argv[1]
print("| experts | ranks x slots | step sd | lpt H=1 | joint H=1 | joint vs lpt H=1 | lpt H=2 | joint H=2 | joint vs lpt H=2 | best row |")
print("|---|---|---|---|---|---|---|---|---|---|")
rows = []
for path in glob.glob(os.path.join(out, "e*-sd*.txt")):
    m = re.match(r"e(\d+)-g(\d+)-r(\d+)-sd([\d.]+)\.txt", os.path.basename(path))
    e, g, r, sd = int(m[1]), int(m[2]), int(m[3]), m[4]
    text = open(path).read()
    table = text.split("\n\n")[0]
    par = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("joint", "multi-episode-lpt"):
            par[cells[0]] = [float(re.sub(r"[*]", "", c).split()[0]) for c in cells[1:]]
    best = re.search(r"- Lowest next-window PAR: (.*?): ([\d.]+),", text)
    rows.append((e, g, r, sd, par, best[1] + " " + best[2]))
for e, g, r, sd, par, best in sorted(rows):
    lpt, joint = par["multi-episode-lpt"], par["joint"]
    cells = [f"{e}", f"{g} x {(e + r) // g}", sd]
    for i in range(2):
        cells += [f"{lpt[i]:.4f}", f"{joint[i]:.4f}", f"{100 * (joint[i] / lpt[i] - 1):+.2f}%"]
    cells.append(best)
    print("| " + " | ".join(cells) + " |")
