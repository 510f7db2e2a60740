"""Parameter sweeps: grids x replications, seeds, executors, resumable output.

A sweep spec (TOML):

    name = "mask-vs-all"
    base = "../configs/default.toml"   # relative to the spec file
    replications = 3
    seed = 20261124                    # root seed
    [fixed]                            # overrides for every point
    "partition.duration_us" = 50000.0
    [grid]                             # cartesian product
    "workload.policy" = ["mask", "all"]
    "partition.vps" = [8, 16]
    [zip]                              # lists varied together (one point per position)
    "workload.sharing" = ["groups", "groups"]
    "workload.group_size" = [2, 8]

Seeds: replication r of every point runs with the seed
``SeedSequence(root, spawn_key=(r,))``: any point can be recomputed alone,
and every point (every strategy) of a replication sees the same random
workload -- common random numbers, so differences between points are not
drowned in sampling noise.

Output directory: ``parts/`` holds one finished (point, replication) at a
time, written atomically; ``points.parquet`` (one row per point and
replication: its parameters and summary, or its error), ``shootdowns.parquet``
(every shootdown, with point and replication) and ``manifest.json`` are
assembled from the parts at the end. ``--resume`` skips parts already there.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlbsim import __version__
from tlbsim.config import Config, ConfigError, read_toml
from tlbsim.results import atomic_write_parquet, atomic_write_text, git_revision

SPEC_KEYS = {"name", "base", "replications", "seed", "fixed", "grid", "zip", "description", "plot"}


@dataclass(frozen=True)
class Point:
    index: int
    overrides: dict[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict[str, Any]
    points: tuple[Point, ...]
    replications: int
    seed: int
    varied: tuple[str, ...]
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path, replications: int | None = None) -> SweepSpec:
        path = Path(path)
        data = read_toml(path, "sweep spec")
        return cls.from_dict(data, path.parent, replications)

    @classmethod
    def from_dict(cls, data: dict, here: Path = Path("."), replications: int | None = None) -> SweepSpec:
        unknown = set(data) - SPEC_KEYS
        if unknown:
            raise ConfigError(sorted(unknown)[0], "unknown sweep spec key")
        for key in ("fixed", "grid", "zip", "plot"):
            if key in data and not isinstance(data[key], dict):
                raise ConfigError(key, f"[{key}] must be a table")
        if "base" in data and not isinstance(data["base"], str):
            raise ConfigError("base", "must be the path of a config TOML")
        base: dict[str, Any] = {}
        if "base" in data:
            base = read_toml((here / data["base"]).resolve(), "base config", "base")
        reps = replications if replications is not None else data.get("replications", 1)
        if not isinstance(reps, int) or reps < 1:
            raise ConfigError("replications", "must be an integer >= 1")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError("seed", "must be an integer >= 0")
        fixed = dict(data.get("fixed", {}))
        grid = dict(data.get("grid", {}))
        zipped = dict(data.get("zip", {}))
        for section, table in (("grid", grid), ("zip", zipped)):
            for key, values in table.items():
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"{section}.{key}", "must be a non-empty list")
        lengths = {len(v) for v in zipped.values()}
        if len(lengths) > 1:
            raise ConfigError("zip", "all zipped lists must have the same length")
        zip_rows = [dict(zip(zipped, row, strict=True)) for row in zip(*zipped.values(), strict=True)] or [{}]
        grid_rows = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] or [{}]
        points = []
        for g in grid_rows:
            for z in zip_rows:
                overrides = {**fixed, **g, **z}
                points.append(Point(len(points), overrides))
        name = data.get("name", "sweep")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) \
                or name.startswith("."):
            raise ConfigError("name", f"a sweep name is letters, digits, '-', '_' and '.', not {name!r} "
                              "(it names the output directory under results/)")
        spec = cls(name, base, tuple(points), reps, seed,
                   tuple([*grid, *zipped]), source=data)
        for p in spec.points:  # validate every point up front: a typo fails before any work
            try:
                spec.config(p)
            except ConfigError as e:
                raise ConfigError(e.key, f"point {p.index} {p.overrides}: {str(e).split(': ', 1)[-1]}") from None
        return spec

    def config(self, point: Point) -> Config:
        from tlbsim.config import apply_overrides

        return Config.from_dict(apply_overrides(self.base, point.overrides))

    def seed_for(self, replication: int) -> int:
        from tlbsim.model.rng import replication_seed

        return replication_seed(self.seed, replication)

    def tasks(self) -> list[tuple[int, int]]:
        return [(p.index, r) for p in self.points for r in range(self.replications)]


# ---------------------------------------------------------------- one task
def run_task(spec: SweepSpec, point_index: int, replication: int) -> dict:
    """Run one (point, replication); never raises: errors are recorded."""
    from tlbsim.runner import simulate

    point = spec.points[point_index]
    seed = spec.seed_for(replication)
    row: dict[str, Any] = {"point": point_index, "replication": replication, "seed": str(seed)}
    row.update({k: _scalar(v) for k, v in point.overrides.items() if k in spec.varied})
    t = time.perf_counter()
    try:
        result = simulate(spec.config(point), seed=seed)
    except Exception as e:  # recorded per run, the sweep goes on (desmod-style)
        row.update(status="error", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=8), wall_s=time.perf_counter() - t)
        return {"row": row, "shootdowns": None, "vf": None}
    row.update(status="ok", error="", traceback="", wall_s=time.perf_counter() - t)
    row.update({k: _scalar(v) for k, v in result.summary.items() if k != "policy"})
    sd = result.shootdowns.copy()
    sd.insert(0, "replication", replication)
    sd.insert(0, "point", point_index)
    vf = None
    if len(result.vf):
        vf = result.vf.copy()
        vf.insert(0, "replication", replication)
        vf.insert(0, "point", point_index)
    return {"row": row, "shootdowns": sd, "vf": vf}


def _scalar(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return json.dumps(v)
    return v


VF_PART = ".vf.parquet"


def _part_name(point: int, rep: int) -> str:
    return f"p{point:05d}_r{rep:03d}"


def _write_part(parts: Path, out: dict) -> None:
    row = out["row"]
    name = _part_name(row["point"], row["replication"])
    if out["shootdowns"] is not None:
        atomic_write_parquet(out["shootdowns"], parts / f"{name}.parquet")
    if out.get("vf") is not None:
        atomic_write_parquet(out["vf"], parts / f"{name}{VF_PART}")
    # the JSON is written last: its presence marks the part complete
    atomic_write_text(parts / f"{name}.json", json.dumps(row, default=_scalar))


def _task_in_process(args):
    """A local worker runs the task and writes its own part files (atomic,
    distinct names): the parent receives no tables, so it pickles and writes
    nothing large and the workers' output does not serialize through it."""
    spec, point, rep, parts = args
    _write_part(parts, run_task(spec, point, rep))
    return point, rep


