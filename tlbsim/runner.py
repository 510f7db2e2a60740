"""The one entry point from configuration to a Result."""

from __future__ import annotations

import csv
from pathlib import Path

from tlbsim.config import Config, ConfigError, read_text
from tlbsim.model.partition import simulate_records
from tlbsim.model.workload import TraceEvent
from tlbsim.records import exits_frame, shootdowns_frame, summarize, vps_frame
from tlbsim.results import Result


def load_trace(path: str | Path, n_vps: int) -> list[TraceEvent]:
    """Read a CSV trace with columns time_us, vp, address_space, pages
    (pages 0 = the whole address space). Errors name the line."""
    path = Path(path)
    text = read_text(path, "trace", "workload.trace")
    rows = list(csv.DictReader(text.splitlines()))
    need = {"time_us", "vp", "address_space", "pages"}
    if not rows or not need <= set(rows[0]):
        raise ConfigError("workload.trace", f"{path} needs a header with columns {', '.join(sorted(need))}")
    events = []
    for line, row in enumerate(rows, start=2):
        try:
            e = TraceEvent(float(row["time_us"]), int(row["vp"]), int(row["address_space"]), int(row["pages"]))
        except (TypeError, ValueError):
            raise ConfigError("workload.trace", f"{path}:{line}: not a number in {dict(row)}") from None
        if e.time_us < 0 or e.pages < 0 or e.address_space < 0 or not 0 <= e.vp < n_vps:
            raise ConfigError("workload.trace", f"{path}:{line}: negative value or VP outside 0..{n_vps - 1}")
        events.append(e)
    return events


def simulate(config: Config, seed: int = 0) -> Result:
    """Run one simulation of ``config`` with ``seed``; same inputs, same Result."""
    if not isinstance(config, Config):
        raise TypeError("simulate() takes a tlbsim.Config")
    trace = load_trace(config.workload.trace, config.partition.vps) if config.workload.trace else None
    rec = simulate_records(config, seed, trace)
    shootdowns, vps, exits = shootdowns_frame(rec), vps_frame(rec), exits_frame(rec)
    extra = {"events": rec.events, "requests_waiting": rec.requests_waiting, **rec.host}
    summary = summarize(shootdowns, vps, rec.duration_us, extra)
    summary["policy"] = config.workload.policy
    return Result(shootdowns, vps, exits, summary, config=config.to_dict(), seed=seed)
