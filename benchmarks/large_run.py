"""One large run timed against raw SimPy in the same process (docs/performance.md, "Per-LP run queues").

    .venv/bin/python benchmarks/large_run.py VPS RUNQUEUES     # e.g. 4096 per_lp; peak RSS: /usr/bin/time -v

Prints the wall time and the wall at the reference speed (wall x 0.755 us / raw SimPy timeout, measured
before and after the run): the default config with vps = lps = VPS, 10 simulated ms."""

import sys

from tlbsim.bench import raw_simpy_rate, timed
from tlbsim.config import Config

n, runqueues = int(sys.argv[1]), sys.argv[2]
raw_before = 1e6 / raw_simpy_rate(200_000, 3)
cfg = Config.from_toml("experiments/configs/default.toml", overrides={
    "partition.vps": n, "partition.lps": n, "partition.duration_us": 10_000.0, "host.runqueues": runqueues})
wall, _ = timed(cfg, 0, 1)
raw_after = 1e6 / raw_simpy_rate(200_000, 3)
raw = (raw_before + raw_after) / 2
print(f"{n} VPs, {runqueues}: wall {wall:.1f} s, raw SimPy {raw_before:.2f}/{raw_after:.2f} us a timeout, "
      f"{wall * 0.755 / raw:.1f} s at the reference speed")
