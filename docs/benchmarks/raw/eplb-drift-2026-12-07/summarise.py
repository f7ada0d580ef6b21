"""Per drift, seed and shape: next-window and expected next-window mean PAR of
multi-episode-lpt, joint and joint with perfect prediction, read from the tables of
`moectl bench --drift D --seed S` in this folder (drift-D-seed-S.md); prints a markdown table."""
import glob
import re

ROWS = {
    "multi-episode-lpt": "lpt",
    "joint": "joint",
    "joint with perfect prediction (expected next window)": "pp",
}
SHAPES = ["DeepSeek-V3 prefill", "DeepSeek-V3 decode", "Qwen3-235B", "Mixtral-like"]


def read(path):
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) > 6 and cells[1] in ROWS:
            # columns: shape, algorithm, history mean, history worst, next mean, next worst, expected next
            out[(cells[0], ROWS[cells[1]])] = (float(cells[4]), float(cells[6]))
    return out


runs = {}
for path in glob.glob("drift-*-seed-*.md"):
    m = re.match(r"drift-([0-9.]+)-seed-(\d+)\.md", path)
    runs[(float(m.group(1)), int(m.group(2)))] = read(path)

print("| drift | shape | lpt next / expected (seed 2026; seed 1) | joint below lpt: next / expected | perfect prediction below lpt: next / expected |")
print("|---|---|---|---|---|")
for drift in sorted({d for d, _ in runs}):
    for shape in SHAPES:
        cells = [[], [], []]
        for seed in (2026, 1):
            t = runs.get((drift, seed))
            if not t:
                continue
            lpt = t[(shape, "lpt")]
            cells[0].append(f"{lpt[0]:.4f} / {lpt[1]:.4f}")
            for k, name in ((1, "joint"), (2, "pp")):
                v = t[(shape, name)]
                cells[k].append(
                    f"{100 * (1 - v[0] / lpt[0]):.2f}% / {100 * (1 - v[1] / lpt[1]):.2f}%"
                )
        print(f"| {drift} | {shape} | " + " | ".join("; ".join(c) for c in cells) + " |")
