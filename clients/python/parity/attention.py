#!/usr/bin/env python3
"""An attention instance beside an expert tier that it did not start (the e2e's expert Service or
rank endpoints): generates through the tier round after round and checks every round against
transformers alone, with parity.py's models, prompts and comparison.

  attention.py checkpoint --family F [--seed S] DIR
      writes the family's parity model (parity.parity_model: safetensors + config.json, bf16)
      into DIR, for a worker group to load (--weights / a volume).
  attention.py generate --checkpoint DIR --endpoints URL[,URL...] [--token-file FILE]
                        [--seed S] [--rounds N] [--interval SECONDS]
      loads DIR in float32, chooses the decisive prompts from transformers' run alone
      (parity.decisive_prompts), generates them wholly in transformers once, then N times with
      the MoE blocks served by the tier (Mixtral: the worker routes; others: routing="local").
      One JSON line per round on stdout: round, ok, identical, prompts, tokens, deviation (largest
      logit difference), worst (largest answer-row error against transformers' f32 block), rows,
      seconds, startedAt/finishedAt (unix seconds). Exit 0 when every round matched in full, 1
      when one did not, 2 on bad usage.

The family is read from the checkpoint's config.json (model_type); --seed must be the one the
checkpoint was written with only in that it picks the prompts' candidates (any seed is valid).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parity as P  # noqa: E402  (sets up the import paths of fixtures and moe_client)
import torch  # noqa: E402


def write_checkpoint(args) -> int:
    if args.family not in P.FAMILIES:
        print(f"attention.py: unknown --family {args.family} (choose from {','.join(P.FAMILIES)})", file=sys.stderr)
        return 2
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        print(f"attention.py: {out} is not empty (give a new or empty directory)", file=sys.stderr)
        return 2
    P.parity_model(args.family, args.seed, out)
    print(json.dumps({"checkpoint": str(out), "family": args.family, "seed": args.seed}))
    return 0


def generate_rounds(args) -> int:
    ckpt = Path(args.checkpoint)
    try:
        family = json.loads((ckpt / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError) as e:
        print(f"attention.py: --checkpoint {ckpt}: no readable config.json with model_type ({e})", file=sys.stderr)
        return 2
    if family not in P.FAMILIES:
        print(f"attention.py: --checkpoint {ckpt} is a {family!r} model; parity covers {','.join(P.FAMILIES)}",
              file=sys.stderr)
        return 2
    endpoints = [e for e in args.endpoints.split(",") if e]
    if not endpoints:
        print("attention.py: --endpoints needs at least one URL", file=sys.stderr)
        return 2
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            print(f"attention.py: --token-file {args.token_file}: {e}", file=sys.stderr)
            return 2

    torch.set_num_threads(1)
    model = P.fixtures.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    routing = "worker" if family in P.WORKER_ROUTING else "local"
    checker = P.RowCheck(model)
    moe_layers = sorted(checker.blocks)
    prompts, _, _ = P.decisive_prompts(model, routing, moe_layers, args, torch.Generator().manual_seed(args.seed))
    ref_rec = P.Recorder(P.LocalExperts(model))
    with P.moe_client.hf.attach(model, ref_rec):
        reference = P.generate(model, prompts, args.new_tokens, ref_rec)

    all_ok = True
    with P.moe_client.ExpertClient(endpoints, token=token) as client:
        for i in range(args.rounds):
            rec = P.Recorder(client)
            started = time.time()
            try:
                with P.moe_client.hf.attach(model, rec, routing="remote" if routing == "worker" else "local"):
                    run = P.generate(model, prompts, args.new_tokens, rec)
            except (P.moe_client.ExpertError, OSError) as e:
                print(f"attention.py: round {i}: {e}", file=sys.stderr)
                return 1
            c = P.compare(reference, run)
            n, _, worst, bad = checker.summary(checker.rows(run))
            ok = c.ok and not bad
            all_ok &= ok
            print(json.dumps({"round": i, "ok": ok, "identical": c.identical, "prompts": c.prompts,
                              "tokens": c.tokens, "deviation": c.deviation, "worst": worst, "rows": n,
                              "seconds": run.seconds, "startedAt": started, "finishedAt": time.time()}), flush=True)
            if not ok:
                print(f"attention.py: round {i}: {c.describe()}" + (f"; {bad[0]}" if bad else ""), file=sys.stderr)
            if i + 1 < args.rounds:
                time.sleep(args.interval)
    return 0 if all_ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("checkpoint", help="write a family's parity model")
    w.add_argument("dir")
    w.add_argument("--family", required=True)
    w.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("generate", help="generate through a running tier, round after round")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--endpoints", required=True, help="comma-separated forward-API URLs (ranks or a Service)")
    g.add_argument("--token-file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rounds", type=int, default=1)
    g.add_argument("--interval", type=float, default=0.0, help="seconds between rounds")
    g.add_argument("--prompts", type=int, default=12)
    g.add_argument("--prompt-len", type=int, default=8)
    g.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    if args.command == "checkpoint":
        return write_checkpoint(args)
    if args.rounds < 1 or args.interval < 0:
        print("attention.py: --rounds must be >= 1 and --interval >= 0", file=sys.stderr)
        return 2
    return generate_rounds(args)


if __name__ == "__main__":
    sys.exit(main())
