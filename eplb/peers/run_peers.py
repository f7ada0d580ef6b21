#!/usr/bin/env python3
"""Runs the peers' own EPLB policies on the inputs `moectl bench --export DIR` wrote.

For each DIR/<slug>/inputs.json, every peer's real entry point plans on the shape's history and
placement in use, and DIR/<slug>/peers/<id>.json receives its phy2log, its planning times and
notes (or the error it raised); `moectl bench --peers DIR` then scores those plans beside ours.

    run_peers.py DIR --src SRC [--repeats N] [--only ID,ID] [--mode auto|single|rolling]
    run_peers.py --example flashlb --src SRC       the FlashLB issue's one-layer example

A DIR/<slug>/rolling.json (moectl bench --export DIR --rolling K) is run by rolling.py instead:
K steps, each peer replanning from what it deployed at the step before, with the policy objects
living as long as their engines keep them; DIR/<slug>/rolling/<id>.json receives each step's
deployed placement and time. --mode picks the files (default: whichever each shape has).

SRC is the folder the sdists' policy files were extracted into (scripts/bench-peers makes it:
${MOE_PEERS_CACHE:-~/.cache/moe-operator/peers}/src). The files are loaded by path under synthetic
package names, so the peers' package __init__s (which pull in the rest of vLLM, SGLang or
vllm-ascend) never run; the few names they import but never compute with are stand-ins
(shims.py). numba, llvmlite and scipy (FlashLB's imports) come from PYTHONPATH.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rolling  # noqa: E402  (beside this file, as policies.py)
from policies import load_modules, run_example, run_export, select  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", type=Path, help="an export of moectl bench --export")
    ap.add_argument("--src", type=Path, required=True, help="the extracted policy files (scripts/bench-peers)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each peer (the last plan is kept)")
    ap.add_argument("--only", help="comma-separated peer ids (default: all)")
    ap.add_argument("--example", choices=["flashlb"], help="run the FlashLB issue's example instead")
    ap.add_argument(
        "--mode", choices=["auto", "single", "rolling"], default="auto",
        help="which files of DIR: inputs.json (single), rolling.json (rolling; rolling.py), or "
        "whichever each shape has (auto, the default)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if (args.dir is None) == (args.example is None):
        ap.error("give either DIR or --example flashlb")
    peers = select(args.only, extra=rolling.EXTRA_IDS)
    if args.example:
        m = load_modules(args.src)
        run_example(m, peers, args.repeats)
        return 0
    single = args.mode != "rolling" and any(args.dir.glob("*/inputs.json"))
    rolls = args.mode != "single" and any(args.dir.glob("*/rolling.json"))
    if not (single or rolls):
        want = {"auto": "*/inputs.json or */rolling.json", "single": "*/inputs.json", "rolling": "*/rolling.json"}
        raise SystemExit(
            f"run_peers.py: no {want[args.mode]} under {args.dir} (make it with moectl bench --export"
            f"{' --rolling K' if args.mode == 'rolling' else ''})"
        )
    m = load_modules(args.src)
    failures = run_export(args.dir, m, peers, args.repeats) if single else 0
    if rolls:
        failures += rolling.run_rolling_export(args.dir, m, rolling.select(args.only))
    if failures:
        print(f"run_peers.py: {failures} peer run(s) failed (written as errors)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
