"""`tlbsim` command line: run | sweep | plot | check | validate | bench.

Exit codes: 0 fine; 1 a regression (check) or failed sweep points; 2 bad
input (a config error, a missing or corrupt file, an unwritable output: one
line naming the problem, no traceback); 3 a model invariant broken while
run.check_invariants is on (one line saying which).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from tlbsim.config import Config, ConfigError, parse_override
from tlbsim.model import InvariantError

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_INVARIANT = 0, 1, 2, 3


class UsageError(Exception):
    pass


EXIT_TERMINATED = 128 + 15  # SIGTERM, as a shell reports a process it ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops as on Ctrl-C: workers stopped, temporary
    files removed, finished sweep runs kept, one line said (exit 143)."""


def _on_sigterm(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt the cleanup
    raise Terminated()


def _output_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory, created if needed and proven writable now (before a long run), or one line
    saying why not: it is a file, lies under one, cannot be created or written, its name is too long."""
    from tlbsim.results import writable_directory

    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} exists and is not a directory")
        _no_file_above(path, flag)
        return writable_directory(path)
    except OSError as e:
        raise UsageError(f"cannot write to {flag} {path}: {e.strerror or e}") from None


def _no_file_above(path: Path, flag: str) -> None:
    """A UsageError when a directory that ``path`` needs is a file (mkdir would say only "File exists")."""
    for above in path.absolute().parents:
        if above.exists():
            if not above.is_dir():
                raise UsageError(f"cannot write {flag} {path}: {above} is a file, not a directory")
            return


def _output_file(path: str | Path, flag: str) -> Path:
    """An output file that can be written now (checked before a long run): not a directory, not a file
    we may not write, in a directory we can write (created if needed)."""
    import os

    from tlbsim.results import writable_directory

    path = Path(path)
    try:
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a directory; give a file name")
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"cannot write {flag} {path}: permission denied")
        _no_file_above(path, flag)
        writable_directory(path.resolve().parent)
    except OSError as e:
        raise UsageError(f"cannot write {flag} {path}: {e.strerror or e}") from None
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _seed(text: str) -> int:
    """A root seed: an integer in 0..2^63-1 (numpy's SeedSequence takes no negative entropy)."""
    try:  # decimal (leading zeros too: "010" is 10), or 0x / 0o / 0b; ASCII digits only
        if not text.isascii():
            raise ValueError(text)
        value = int(text, 10) if text.strip().lstrip("+-").isdigit() else int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer, not {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed is an integer in 0..2^63-1, not {value}")
    return value


def _load_config(path: str, sets: list[str]) -> Config:
    overrides = dict(parse_override(s) for s in sets or ())
    return Config.from_toml(path, overrides)


SUMMARY_ROWS = (
    ("policy", "policy", "{}"),
    ("shootdowns_completed", "shootdowns completed", "{:,}"),
    ("shootdowns_incomplete", "shootdowns incomplete (still in flight at the end)", "{:,}"),
    ("shootdowns_queued", "arrivals never started (queued at the end)", "{:,}"),
    ("incomplete_fraction", "  unfinished, as a fraction of all arrivals", "{:.2%}"),
    ("shootdowns_failed", "shootdowns failed (HV_STATUS != SUCCESS)", "{:,}"),
    ("latency_mean_us", "latency mean (us)", "{:.3f}"),
    ("latency_p50_us", "latency p50 (us)", "{:.3f}"),
    ("latency_p99_us", "latency p99 (us)", "{:.3f}"),
    ("response_p50_us", "response p50, arrival to completion (us)", "{:.3f}"),
    ("response_p99_us", "response p99, arrival to completion (us)", "{:.3f}"),
    ("suspensions", "suspensions (locked TLB)", "{:,}"),
    ("latency_p99_is_lower_bound", "p99 is a lower bound (censored at the end)", "{}"),
    ("guest_work_fraction", "useful guest work, share of VP time", "{:.4f}"),
    ("ops_per_s", "operations per second (closed loop)", "{:,.0f}"),
    ("refill_us", "refill time, all VPs (us)", "{:.1f}"),
    ("collateral_entries", "collateral TLB entries lost", "{:.0f}"),
    ("guest_system_us", "guest system time, all VPs (us)", "{:,.0f}"),
    ("directed_yields", "directed yields (host yield_to that took place)", "{:,}"),
    ("vf_calls", "VF: PF invalidate calls", "{:,}"),
    ("vf_latency_p50_us", "VF: call -> blocks read, p50 (us)", "{:.3f}"),
    ("vf_latency_p99_us", "VF: call -> blocks read, p99 (us)", "{:.3f}"),
    ("vf_coalescing_ratio", "VF: PF calls per notification", "{:.3f}"),
    ("vf_notifications_dropped", "VF: notifications dropped (fault injection)", "{:,}"),
    ("vf_calls_lost", "VF: calls with a lost bit", "{:,}"),
    ("events", "SimPy events", "{:,}"),
)


# an open loop's ops_per_s counts completions per second, not operations the workload chose to do:
# shown for closed loops only (workload.mode = "closed")
CLOSED_LOOP_ONLY = frozenset({"ops_per_s"})


def format_summary(summary: pd.Series, *, closed_loop: bool) -> str:
    lines = []
    for key, label, fmt in SUMMARY_ROWS:
        value = summary.get(key)
        if value is None or (key in CLOSED_LOOP_ONLY and not closed_loop):
            continue
        text = "n/a" if isinstance(value, float) and value != value else fmt.format(value)
        lines.append(f"  {label:<50} {text:>14}")
    return "\n".join(lines)


PARTITION_COLUMNS = (("policy", "{}"), ("shootdowns_completed", "{:,}"), ("incomplete_fraction", "{:.2%}"),
                     ("latency_p50_us", "{:.2f}"), ("latency_p99_us", "{:.2f}"), ("response_p99_us", "{:.2f}"),
                     ("ops_per_s", "{:,.0f}"), ("guest_work_fraction", "{:.4f}"), ("guest_system_us", "{:,.0f}"))


def format_partitions(partitions: pd.DataFrame, *, closed_loop: bool) -> str:
    """One line per guest partition (the ``partitions`` table)."""
    columns = [(c, fmt) for c, fmt in PARTITION_COLUMNS if closed_loop or c not in CLOSED_LOOP_ONLY]
    head = "  per guest partition:\n  " + f"{'partition':>9} " + " ".join(f"{c:>20}" for c, _ in columns)
    lines = [head]
    for _, row in partitions.iterrows():
        cells = []
        for c, fmt in columns:
            v = row[c]
            cells.append(f"{'n/a' if isinstance(v, float) and v != v else fmt.format(v):>20}")
        lines.append(f"  {row['partition']:>9} " + " ".join(cells))
    return "\n".join(lines)


INCOMPLETE_WARNING = 0.05  # warn when more than this fraction of shootdowns never completed
RUN_CI_METRICS = ("latency_mean_us", "latency_p50_us", "latency_p99_us", "response_p50_us", "response_p99_us",
                  "guest_work_fraction", "ops_per_s", "shootdowns_completed", "shootdowns_incomplete",
                  "shootdowns_queued", "incomplete_fraction", "suspensions")


def cmd_run(args) -> int:
    spilled: list[Path] = []  # shootdown tables written as the runs went
    try:
        return _cmd_run(args, spilled)
    finally:  # one that was not moved into place (a failure, an interrupt) is not left behind
        for path in spilled:
            path.unlink(missing_ok=True)


def _cmd_run(args, spilled: list[Path]) -> int:
    config = _load_config(args.config, args.set)
    if args.replications < 1 or args.replications > 1000:
        raise UsageError("--replications must be in 1..1000")
    out = _run_out(args)
    timeline = _run_timeline(args, config)  # every output is checked before the run, which may take minutes
    results = _replications(args, config, out, timeline, spilled)
    print(_run_banner(args, config))
    result = results[0]
    closed_loop = config.workload.mode == "closed"
    worst = max(float(r.summary["incomplete_fraction"]) for r in results)
    if worst > INCOMPLETE_WARNING:
        print(f"tlbsim: warning: {worst:.1%} of the arrivals were unfinished at the end (in flight, or never "
              "started); latency statistics count those in flight with the time they had waited (lower bounds): "
              "run longer or lighten the load", file=sys.stderr)
    if args.replications == 1:
        print(format_summary(result.summary, closed_loop=closed_loop))
        if config.host.guests > 1:
            print(format_partitions(result.partitions, closed_loop=closed_loop))
    else:
        print(format_replications([r.summary for r in results], closed_loop=closed_loop))
    if out is not None:  # first: a timeline that cannot be written does not cost the results
        try:
            if args.replications == 1:
                result.save(out)
            else:  # each replication was saved when it was made; the index goes last
                save_replications(out, [x.summary for x in results], config, args.seed)
        except OSError as e:
            raise UsageError(f"cannot write results to {out}: {e.strerror or e}") from None
        print(f"results written to {out}/")
    if timeline is not None:
        _write_timeline(args, config, timeline, result)
    return EXIT_OK


def _run_out(args) -> Path | None:
    """``--out``, checked before the run: writable, and holding no results unless ``--force``; stale
    temporary files of a killed run there are removed."""
    from tlbsim.results import manifest_kind, remove_stale_temp_files

    out = Path(args.out) if args.out else None
    if out is None:
        return None
    _output_dir(out)
    manifest = out / "manifest.json"
    if manifest.exists() and not args.force:
        kind = manifest_kind(manifest) or "unreadable"
        raise UsageError(f"--out {out} already holds results ({kind}); use --force to overwrite them "
                         "or choose another directory")
    remove_stale_temp_files(out)  # of an earlier run here that was killed
    return out


def _run_timeline(args, config):
    """The Timeline ``--trace`` / ``--timeline`` ask for (None without them), their files checked."""
    if not (args.trace or args.timeline):
        return None
    from tlbsim.model.timeline import Timeline

    start, end = _window(args.window, config.partition.duration_us)
    if args.trace:
        _output_file(args.trace, "--trace")
    if args.timeline:
        args.timeline = _figure_file(args.timeline, "--timeline")
    return Timeline(start, end)


def _run_banner(args, config) -> str:
    guests = f"{config.host.guests} guest partitions of " if config.host.guests > 1 else ""
    return (f"tlbsim run {args.config} (seed {args.seed}, {guests}{config.partition.vps} VPs on "
            f"{config.partition.lps} LPs" + (f" shared with {config.host.cotenants} co-tenant partition(s) of "
                                              f"{config.host.cotenant_vps} VPs" if config.host.cotenants else "")
            + f", {config.partition.duration_us:,.0f} us simulated"
            + (f", {args.replications} replications" if args.replications > 1 else "") + ")")


def _replications(args, config, out: Path | None, timeline, spilled: list[Path]) -> list:
    """Run every replication (the first with the timeline); with ``--out`` and several, each is saved
    as it is made and only its summary kept."""
    from tlbsim.model import rng
    from tlbsim.runner import simulate

    results = []
    for r in range(args.replications):
        seed = args.seed if args.replications == 1 else rng.replication_seed(args.seed, r)
        progress = None
        if not args.no_progress:
            from tlbsim.sweep import Progress

            label = f"simulating {config.partition.duration_us:,.0f} us" + (
                f" (replication {r + 1}/{args.replications})" if args.replications > 1 else "")
            bar = Progress(100, label)

            def progress(_fraction: float, bar=bar) -> None:  # called once per 1 % of simulated time
                bar.update()
        # with --out the shootdown table goes to disk as the run makes it
        spill_dir = None if out is None else (out if args.replications == 1 else out / f"replication-{r}")
        res = simulate(config, seed=seed, progress=progress, timeline=timeline if r == 0 else None,
                       spill_dir=spill_dir)
        if res.shootdowns_file is not None:
            spilled.append(Path(res.shootdowns_file))
        if out is not None and args.replications > 1:
            # saved as soon as it is made: N replications need the memory of one, not N
            try:
                res.save(out / f"replication-{r}")
            except OSError as e:
                raise UsageError(f"cannot write results to {out}: {e.strerror or e}") from None
        if r > 0:
            res = SimpleNamespace(summary=res.summary)  # its tables are on disk or not wanted
        results.append(res)
    return results


def _write_timeline(args, config, timeline, result) -> None:
    from tlbsim.timeline_output import draw_timeline, write_chrome_trace

    vf0 = result.vf[result.vf["partition"] == 0] if len(result.vf) else result.vf  # the guest drawn
    vf_rows = vf0.to_dict("records") if len(vf0) else None
    try:
        if args.trace:
            write_chrome_trace(timeline, args.trace, config.partition.vps, vf_rows)
            print(f"timeline ({timeline.start_us:,.0f}-{timeline.end_us:,.0f} us) written to {args.trace}: "
                  "open it in Perfetto (ui.perfetto.dev) or chrome://tracing")
        if args.timeline:
            draw_timeline(timeline, args.timeline, config.partition.vps, f"{config.workload.policy}: VP states, "
                          f"{timeline.start_us:,.0f}-{timeline.end_us:,.0f} us")
            print(f"timeline figure written to {args.timeline}")
    except (OSError, ValueError) as e:  # checked before the run: the disk filled, or the file went meanwhile
        raise UsageError(f"cannot write the timeline: {e}") from None


def _figure_file(path: str, flag: str) -> str:
    """A figure's file name with a format matplotlib writes (the name as given, or with ".png" added when
    it has no extension, as matplotlib would), checked writable before the run."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name, e.g. {Path(path) / 'timeline.png'}")
    if not suffix:
        path += ".png"
    elif suffix not in formats:
        raise UsageError(f"{flag} {path}: .{suffix} is not a figure format matplotlib writes "
                         f"({', '.join(sorted(formats))})")
    _output_file(path, flag)
    return path


def _window(text: str | None, duration_us: float) -> tuple[float, float]:
    """--window START:END in us (default: the first 2 ms, or the whole run if shorter)."""
    if not text:
        return 0.0, min(duration_us, 2000.0)
    try:
        a, b = (float(x) for x in text.split(":", 1))
    except ValueError:
        raise UsageError(f"--window is START:END in microseconds, not {text!r}") from None
    if not (0 <= a < b) or b != b or a != a:
        raise UsageError(f"--window needs 0 <= START < END, got {text!r}")
    if a >= duration_us:
        raise UsageError(f"--window {text} starts after the run ends ({duration_us:,.0f} us simulated)")
    return a, min(b, duration_us)


#: every row: an arrival completed, failed, in flight at the end or never started
SHOOTDOWN_COUNTS = ("shootdowns_completed", "shootdowns_failed", "shootdowns_incomplete", "shootdowns_queued")
UNFINISHED = ("shootdowns_incomplete", "shootdowns_queued")


#: an upper bound this many times the largest replication's value is printed as (*): unbounded, run more
WIDE_INTERVAL = 100.0


def format_replications(summaries: list, *, closed_loop: bool) -> str:
    """Each key metric's estimate and 95 % interval over replications, the method beside it and in a
    legend. Every metric here is never negative: ``nonnegative_mean_ci`` (guest_work_fraction also at
    most 1); incomplete_fraction is pooled over all replications' shootdowns: ``event_fraction_ci``."""
    import textwrap

    from tlbsim.stats import EVENT_FRACTION_METHOD, NONNEGATIVE_METHOD, event_fraction_ci, nonnegative_mean_ci

    lines = [f"  {'metric':<28} {'estimate':>14} {'95 % interval':>32}  method"]
    wide = False
    for key in RUN_CI_METRICS:
        if key in CLOSED_LOOP_ONLY and not closed_loop:
            continue
        if key == "incomplete_fraction":
            if not all(c in s for s in summaries for c in SHOOTDOWN_COUNTS):
                continue
            m, lo, hi = event_fraction_ci([sum(int(s[c]) for c in UNFINISHED) for s in summaries],
                                          [sum(int(s[c]) for c in SHOOTDOWN_COUNTS) for s in summaries])
            method = "Wilson hull"
        else:
            values = [float(s[key]) for s in summaries if key in s]
            if not values:
                continue
            m, lo, hi = nonnegative_mean_ci(values, upper=1.0 if key == "guest_work_fraction" else float("inf"))
            method = "t/Cox hull"
            if hi > WIDE_INTERVAL * max(values):  # a bound no replication came near says only "too few"
                wide = True
                hi = float("inf")
        ci = "n/a" if lo != lo else f"[{lo:,.4g}, {'(*)' if hi == float('inf') else f'{hi:,.4g}'}]"
        lines.append(f"  {key:<28} {m:>14,.4g} {ci:>32}  {method}")
    if wide:
        lines.append(f"  (*) beyond {WIDE_INTERVAL:g} x the largest replication: the replications disagree too much to "
                     "bound the mean; run more replications")
    lines.append("  intervals (95 %):")
    for name, text in (("t/Cox hull", "the mean; " + NONNEGATIVE_METHOD),
                       ("Wilson hull", "incomplete / all shootdowns, " + EVENT_FRACTION_METHOD)):
        lines.extend(textwrap.wrap(f"{name}: {text}", 110, initial_indent="    ", subsequent_indent="      "))
    return "\n".join(lines)


def save_replications(out: Path, summaries: list, config: Config, seed: int) -> None:
    import json

    from tlbsim.results import atomic_write_parquet, atomic_write_text, git_revision

    table = pd.DataFrame([{**{k: v for k, v in s.items() if not isinstance(v, dict)}, "replication": r}
                          for r, s in enumerate(summaries)])
    atomic_write_parquet(table, out / "replications.parquet")
    manifest = {"kind": "tlbsim-run-replications", "root_seed": seed, "replications": len(summaries),
                "config": config.to_dict(), "git_revision": git_revision(),
                "tables": {"replications": "replications.parquet"},
                "runs": [f"replication-{r}" for r in range(len(summaries))]}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))


def cmd_sweep(args) -> int:
    from tlbsim.sweep import SweepSpec, run_sweep

    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if args.force and (args.resume or args.retry_failed):
        raise UsageError("--force recomputes every run and --resume keeps the finished ones: give one of them")
    if args.dask_local is not None and args.dask_local < 1:
        raise UsageError("--dask-local needs a number of workers >= 1")
    spec = SweepSpec.from_toml(args.spec, replications=args.replications,
                               sets=[parse_override(s) for s in args.set or ()])
    out = args.out or str(Path("results") / spec.name)
    n_tasks = len(spec.points) * spec.replications

    def announce(todo: int, kept: int) -> None:  # once the directory is accepted: a refusal comes first
        print(f"tlbsim sweep {spec.name}: {len(spec.points)} points x {spec.replications} replications "
              f"= {n_tasks} runs -> {out}/" + (f" ({kept} finished runs kept, {todo} to compute)" if kept else ""),
              flush=True)

    try:
        outcome = run_sweep(spec, out, jobs=args.jobs, resume=args.resume or args.retry_failed,
                            dask_scheduler=args.dask_scheduler, dask_local=args.dask_local,
                            progress=not args.no_progress, retry_failed=args.retry_failed, force=args.force,
                            recompute_hint="use --force to compute every run again (it removes only the sweep's "
                            "own files there), or choose another --out", announce=announce)
    except KeyboardInterrupt as e:
        how = ("terminated (SIGTERM)", EXIT_TERMINATED) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"tlbsim: {how[0]}; finished runs are kept in {out}/parts: "
              f"`tlbsim sweep {args.spec} --out {out}"
              + (f" --replications {args.replications}" if args.replications else "")
              + "".join(f" --set {shlex.quote(s)}" for s in args.set or ())
              + " --resume` finishes the rest", file=sys.stderr)
        return how[1]
    print(f"{outcome.computed} runs computed, {outcome.skipped} resumed, in {outcome.wall_s:.1f} s; "
          f"tables in {outcome.directory}/ (points.parquet, shootdowns.parquet, manifest.json)")
    if outcome.failed:
        print(f"tlbsim: {len(outcome.failed)} runs failed:", file=sys.stderr)
        for point, rep, err in outcome.failed:
            print(f"  point {point} replication {rep}: {err}", file=sys.stderr)
        return EXIT_REGRESSION
    return EXIT_OK


