#!/usr/bin/env python3
"""`moectl plan` end to end against its own planning time, as a user runs it.

Usage: measure.py RUNS BINARY [BINARY ...]   (release builds of moectl; the first may predate
--timings, then its planning time is not reported)

Writes a synthetic DeepSeek-V3 prefill history (58 MoE layers, 256 experts, 8 windows of
integer token counts, fixed seed) to a temporary folder, then runs every binary RUNS times,
interleaved, with `plan --algorithm greedy --ranks 32 --redundant 32 --nodes 4`. Reports the
wall time of the whole process (from here: start, read, plan, write, exit), what `--timings`
reports in the same runs (the planning phase, and the total from reading to writing, which
leaves out the process's start and exit), and the ratios to the planning, as a markdown table;
then every phase `--timings` names (they differ between versions), min and median.
"""
import os
import random
import subprocess
import sys
import tempfile
import time

LAYERS, EXPERTS, WINDOWS = 58, 256, 8


def history(seed=2026):
    rng = random.Random(seed)
    windows = []
    popularity = [[rng.lognormvariate(0, 1) for _ in range(EXPERTS)] for _ in range(LAYERS)]
    for _ in range(WINDOWS):
        layers = []
        for row in popularity:
            for e in range(EXPERTS):
                row[e] *= rng.lognormvariate(0, 0.12)
            total = sum(row)
            layers.append([int(16384 * 8 * x / total) for x in row])
        windows.append(layers)
    return windows


def main():
    runs, binaries = int(sys.argv[1]), sys.argv[2:]
    folder = tempfile.mkdtemp()
    load = os.path.join(folder, "load.json")
    with open(load, "w") as f:
        import json

        json.dump({"windows": history()}, f)
    args = ["plan", "--load", load, "--ranks", "32", "--redundant", "32", "--nodes", "4",
            "--algorithm", "greedy", "--output", os.path.join(folder, "out.json")]
    timings = {b: "--timings" in subprocess.run([b, "plan", "--help"], capture_output=True,
                                                 text=True).stdout for b in binaries}
    wall = {b: [] for b in binaries}
    plan = {b: [] for b in binaries}
    inside = {b: [] for b in binaries}
    phases_seen = {b: {} for b in binaries}
    for _ in range(runs):
        for b in binaries:
            extra = ["--timings"] if timings[b] else []
            t0 = time.perf_counter()
            done = subprocess.run([b] + args + extra, capture_output=True, text=True, check=True)
            wall[b].append((time.perf_counter() - t0) * 1e3)
            for line in done.stderr.splitlines():
                if line.startswith("timings: "):
                    phases = dict(p.rsplit(" ", 2)[0:2] for p in line[9:].split(", "))
                    plan[b].append(float(phases["plan"]))
                    inside[b].append(float(phases["total"]))
                    for name, ms in phases.items():
                        phases_seen[b].setdefault(name, []).append(float(ms))
            phases_seen[b].setdefault("whole process", []).append(wall[b][-1])
    start = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([binaries[-1], "--version"], capture_output=True, check=True)
        start.append((time.perf_counter() - t0) * 1e3)
    size = os.path.getsize(load) // 1024
    print(f"history {size} KB; {runs} runs each, interleaved; load average "
          f"{os.getloadavg()[0]:.2f}; `moectl --version`: {min(start):.2f} ms min")
    print()
    print("| binary | wall min (ms) | wall median | planning min (ms) | planning median | "
          "read to write min (ms) | wall / planning (min) | (median) | read to write / planning (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in binaries:
        w = sorted(wall[b])
        row = [os.path.basename(b), f"{w[0]:.2f}", f"{w[len(w) // 2]:.2f}"]
        if plan[b]:
            p = sorted(plan[b])
            i = sorted(inside[b])
            row += [f"{p[0]:.2f}", f"{p[len(p) // 2]:.2f}", f"{i[0]:.2f}", f"{w[0] / p[0]:.2f}x",
                    f"{w[len(w) // 2] / p[len(p) // 2]:.2f}x", f"{i[0] / p[0]:.2f}x"]
        else:
            row += ["-"] * 6
        print("| " + " | ".join(row) + " |")
    print()
    print("Every phase `--timings` reports, min / median (ms):")
    print()
    for b in binaries:
        cells = [f"{name} {min(v):.2f} / {sorted(v)[len(v) // 2]:.2f}"
                 for name, v in phases_seen[b].items()]
        print(f"- {os.path.basename(b)}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