# ---------------------------------------------------------------- executors
class Progress:
    """A one-line progress bar with ETA on stderr (a line per 10 % when not a terminal)."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.done = 0
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        frac = self.done / self.total
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {self.done}/{self.total} {frac:4.0%} elapsed {_hms(elapsed)} ETA {_hms(eta)}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
            self.stream.flush()
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            print(line, file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them (no traceback from every worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


WORKER_DIED = ("the worker process running it died (killed, e.g. by the out-of-memory killer?); "
               "rerun with --resume --retry-failed")


def _failed_part(parts: Path, point: int, rep: int, error: str) -> None:
    row = {"point": point, "replication": rep, "seed": "", "status": "error", "error": error, "traceback": "",
           "wall_s": 0.0}
    _write_part(parts, {"row": row, "shootdowns": None, "vf": None})


def _stop(ex: ProcessPoolExecutor) -> None:
    """Stop a pool now: cancel what has not started, terminate what runs."""
    procs = list(getattr(ex, "_processes", {}).values())  # the executor keeps no public handle on them
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)


def _run_local(spec, todo, parts, jobs, progress):
    """Run tasks on ``jobs`` local processes, at most 2 x jobs in flight (so an interrupt stops at once).
    A worker that dies breaks the pool: the pool is restarted, the tasks that were in flight are rerun
    one at a time, and one that kills its worker again is recorded as failed; the sweep goes on."""
    from concurrent.futures.process import BrokenProcessPool

    if jobs <= 1:
        for p, r in todo:
            _write_part(parts, run_task(spec, p, r))
            progress.update()
        return
    queue = list(todo)
    queue.reverse()  # pop() from the end: keep the order
    suspects: list[tuple[int, int]] = []
    while queue or suspects:
        isolate = bool(suspects)
        ex = ProcessPoolExecutor(1 if isolate else jobs, initializer=_ignore_sigint)
        try:
            if isolate:  # one at a time: a task that kills its worker again is the culprit
                task = suspects.pop()
                try:
                    ex.submit(_task_in_process, (spec, *task, parts)).result()
                except BrokenProcessPool:
                    _failed_part(parts, *task, WORKER_DIED)
                progress.update()
                continue
            inflight: dict = {}
            broken = False
            while (queue or inflight) and not broken:
                while queue and len(inflight) < 2 * jobs:
                    task = queue.pop()
                    inflight[ex.submit(_task_in_process, (spec, *task, parts))] = task
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = inflight.pop(fut)
                    try:
                        fut.result()
                        progress.update()
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(task)
            if broken:
                suspects.extend(inflight.values())
        except BaseException:  # KeyboardInterrupt above all: stop the workers, keep the finished parts
            _stop(ex)
            raise
        finally:
            ex.shutdown(wait=False, cancel_futures=True)


def _run_dask(spec, todo, parts, progress, scheduler: str | None, local_workers: int | None):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("--dask", "Dask is not installed: pip install 'tlbsim[dask]'") from None
    import logging

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="10s", security=_dask_security())
    else:
        # No dashboard and no fixed port: the scheduler always starts an HTTP server (health and metrics
        # routes), on 8787 unless told otherwise; here it serves no route, on a random loopback port.
        import dask

        with dask.config.set({"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}):
            cluster = LocalCluster(n_workers=local_workers, threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
                                   host="127.0.0.1")
        client = Client(cluster)
    futures = []
    try:
        futures = [client.submit(run_task, spec, p, r, pure=False) for p, r in todo]
        for fut in as_completed(futures):
            _write_part(parts, fut.result())
            progress.update()
    except KeyboardInterrupt:  # stop quietly: the finished parts are kept; --resume finishes the rest
        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        client.cancel(futures)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _dask_security():
    """TLS for a remote Dask scheduler when TLBSIM_DASK_TLS_CA/_CERT/_KEY name the files (a Dask
    scheduler is an unauthenticated pickle channel otherwise: see the README)."""
    ca, cert, key = (os.environ.get(f"TLBSIM_DASK_TLS_{n}") for n in ("CA", "CERT", "KEY"))
    if not (ca or cert or key):
        return None
    if not (ca and cert and key):
        raise ConfigError("--dask-scheduler", "set all of TLBSIM_DASK_TLS_CA, _CERT and _KEY, or none")
    from distributed.security import Security

    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


# ---------------------------------------------------------------- driver
@dataclass
class SweepOutcome:
    directory: Path
    points: pd.DataFrame
    failed: list[tuple[int, int, str]]
    wall_s: float
    computed: int
    skipped: int


def run_sweep(spec: SweepSpec, out: str | Path, *, jobs: int | None = None, resume: bool = False,
              dask_scheduler: str | None = None, dask_local: int | None = None,
              progress: bool = True, retry_failed: bool = False) -> SweepOutcome:
    out = Path(out)
    parts = out / "parts"
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    if (out / "manifest.json").exists() or (parts.exists() and any(parts.glob("*.json"))):
        if not resume:
            raise ConfigError("--out", f"{out} already holds a sweep; use --resume to finish it or choose another")
        try:
            old = json.loads((out / "spec.json").read_text()) if (out / "spec.json").exists() else None
        except (OSError, ValueError) as e:
            raise ConfigError("--resume", f"{out}/spec.json is unreadable ({e}); cannot tell which sweep this is") \
                from None
        if old is not None and old != _jsonable(spec.source):
            raise ConfigError("--resume", f"{out} holds a different sweep spec; refusing to mix results "
                              "(move it away or choose another --out)")
    if dask_local is not None and dask_local < 1:
        raise ConfigError("--dask-local", "needs a number of workers >= 1")
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp"):  # half-written files of an interrupted or killed run
        stale.unlink(missing_ok=True)
    atomic_write_text(out / "spec.json", json.dumps(_jsonable(spec.source), indent=2))

    done = set()
    for f in parts.glob("*.json"):
        try:
            row = json.loads(f.read_text())
            if retry_failed and row.get("status") != "ok":
                continue  # --retry-failed: compute it again
            done.add((row["point"], row["replication"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable part (written by hand?): recompute it; the atomic rewrite replaces it
    todo = [t for t in spec.tasks() if t not in done]
    bar = Progress(len(todo), f"sweep {spec.name}", enabled=progress)
    t0 = time.perf_counter()
    if dask_scheduler or dask_local:
        _run_dask(spec, todo, parts, bar, dask_scheduler, dask_local)
    else:
        _run_local(spec, todo, parts, jobs or os.cpu_count() or 1, bar)
    wall = time.perf_counter() - t0
    return assemble(spec, out, wall, computed=len(todo), skipped=len(done))


def assemble(spec: SweepSpec, out: Path, wall_s: float, computed: int, skipped: int) -> SweepOutcome:
    parts = out / "parts"
    rows = [json.loads(f.read_text()) for f in sorted(parts.glob("*.json"))]
    points = pd.DataFrame(rows).sort_values(["point", "replication"]).reset_index(drop=True)
    done = {_part_name(int(r["point"]), int(r["replication"])) for r in rows}
    frames = [pd.read_parquet(f) for f in sorted(parts.glob("*.parquet"))
              if not f.name.endswith(VF_PART) and f.name.removesuffix(".parquet") in done]
    shootdowns = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    vf_frames = [pd.read_parquet(f) for f in sorted(parts.glob(f"*{VF_PART}"))
                 if f.name.removesuffix(VF_PART) in done]
    tables = {"points": "points.parquet", "shootdowns": "shootdowns.parquet"}
    atomic_write_parquet(points, out / "points.parquet")
    atomic_write_parquet(shootdowns, out / "shootdowns.parquet")
    if vf_frames:
        atomic_write_parquet(pd.concat(vf_frames, ignore_index=True), out / "vf.parquet")
        tables["vf"] = "vf.parquet"
    failed = [(int(r["point"]), int(r["replication"]), r["error"]) for r in rows if r["status"] != "ok"]
    import simpy

    manifest = {
        "kind": "tlbsim-sweep",
        "name": spec.name,
        "spec": _jsonable(spec.source),
        "base_config": spec.base,
        "points": [{"point": p.index, "overrides": p.overrides} for p in spec.points],
        "replications": spec.replications,
        "root_seed": spec.seed,
        "seeds": {str(r): str(spec.seed_for(r)) for r in range(spec.replications)},
        "versions": {"tlbsim": __version__, "python": sys.version.split()[0], "simpy": simpy.__version__,
                     "numpy": np.__version__, "pandas": pd.__version__},
        "git_revision": git_revision(),
        "wall_s_last_invocation": wall_s,
        "tasks_computed_last_invocation": computed,
        "tasks_resumed": skipped,
        "events_processed": int(points["events"].fillna(0).sum()) if "events" in points else 0,
        "failed": [{"point": p, "replication": r, "error": e} for p, r, e in failed],
        "tables": tables,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=_scalar))
    return SweepOutcome(out, points, failed, wall_s, computed, skipped)


def _jsonable(data):
    return json.loads(json.dumps(data, default=str))


def load_results(directory: str | Path) -> dict[str, pd.DataFrame]:
    """The tables of a sweep (points, shootdowns) or of a single run
    (shootdowns, vps, exits), as DataFrames keyed by name."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{directory} holds no tlbsim results (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        tables = dict(manifest["tables"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path} is not a tlbsim manifest ({type(e).__name__}: {e})") from None
    root = directory.resolve()
    out = {}
    for name, fname in tables.items():
        path = (directory / str(fname)).resolve()
        if root not in path.parents:  # a manifest names only files inside its own directory
            raise ValueError(f"{manifest_path}: table {name!r} points outside {directory} ({fname!r})")
        out[name] = pd.read_parquet(path)
    return out