def cmd_plot(args) -> int:
    from tlbsim.plots import plot_sweep

    directory = Path(args.dir)
    if not (directory / "manifest.json").exists():
        raise UsageError(f"{directory} holds no sweep results (no manifest.json)")
    try:
        paths = plot_sweep(directory, args.out)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable or corrupt tables or manifest
        raise UsageError(f"cannot plot {directory}: {type(e).__name__}: {e}") from None
    for p in paths:
        if p.suffix == ".png":
            print(p)
    return EXIT_OK


def cmd_explain(args) -> int:
    from tlbsim.anatomy import explain

    directory = Path(args.dir)
    if not (directory / "manifest.json").is_file():
        raise UsageError(f"{directory} holds no tlbsim results (no manifest.json): give a `tlbsim run --out` "
                         "or `tlbsim sweep` directory")
    try:
        text = explain(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable or corrupt tables or manifest
        raise UsageError(f"cannot explain {directory}: {type(e).__name__}: {e}") from None
    print(text)
    return EXIT_OK


def cmd_check(args) -> int:
    import json

    from tlbsim import regress

    directory = Path(args.baseline)
    overrides = dict(parse_override(s) for s in args.set or ())
    try:
        if args.update:
            changes = regress.update(directory, overrides, args.scenario)
            for name, diff in changes:
                if diff is None:
                    print(f"{name}: baseline written (there was no readable baseline before)")
                elif not diff:
                    print(f"{name}: baseline rewritten, nothing changed")
                else:
                    print(f"{name}: baseline rewritten; what changed:")
                    print(regress.format_table(diff))
            return EXIT_OK
        tiers = {"exact", "statistical"} if args.tier == "both" else {args.tier}
        rows = regress.check(directory, tiers, overrides, args.seed, args.scenario)
    except regress.BaselineError as e:
        raise UsageError(str(e)) from None
    failed = [r for r in rows if r.failed]
    if args.json:
        print(json.dumps({"ok": not failed, "rows": [r.as_dict() for r in rows]}, indent=1))
    else:
        print(regress.format_table(rows))
        if failed:
            names = sorted({f"{r.scenario}/{r.metric} ({r.tier.split()[0]})" for r in failed})
            print(f"\nREGRESSION: {len(failed)} metric(s) moved: " + ", ".join(names))
        else:
            print(f"\nall {len(rows)} checks hold")
    return EXIT_REGRESSION if failed else EXIT_OK


def cmd_validate(args) -> int:
    import json

    from tlbsim import validate

    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    cases = validate.load_cases(args.case, quick=args.quick)
    out = _output_dir(args.out or ("results/validation-quick" if args.quick else "results/validation"))
    if args.docs:  # written after every case has run: checked now
        _output_file(args.docs, "--docs")
    if not args.json:
        print(f"tlbsim validate: {len(cases)} case(s) ({'quick' if args.quick else 'full'}): "
              f"{', '.join(c.name for c in cases)} -> {out}/", flush=True)
    table = validate.run_cases(cases, out, quick=args.quick, jobs=args.jobs, resume=True,
                               progress=not args.no_progress and not args.json)
    if args.docs:
        validate.write_docs(cases, table, out / "figures", Path(args.docs), args.quick)
    missed = table[table["verdict"] != "holds"]
    if args.json:
        print(json.dumps({"ok": missed.empty, "rows": json.loads(table.to_json(orient="records"))}, indent=1))
    else:
        print(validate.format_table(table))
        print(f"\n{len(table) - len(missed)} of {len(table)} checks hold; tables in {out}/validation.parquet, "
              f"figures in {out}/figures/" + (f"; {args.docs} written" if args.docs else ""))
    return EXIT_REGRESSION if len(missed) else EXIT_OK


def cmd_sensitivity(args) -> int:
    from tlbsim import sensitivity

    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    spec = sensitivity.load_spec(args.spec)
    out = _output_dir(args.out or Path("results") / "sensitivity" / spec.name)
    n = len(spec.sample())
    print(f"tlbsim sensitivity {spec.name}: {spec.method}, {n} sample points x {len(spec.variants)} variants x "
          f"{spec.replications} replication(s) = {n * len(spec.variants) * spec.replications} runs -> {out}/",
          flush=True)
    indices, figure = sensitivity.run(spec, out, jobs=args.jobs, resume=args.resume,
                                      progress=not args.no_progress, dask_scheduler=args.dask_scheduler,
                                      dask_local=args.dask_local)
    print(sensitivity.format_indices(indices))
    print(f"indices in {out}/indices.parquet; figure {figure}")
    return EXIT_OK


def cmd_config_show(args) -> int:
    overrides = dict(parse_override(x) for x in args.set or ())
    config = _load_config(args.config, args.set) if args.config else Config().with_overrides(overrides)
    print(to_toml(config.to_dict()), end="")
    return EXIT_OK


def to_toml(data: dict, prefix: str = "") -> str:
    """The merged config as TOML (tables of scalars and lists), readable back by Config.from_toml."""
    import json

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines, tables = [], []
    for k, v in data.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = "".join(f"{k} = {value(v)}\n" for k, v in lines)
    for k, v in tables:
        name = f"{prefix}{k}"
        scalars = {a: b for a, b in v.items() if not isinstance(b, dict)}
        out += f"\n[{name}]\n" + "".join(f"{a} = {value(b)}\n" for a, b in scalars.items())
        for a, b in v.items():
            if isinstance(b, dict):
                out += to_toml({a: b}, name + ".")
    return out


def cmd_bench(args) -> int:
    from tlbsim.bench import load_report
    from tlbsim.bench import main as bench_main
    from tlbsim.results import writable_directory

    if args.compare:
        try:
            load_report(args.compare)  # a bad reference is an error before the minutes of measuring
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.json:
        target = Path(args.json)
        if target.is_dir():
            raise UsageError(f"--json {target} is a directory")
        try:
            writable_directory(target.resolve().parent)
        except OSError as e:
            raise UsageError(f"cannot write {target}: {e.strerror or e}") from None
    if not (0.0 < args.tolerance <= 1000.0):  # NaN fails too
        raise UsageError(f"--tolerance {args.tolerance:g}: give a percentage above 0 and at most 1000")
    return bench_main(quick=args.quick, json_out=args.json, compare=args.compare, tolerance=args.tolerance / 100.0)


def build_parser() -> argparse.ArgumentParser:
    from tlbsim import __version__

    p = _Parser(prog="tlbsim", description="Discrete-event simulator of TLB shootdowns in multi-VP VMs.")
    p.add_argument("--version", action="version", version=f"tlbsim {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    _add_run(sub)
    _add_sweep(sub)
    _add_plot(sub)
    _add_explain(sub)
    _add_check(sub)
    _add_validate(sub)
    _add_sensitivity(sub)
    _add_config(sub)
    _add_bench(sub)
    return p


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="simulate one configuration and print its summary")
    run.add_argument("config", help="TOML configuration (see experiments/configs/default.toml)")
    run.add_argument("--seed", type=_seed, default=0, help="root seed (default 0)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set partition.vps=32")
    run.add_argument("--out", metavar="DIR", help="write Parquet tables and manifest.json here")
    run.add_argument("--replications", type=int, default=1, metavar="N",
                     help="run N replications (seeds SeedSequence(seed, spawn_key=(r,))) and print 95 %% intervals")
    run.add_argument("--force", action="store_true", help="overwrite results already in --out")
    run.add_argument("--trace", metavar="FILE.json",
                     help="write a timeline (Chrome trace events: Perfetto, chrome://tracing) of --window")
    run.add_argument("--timeline", metavar="FILE.png", help="draw the VPs' states over --window")
    run.add_argument("--window", metavar="START:END", help="timeline window in us (default 0:2000)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress (a bar on a terminal, a line per 10 %% otherwise)")
    run.set_defaults(func=cmd_run)


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="run a parameter sweep (grid x replications) and save its tables")
    sw.add_argument("spec", help="sweep spec TOML (see experiments/*.toml)")
    sw.add_argument("--out", metavar="DIR", help="output directory (default results/<name>)")
    sw.add_argument("--jobs", type=int, help="local worker processes (default: all cores)")
    sw.add_argument("--replications", type=int, help="override the spec's replications")
    sw.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE",
                    help="replace an entry of the spec, e.g. --set 'grid.partition.vps=[64, 256]' or "
                    "--set fixed.partition.duration_us=5000.0 (recorded with the sweep: --resume needs the same)")
    sw.add_argument("--resume", action="store_true", help="finish an interrupted sweep in --out")
    sw.add_argument("--retry-failed", action="store_true", help="with --resume: compute failed runs again")
    sw.add_argument("--force", action="store_true",
                    help="compute every run again in an --out that holds this or another sweep (removes only the "
                    "files a sweep writes there)")
    g = sw.add_mutually_exclusive_group()
    g.add_argument("--dask-scheduler", metavar="ADDR", help="run on a Dask cluster, e.g. tcp://host:8786")
    g.add_argument("--dask-local", type=int, metavar="N", help="start a Dask LocalCluster with N workers")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(func=cmd_sweep)


