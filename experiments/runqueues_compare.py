"""Shared run queue against per-LP run queues (host.runqueues), on the studies whose answers the host
scheduler decides: every validation case and the headline overcommit sweep, each run both ways with
its own seeds and replications. Prints, per check and per (policy, overcommit), the two figures side
by side; docs/model.md "Host scheduling" quotes the result.

    .venv/bin/python experiments/runqueues_compare.py [--out DIR] [--jobs N] [--cases a,b] [--no-headline]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd

from tlbsim.sweep import SweepSpec, run_sweep
from tlbsim.validate import evaluate, load_cases

HERE = Path(__file__).resolve().parent
MODES = ("shared", "per_lp")


def with_runqueues(spec: SweepSpec, mode: str) -> SweepSpec:
    points = tuple(dataclasses.replace(p, overrides={**p.overrides, "host.runqueues": mode}) for p in spec.points)
    return dataclasses.replace(spec, name=f"{spec.name}-{mode}", points=points)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/runqueues")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--cases", default="")
    ap.add_argument("--no-headline", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    rows = []
    for case in load_cases(args.cases.split(",") if args.cases else None):
        for mode in MODES:
            spec = with_runqueues(case.spec(False), mode)
            o = run_sweep(spec, out / f"{case.name}-{mode}", jobs=args.jobs, resume=True, progress=False)
            for r in evaluate(case, o.points):
                model = (r["detail"] if r["kind"] == "increasing" else
                         f"{r['simulated']:.3g} [{r['low']:.3g}, {r['high']:.3g}]")
                rows.append({"case": case.name, "check": r["check"][:48], "mode": mode, "model": model,
                             "published": r["published"], "verdict": r["verdict"]})
    if rows:
        t = pd.DataFrame(rows).pivot(index=["case", "check"], columns="mode", values=["model", "verdict"])
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(t.to_string())
    if not args.no_headline:
        base = SweepSpec.from_toml(HERE / "overcommit.toml")
        tables = {}
        for mode in MODES:
            o = run_sweep(with_runqueues(base, mode), out / f"overcommit-{mode}", jobs=args.jobs, resume=True,
                          progress=False)
            g = o.points.groupby(["workload.policy", "host.guests"])
            tables[mode] = g[["latency_p99_us", "response_p99_us", "guest_work_fraction"]].mean()
        both = pd.concat(tables, axis=1)
        with pd.option_context("display.width", 200, "display.float_format", "{:,.3f}".format):
            print(both.to_string())
        for mode in MODES:  # which policy wins each overcommit level, by p99 response and by p99 latency
            for metric in ("response_p99_us", "latency_p99_us"):
                best = tables[mode][metric].unstack("workload.policy").idxmin(axis=1)
                print(mode, metric, "lowest:", dict(best))
    print(f"wall {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
