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
    partitions_frame,
    run_summary,
    shootdowns_frame,
    vf_frame,
    vf_summary,
    vps_frame,
)
from tlbsim.results import Result, ShootdownSpill


def csv_rows(path: str | Path, what: str, key: str, need: set[str]):
    """(line number in the file, row) for each data row of a CSV input with the columns ``need``: the
    line numbers count blank lines and quoted line breaks as the file does; a needed field with a
    character outside ASCII (a "٣", which Python's float() would read as 3) is refused with its line."""
    path = Path(path)
    text = read_text(path, what, key).removeprefix("\ufeff")  # a BOM is not a column name
    reader = csv.DictReader(text.splitlines())
    found = False
    for row in reader:
        if not found and not need <= set(reader.fieldnames or ()):
            break
        found = True
        bad = [c for c in sorted(need) if not str(row[c]).isascii()]
        if bad:
            raise ConfigError(key, f"{path}:{reader.line_num}: {bad[0]} is not a number in ASCII digits: "
                              f"{row[bad[0]]!r}")
        yield reader.line_num, row
    if not found:
        if need <= set(reader.fieldnames or ()):
            raise ConfigError(key, f"{path} has a header but no rows")
        raise ConfigError(key, f"{path} needs a header with columns {', '.join(sorted(need))}")


def load_trace(path: str | Path, n_vps: int, lines: list[int] | None = None) -> list[TraceEvent]:
    """Read a CSV trace with columns time_us, vp, address_space, pages
    (pages 0 = the whole address space). Errors name the line; ``lines``, if
    given, receives each event's line number in the file."""
    path = Path(path)
    need = {"time_us", "vp", "address_space", "pages"}
    events = []
    for line, row in csv_rows(path, "trace", "workload.trace", need):
        if lines is not None:
            lines.append(line)
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


def check_trace_address_spaces(events: list[TraceEvent], config: Config, lines: list[int] | None = None) -> None:
    """Each trace row names an address space its VP runs (a flush of an address space nobody runs
    would be a 0-target, 0-latency row: silent nonsense). ``lines``: each event's line in the file."""
    from tlbsim.model.partition import address_space_index

    for i, e in enumerate(events):
        own = address_space_index(config, e.vp)
        if e.address_space != own:
            where = f"{config.workload.trace}:{lines[i]}" if lines else f"row {i + 2}"
            raise ConfigError("workload.trace", f"{where}: VP {e.vp} runs address space {own} under "
                              f"workload.sharing = {config.workload.sharing!r}, not {e.address_space}")


MAX_SEED = 2**128  # numpy's SeedSequence takes any integer >= 0; a seed is recorded in the manifest as it is


def check_seed(seed) -> int:
    """A run's seed as an int: an integer in 0..2^128 (numpy's too); None draws one from the operating
    system's entropy, which the Result and its manifest record (the run can be repeated with it);
    True, 1.5 or "7" are refused (a TypeError or ValueError saying what a seed is)."""
    import numbers

    if seed is None:
        import secrets

        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"a seed is an integer (or None: one is drawn and recorded), not {seed!r}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"a seed is an integer in 0..2^128, not {seed}")
    return seed


def simulate(config: Config, seed: int | None = 0, progress=None, timeline=None,
             spill_dir: str | Path | None = None, spill_rows: int = 1 << 16) -> Result:
    """Run one simulation of ``config`` with ``seed``; same inputs, same Result (``seed=None``: one
    drawn from the operating system, recorded in ``Result.seed``).
    ``progress(fraction)`` is called as simulated time advances (optional); ``timeline``
    (model.timeline.Timeline) collects a per-VP timeline of a window (optional; the records are the
    same with or without it). ``spill_dir``: write the shootdown table there as the run goes
    instead of holding it (Result.shootdowns_file; ``save`` to that directory moves it into place),
    for runs of millions of shootdowns, ``spill_rows`` rows at a time; the table and the summary
    are the same."""
    if not isinstance(config, Config):
        raise TypeError("simulate() takes a tlbsim.Config")
    seed = check_seed(seed)
    lines: list[int] = []
    trace = load_trace(config.workload.trace, config.partition.vps, lines) if config.workload.trace else None
    if trace:
        check_trace_address_spaces(trace, config, lines)
        threads = config.workload.threads or config.partition.vps
        idle = [i for i, e in enumerate(trace) if e.vp >= threads]
        if idle:
            raise ConfigError("workload.trace", f"{config.workload.trace}:{lines[idle[0]]}: a row names VP "
                              f"{trace[idle[0]].vp}, which has no thread "
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
    extra = {"events": rec.events, "requests_queued": rec.requests_queued, **rec.host}
    if config.vf.count:
        extra.update(vf_summary(vf, vps, rec.vf_stats))
    summary = run_summary(shootdowns, vps, exits, config, rec.duration_us, extra)
    summary["policy"] = config.workload.policy
    partitions = partitions_frame(shootdowns, vps, exits, config, rec.duration_us,
                                  summary.drop(list(extra)) if config.host.guests == 1 else None)
    return Result(shootdowns, vps, exits, summary, config=config.to_dict(), seed=seed, vf=vf,
                  shootdowns_file=shootdowns_file, partitions=partitions)


def load_vf_trace(path: str | Path, n_vfs: int, n_blocks: int) -> dict[int, list[tuple[float, int]]]:
    """Read a CSV of PF calls with columns time_us, vf, block_mask (decimal
    or 0x hex). Errors name the line."""
    path = Path(path)
    out: dict[int, list[tuple[float, int]]] = {}
    for line, row in csv_rows(path, "VF trace", "vf.trace", {"time_us", "vf", "block_mask"}):
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