def _add_plot(sub) -> None:
    pl = sub.add_parser("plot", help="draw a sweep's standard figures (PNG and SVG)")
    pl.add_argument("dir", help="a sweep output directory")
    pl.add_argument("--out", metavar="DIR", help="where to write figures (default DIR/figures)")
    pl.set_defaults(func=cmd_plot)


def _add_explain(sub) -> None:
    ex = sub.add_parser("explain", help="what shootdown latency is made of (typical and tail), per policy")
    ex.add_argument("dir", help="a `tlbsim run --out` or `tlbsim sweep` directory")
    ex.set_defaults(func=cmd_explain)


def _add_check(sub) -> None:
    ck = sub.add_parser("check", help="compare simulated latency with committed baselines (CI gate)")
    ck.add_argument("--baseline", default="results/baselines", metavar="DIR",
                    help="baseline directory holding scenarios.toml (default results/baselines)")
    ck.add_argument("--tier", choices=("exact", "statistical", "both"), default="both")
    ck.add_argument("--update", action="store_true", help="rewrite the baselines deliberately and show what changed")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every scenario")
    ck.add_argument("--seed", type=_seed, help="root seed for the statistical tier (default: the baseline's)")
    ck.add_argument("--scenario", action="append", help="check only this scenario (repeatable)")
    ck.set_defaults(func=cmd_check)


