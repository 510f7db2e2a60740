"""The one entry point from configuration to a Result."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tlbsim.config import Config, ConfigError, read_text
from tlbsim.model.partition import simulate_records
from tlbsim.model.workload import TraceEvent
from tlbsim.records import (
    SHOOTDOWN_COLUMNS,
    SUMMARY_COLUMNS,
    exits_frame,
    shootdowns_frame,
    summarize,
    vf_frame,
    vf_summary,
    vps_frame,
)
from tlbsim.results import Result, ShootdownSpill


def load_trace(path: str | Path, n_vps: int) -> list[TraceEvent]:
    """Read a CSV trace with columns time_us, vp, address_space, pages
    (pages 0 = the whole address space). Errors name the line."""
    path = Path(path)
    text = read_text(path, "trace", "workload.trace").removeprefix("\ufeff")  # a BOM is not a column name
    rows = list(csv.DictReader(text.splitlines()))
    need = {"time_us", "vp", "address_space", "pages"}
    if not rows or not need <= set(rows[0]):
        raise ConfigError("workload.trace", f"{path} needs a header with columns {', '.join(sorted(need))}")
    events = []
    for line, row in enumerate(rows, start=2):
        try:
            e = TraceEvent(float(row["time_us"]), int(row["vp"]), int(row["address_space"]), int(row["pages"]))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError("workload.trace", f"{path}:{line}: not a number in {dict(row)}") from None
        if not math.isfinite(e.time_us) or e.time_us < 0:
            raise ConfigError("workload.trace", f"{path}:{line}: time_us must be a finite number >= 0")
        if e.pages < 0 or e.address_space < 0 or not 0 <= e.vp < n_vps:
            raise ConfigError("workload.trace", f"{path}:{line}: negative value or VP outside 0..{n_vps - 1}")
        if e.pages > MAX_TRACE_PAGES or e.address_space > n_vps:
            raise ConfigError("workload.trace", f"{path}:{line}: pages at most {MAX_TRACE_PAGES:,} and "
                              f"address_space at most {n_vps} (an address-space index of the sharing pattern)")
        events.append(e)
    return events


MAX_TRACE_PAGES = 4096 * 4096  # the most a flush can name (GVA ranges of 4,096 pages, one page of them)


def check_trace_address_spaces(events: list[TraceEvent], config: Config) -> None:
    """Each trace row names an address space its VP runs (a flush of an address space nobody runs
    would be a 0-target, 0-latency row: silent nonsense)."""
    from tlbsim.model.partition import address_space_index

    for i, e in enumerate(events):
        own = address_space_index(config, e.vp)
        if e.address_space != own:
            raise ConfigError("workload.trace", f"row {i + 2}: VP {e.vp} runs address space {own} under "
                              f"workload.sharing = {config.workload.sharing!r}, not {e.address_space}")


def simulate(config: Config, seed: int = 0, progress=None, timeline=None,
             spill_dir: str | Path | None = None, spill_rows: int = 1 << 16) -> Result:
    """Run one simulation of ``config`` with ``seed``; same inputs, same Result.
    ``progress(fraction)`` is called as simulated time advances (optional); ``timeline``
    (model.timeline.Timeline) collects a per-VP timeline of a window (optional; the records are the
    same with or without it). ``spill_dir``: write the shootdown table there as the run goes
    instead of holding it (Result.shootdowns_file; ``save`` to that directory moves it into place),
    for runs of millions of shootdowns, ``spill_rows`` rows at a time; the table and the summary
    are the same."""
    if not isinstance(config, Config):
        raise TypeError("simulate() takes a tlbsim.Config")
    trace = load_trace(config.workload.trace, config.partition.vps) if config.workload.trace else None
    if trace:
        check_trace_address_spaces(trace, config)
        threads = config.workload.threads or config.partition.vps
        idle = [e.vp for e in trace if e.vp >= threads]
        if idle:
            raise ConfigError("workload.trace", f"a row names VP {idle[0]}, which has no thread "
                              f"(workload.threads = {threads}: VPs 0..{threads - 1} run one)")
    vf_trace = load_vf_trace(config.vf.trace, config.vf.count, config.vf.blocks) \
        if config.vf.count and config.vf.trace else None
    spill = ShootdownSpill(spill_dir, spill_rows) if spill_dir is not None else None
    try:
        rec = simulate_records(config, seed, trace, vf_trace, progress, timeline, spill)
        shootdowns_file = None
        if spill is not None:  # the table is on disk; read back only what the summary needs
            shootdowns_file, shootdowns = spill.finish(rec.shootdowns, SHOOTDOWN_COLUMNS, SUMMARY_COLUMNS)
        else:
            shootdowns = shootdowns_frame(rec)
    except BaseException:
        if spill is not None:
            spill.discard()
        raise
    vps, exits, vf = vps_frame(rec), exits_frame(rec), vf_frame(rec)
    extra = {"events": rec.events, "requests_waiting": rec.requests_waiting, **rec.host}
    if config.vf.count:
        extra.update(vf_summary(vf, vps, rec.vf_stats))
    summary = _summary(shootdowns, vps, exits, config, rec.duration_us, extra)
    summary["policy"] = config.workload.policy
    partitions = partitions_frame(shootdowns, vps, exits, config, rec.duration_us,
                                  summary.drop(list(extra)) if config.host.guests == 1 else None)
    return Result(shootdowns, vps, exits, summary, config=config.to_dict(), seed=seed, vf=vf,
                  shootdowns_file=shootdowns_file, partitions=partitions)


def _summary(shootdowns, vps, exits, config: Config, duration_us: float, extra: dict):
    """summarize() with what it needs from the exits table and the configuration."""
    canceled_exit_us = float(exits.loc[exits["reason"] == "CANCELED", "time_us"].sum()) if len(exits) else 0.0
    extra = {**extra,
             # costs a shootdown causes that the VP time columns do not name apart
             "canceled_exit_us": canceled_exit_us,
             "shootdown_refill_us": float((vps["refill_entries"] + vps["collateral_entries"]).sum()
                                          * config.costs.refill_us)}
    # the guest's system (kernel-mode) time as a benchmark's `time` reports it: the kernel share of guest
    # work (guest.kernel_fraction) plus what shootdowns run in kernel mode on the guest's VPs: spinning for
    # acks and its pause-loop exits, IPI sends, flush handlers and VF DPCs with the Canceled exits or the
    # hypervisor's interruptions before them, the PV sched yield's hypercalls, flush hypercalls. Time off an
    # LP (descheduled, halted, suspended) is not CPU time and is not counted.
    extra["guest_system_us"] = float(
        config.guest.kernel_fraction * vps["guest_us"].sum() + vps["spinning_us"].sum() + vps["spin_exit_us"].sum()
        + vps["ipi_send_us"].sum() + vps["flush_us"].sum() + vps["vf_us"].sum() + canceled_exit_us
        + vps["ipi_interrupt_us"].sum() + vps["sched_yield_us"].sum()
        + vps["hypercall_us"].sum())
    summary = summarize(shootdowns, vps, duration_us, extra)
    ops = summary["ops_per_s"] * duration_us * 1e-6  # workload shootdowns completed
    # what a benchmark's `time` shows divided by its operations: comparable across runs of equal work
    summary["guest_system_us_per_op"] = float(summary["guest_system_us"] / ops) if ops else float("nan")
    return summary


def partitions_frame(shootdowns, vps, exits, config: Config, duration_us: float, only=None):
    """One summary row per guest partition (``partition``, ``policy``, then summarize()'s figures).
    ``only``: the one guest's summary, already computed (a run's summary less the host's figures)."""
    import pandas as pd

    policies = [config.workload.policy, *config.host.guest_policies]
    rows = []
    for g in range(config.host.guests):
        if only is not None:
            row = only.drop("policy")
        else:
            sd = shootdowns[shootdowns["partition"] == g]
            v, x = vps[vps["partition"] == g], exits[exits["partition"] == g]
            row = _summary(sd, v, x, config, duration_us, {})
        rows.append({"partition": g, "policy": policies[g] if policies[g:] else config.workload.policy, **row})
    return pd.DataFrame(rows)


def load_vf_trace(path: str | Path, n_vfs: int, n_blocks: int) -> dict[int, list[tuple[float, int]]]:
    """Read a CSV of PF calls with columns time_us, vf, block_mask (decimal
    or 0x hex). Errors name the line."""
    path = Path(path)
    text = read_text(path, "VF trace", "vf.trace").removeprefix("\ufeff")
    rows = list(csv.DictReader(text.splitlines()))
    need = {"time_us", "vf", "block_mask"}
    if not rows or not need <= set(rows[0]):
        raise ConfigError("vf.trace", f"{path} needs a header with columns {', '.join(sorted(need))}")
    out: dict[int, list[tuple[float, int]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            t, vf, mask = float(row["time_us"]), int(row["vf"]), int(row["block_mask"].strip(), 0)
        except (TypeError, ValueError, AttributeError, OverflowError):
            raise ConfigError("vf.trace", f"{path}:{line}: expected numbers, got {dict(row)}") from None
        if not (t >= 0 and t != float("inf")) or not 0 <= vf < n_vfs:
            raise ConfigError("vf.trace", f"{path}:{line}: time must be >= 0 and vf in 0..{n_vfs - 1}")
        if not 0 < mask < (1 << n_blocks):
            raise ConfigError("vf.trace", f"{path}:{line}: block_mask {mask:#x} must name blocks in 0..{n_blocks - 1}")
        out.setdefault(vf, []).append((t, mask))
    for events in out.values():
        events.sort()
    return out
