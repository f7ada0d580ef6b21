#!/usr/bin/env python3
"""Inputs of the heatmap example in docs/eplb.md (stdlib only, deterministic).

Writes load.json (4 windows of a skewed 16-layer, 32-expert load) and before.json (the linear
placement on 8 ranks with 8 redundant slots). after.json is `moectl plan --algorithm greedy`
of that load, and eval-heatmap.svg is `moectl eval --svg` of the two; moectl's tests check that
the SVG is what the current code draws (see moectl/tests/formats.rs). Regenerate with:

    python3 make_inputs.py
    moectl plan --load load.json --ranks 8 --redundant 8 --algorithm greedy --output after.json
    moectl eval --placement after.json --previous before.json --load load.json --svg ../eval-heatmap.svg
"""
import json
import random

random.seed(2026)
LAYERS, EXPERTS, RANKS, REDUNDANT = 16, 32, 8, 8
popularity = [[random.lognormvariate(0, 1.1) for _ in range(EXPERTS)] for _ in range(LAYERS)]
windows = [
    [[round(400 * p * random.lognormvariate(0, 0.25)) for p in row] for row in popularity]
    for _ in range(4)
]
with open("load.json", "w") as f:
    json.dump({"windows": windows}, f)
    f.write("\n")
slots = EXPERTS + REDUNDANT
with open("before.json", "w") as f:
    json.dump(
        {
            "num_logical_experts": EXPERTS,
            "num_ranks": RANKS,
            "phy2log": [[k % EXPERTS for k in range(slots)] for _ in range(LAYERS)],
        },
        f,
    )
    f.write("\n")