def _add_validate(sub) -> None:
    va = sub.add_parser("validate", help="compare the model with published measurements (experiments/validation)")
    va.add_argument("case", nargs="*", help="case names (default: every case; with --quick, the quick subset)")
    va.add_argument("--quick", action="store_true", help="the quick subset, fewer replications (CI)")
    va.add_argument("--json", action="store_true", help="machine-readable output")
    va.add_argument("--out", metavar="DIR", help="output directory (default results/validation[-quick]); "
                    "finished runs there are reused")
    va.add_argument("--jobs", type=int, help="local worker processes (default: all cores)")
    va.add_argument("--docs", metavar="FILE", help="write the validation report (docs/validation.md)")
    va.add_argument("--no-progress", action="store_true", help="no progress bar")
    va.set_defaults(func=cmd_validate)


def _add_sensitivity(sub) -> None:
    se = sub.add_parser("sensitivity", help="which parameters move an answer (Morris / Sobol indices, SALib)")
    se.add_argument("spec", help="sensitivity spec TOML (see experiments/sensitivity/*.toml)")
    se.add_argument("--out", metavar="DIR", help="output directory (default results/sensitivity/<name>)")
    se.add_argument("--jobs", type=int, help="local worker processes (default: all cores)")
    se.add_argument("--resume", action="store_true", help="finish an interrupted study in --out")
    g = se.add_mutually_exclusive_group()
    g.add_argument("--dask-scheduler", metavar="ADDR", help="run on a Dask cluster, e.g. tcp://host:8786")
    g.add_argument("--dask-local", type=int, metavar="N", help="start a Dask LocalCluster with N workers")
    se.add_argument("--no-progress", action="store_true", help="no progress bar")
    se.set_defaults(func=cmd_sensitivity)


def _add_config(sub) -> None:
    cf = sub.add_parser("config", help="show the merged configuration (defaults, a config file, --set)")
    cf_sub = cf.add_subparsers(dest="config_command", parser_class=_Parser, metavar="show", required=True)
    show = cf_sub.add_parser("show", help="print the merged configuration as TOML")
    show.add_argument("config", nargs="?", help="TOML configuration (default: the built-in defaults)")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set partition.vps=32")
    show.set_defaults(func=cmd_config_show)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="measure simulator speed against raw SimPy")
    bench.add_argument("--quick", action="store_true", help="smaller workloads (a smoke test, not a measurement)")
    bench.add_argument("--json", metavar="FILE", help="write every figure (value, floor, target) as JSON")
    bench.add_argument("--compare", metavar="FILE",
                       help="print each figure's ratio to a reference --json run (e.g. benchmarks/reference.json)")
    bench.add_argument("--tolerance", type=float, default=10.0, metavar="PCT",
                       help="with --compare: flag figures worse than the reference by more than PCT %% (default 10)")
    bench.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    from tlbsim.model.partition import EventBudgetExceeded

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # no command: list them
        parser.print_help()
        return EXIT_OK
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops a command as Ctrl-C does
        previous = (signal.getsignal(signal.SIGTERM),)
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except (ConfigError, UsageError, EventBudgetExceeded) as e:
        print(f"tlbsim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InvariantError as e:  # run.check_invariants = true and the model broke one
        print(f"tlbsim: invariant violated: {e}", file=sys.stderr)
        return EXIT_INVARIANT
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("tlbsim: terminated (SIGTERM)", file=sys.stderr)
            return EXIT_TERMINATED
        print("tlbsim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0] if previous[0] is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
