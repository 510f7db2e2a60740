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

Derived keys: a bare name (no dot) in [fixed], [grid] or [zip] is a study
parameter, not a config key; [derive] computes config keys from it and from
the point's other values, in the order written (arithmetic only: numbers,
dotted keys, study parameters, + - * / // %, min, max, round, int, float):

    [grid]
    "partition.vps" = [64, 1024]
    active_fraction = [0.0625, 1.0]    # a study parameter (a column of points.parquet)
    [derive]
    "workload.threads" = "max(1, round(partition.vps * active_fraction))"
    "workload.rate_per_ms" = "20.0 / workload.threads"

Seeds: replication r of every point runs with the seed
``SeedSequence(root, spawn_key=(r,))``: any point can be recomputed alone,
and every point (every strategy) of a replication sees the same random
workload -- common random numbers, so differences between points are not
drowned in sampling noise.

Output directory: ``parts/`` holds one finished (point, replication) at a
time, written atomically; ``points.parquet`` (one row per point and
replication: its parameters and summary, or its error), ``shootdowns.parquet``
(every shootdown, with point and replication) and ``manifest.json`` are
assembled from the parts at the end. ``--resume`` skips parts already there,
and refuses to mix configurations: each part records a hash of its run's
fully resolved configuration (and of the trace files it names), and a part
whose hash is not the one its point resolves to now stops the resume with
one line naming the first key that differs (``resolved.json`` keeps the base
config the finished parts were made with). ``--force`` recomputes every run
(it removes only the files a sweep writes).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
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
from tlbsim.config import Config, ConfigError, read_text, read_toml
from tlbsim.results import atomic_write_parquet, atomic_write_text, git_revision, manifest_kind

SPEC_KEYS = {"name", "base", "replications", "seed", "fixed", "grid", "zip", "derive", "description", "plot"}
SPEC_TABLES = ("fixed", "grid", "zip", "derive")
MAX_NAME = 100  # a sweep's name is a directory name (file systems allow 255 bytes)


@dataclass(frozen=True)
class Point:
    index: int
    overrides: dict[str, Any]  # config keys, derived ones resolved
    params: dict[str, Any] = field(default_factory=dict)  # the study parameters (bare names) it was made from


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
    def from_toml(cls, path: str | Path, replications: int | None = None,
                  sets: list[tuple[str, Any]] | None = None) -> SweepSpec:
        """The spec in ``path``; ``sets`` (``--set``) replace entries of it (``apply_spec_overrides``)."""
        path = Path(path)
        data = read_toml(path, "sweep spec")
        if sets:
            data = apply_spec_overrides(data, sets)
        return cls.from_dict(data, path.parent, replications)

    @classmethod
    def from_dict(cls, data: dict, here: Path = Path("."), replications: int | None = None) -> SweepSpec:
        unknown = set(data) - SPEC_KEYS
        if unknown:
            raise ConfigError(sorted(unknown)[0], "unknown sweep spec key")
        for key in (*SPEC_TABLES, "plot"):
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
        for a, b, first, second in (("fixed", "grid", fixed, grid), ("fixed", "zip", fixed, zipped),
                                    ("grid", "zip", grid, zipped)):
            both = sorted(set(first) & set(second))
            if both:  # the later table would win without a word
                raise ConfigError(f"{b}.{both[0]}", f"is also in [{a}]: give each key in one table (with "
                                  "--set, name the table that holds it)")
        lengths = {len(v) for v in zipped.values()}
        if len(lengths) > 1:
            raise ConfigError("zip", "all zipped lists must have the same length")
        derive = _derivations(dict(data.get("derive", {})), [*fixed, *grid, *zipped])
        zip_rows = [dict(zip(zipped, row, strict=True)) for row in zip(*zipped.values(), strict=True)] or [{}]
        grid_rows = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] or [{}]
        defaults = flatten(Config.from_dict(base).to_dict()) if derive else {}
        points = []
        for g in grid_rows:
            for z in zip_rows:
                merged = {**fixed, **g, **z}
                params = {k: v for k, v in merged.items() if "." not in k}
                overrides = {k: v for k, v in merged.items() if "." in k}
                overrides.update(_derive(derive, params, overrides, defaults, len(points)))
                points.append(Point(len(points), overrides, params))
        name = data.get("name", "sweep")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) \
                or name.startswith("."):
            raise ConfigError("name", f"a sweep name is letters, digits, '-', '_' and '.', not {name!r} "
                              "(it names the output directory under results/)")
        if len(name) > MAX_NAME:
            raise ConfigError("name", f"a sweep name is at most {MAX_NAME} characters, not {len(name)} "
                              "(it names the output directory under results/)")
        spec = cls(name, base, tuple(points), reps, seed,
                   tuple([*grid, *zipped, *derive]), source=data)
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


# ---------------------------------------------------------------- derived keys
_DERIVE_CALLS = {"min": min, "max": max, "round": round, "int": int, "float": float}


def _derivations(table: dict[str, Any], given: list[str]) -> dict[str, Any]:
    """[derive] parsed and checked before any point is made: {config key: expression tree}. Every
    bare name in [fixed] / [grid] / [zip] must be used by an expression (a typo is not a silent extra
    column), and a derived key is not also given."""
    import ast

    out: dict[str, Any] = {}
    used: set[str] = set()
    order = list(table)
    for position, (key, text) in enumerate(table.items()):
        where = f"derive.{key}"
        if "." not in key:
            raise ConfigError(where, "a derived key is a config key (section.key)")
        if key in given:
            raise ConfigError(where, "is also given in [fixed], [grid] or [zip]: give it once")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(where, "must be an arithmetic expression in a string")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            raise ConfigError(where, f"cannot read {text!r} as an expression") from None
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            name = _dotted(node)
            if name is not None:
                used.add(name)
                if name in table and order.index(name) >= position:  # it would read the base value
                    raise ConfigError(where, f"uses {name}, which is derived {'here' if name == key else 'later'}: "
                                      "derive a key before the expressions that use it")
            elif isinstance(node, ast.Name) and id(node) in called:
                pass  # min, max... checked at their call
            elif isinstance(node, ast.Call):
                if not (isinstance(node.func, ast.Name) and node.func.id in _DERIVE_CALLS) or node.keywords:
                    raise ConfigError(where, f"calls only {', '.join(_DERIVE_CALLS)} (positional arguments)")
            elif isinstance(node, ast.Constant):
                if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                    raise ConfigError(where, f"numbers only, not {node.value!r}")
            elif not isinstance(node, ast.Expression | ast.BinOp | ast.UnaryOp | ast.Add | ast.Sub | ast.Mult
                                | ast.Div | ast.FloorDiv | ast.Mod | ast.USub | ast.UAdd | ast.Load):
                raise ConfigError(where, f"arithmetic only (numbers, keys, + - * / // %, "
                                  f"{', '.join(_DERIVE_CALLS)}), not {type(node).__name__}")
        out[key] = tree
        used.add(key)
    for name in given:
        if "." not in name and name not in used:
            raise ConfigError(name, "a bare name is a study parameter, used by a [derive] expression; none uses "
                              "this one (a config key is section.key)")
    return out


def _dotted(node) -> str | None:
    """``partition.vps`` (an attribute chain on a name) or ``active_fraction`` as its name, else None."""
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or (not parts and node.id in _DERIVE_CALLS):
        return None
    return ".".join([node.id, *reversed(parts)])


def _derive(derive: dict[str, Any], params: dict, overrides: dict, defaults: dict, index: int) -> dict[str, Any]:
    """The derived keys' values at one point: names are looked up in its study parameters, its config
    keys, the keys derived before, then the base config's values."""
    import ast

    values: dict[str, Any] = {}

    def ev(node):
        name = _dotted(node)
        if name is not None:
            for table in (params, values, overrides, defaults):
                if name in table:
                    v = table[name]
                    if isinstance(v, bool) or not isinstance(v, int | float):
                        raise ValueError(f"{name} is {v!r}, not a number")
                    return v
            raise ValueError(f"{name} is neither a study parameter nor a config key")
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else +ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            op = type(node.op)
            return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                    ast.Div: lambda: a / b, ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}[op]()
        return _DERIVE_CALLS[node.func.id](*(ev(arg) for arg in node.args))

    for key, tree in derive.items():
        try:
            values[key] = ev(tree)
        except (ValueError, TypeError, ArithmeticError) as e:
            shown = {**params, **{k: v for k, v in overrides.items() if k in ast.unparse(tree)}}
            raise ConfigError(f"derive.{key}", f"point {index} {shown}: {e}") from None
    return values


def apply_spec_overrides(data: dict[str, Any], sets: list[tuple[str, Any]]) -> dict[str, Any]:
    """A spec's table with ``--set`` entries applied: ``grid.partition.vps`` = [64, 256] replaces the
    entry "partition.vps" of [grid] (``fixed.``, ``zip.``, ``derive.`` likewise), ``replications`` = 1
    a top-level value. The result is the spec a sweep records (a resume compares it)."""
    import copy

    data = copy.deepcopy(data)
    for key, value in sets:
        section, _, entry = key.partition(".")
        if section in SPEC_TABLES and entry:
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(section, f"[{section}] must be a table")
            table[entry] = value
        elif key in ("replications", "seed", "name", "description"):
            data[key] = value
        else:
            raise ConfigError(key, "a sweep --set names fixed.KEY, grid.KEY, zip.KEY, derive.KEY, replications, "
                              "seed, name or description")
    return data


# ---------------------------------------------------------------- what a run was made with
def config_hash(config: Config) -> str:
    """A hash of a run's fully resolved configuration and of the contents of the trace files it names:
    two runs with the same hash (and seed) are the same run."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for path in _input_files(config):
        h.update(f"\0{path}\0{file_digest(path)}".encode())
    return h.hexdigest()[:16]


def configs_digest(spec: SweepSpec) -> str:
    """One hash of every point's config_hash: whether any run of ``spec`` would be another run now."""
    h = hashlib.sha256()
    for point in spec.points:
        h.update(config_hash(spec.config(point)).encode())
    return h.hexdigest()[:16]


def _input_files(config: Config) -> list[str]:
    return [p for p in (config.workload.trace, config.vf.trace if config.vf.count else "") if p]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a regular file's contents; "missing" or "not a regular file" otherwise (never blocks
    on a FIFO or reads a device: the run itself reports those)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return "missing"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        h = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    except OSError:
        return "unreadable"
    finally:
        os.close(fd)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested table's values by dotted key ("partition.vps")."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _first_difference(old: dict, new: dict) -> str | None:
    """The first dotted key whose value differs, as "key = OLD in the finished runs, NEW now"."""
    a, b = flatten(old), flatten(new)
    unset = object()
    for key in [*b, *(k for k in a if k not in b)]:
        x, y = a.get(key, unset), b.get(key, unset)
        if x != y:
            x, y = ("(unset)" if v is unset else json.dumps(v, default=str) for v in (x, y))
            return f"{key} = {x} in the finished runs, {y} now"
    return None


# ---------------------------------------------------------------- one task
def run_task(spec: SweepSpec, point_index: int, replication: int) -> dict:
    """Run one (point, replication); never raises: errors are recorded."""
    from tlbsim.runner import simulate

    point = spec.points[point_index]
    seed = spec.seed_for(replication)
    row: dict[str, Any] = {"point": point_index, "replication": replication, "seed": str(seed), "config_hash": ""}
    row.update({k: _scalar(v) for k, v in point.overrides.items() if k in spec.varied})
    row.update({k: _scalar(v) for k, v in point.params.items() if k in spec.varied})
    t = time.perf_counter()
    try:
        config = spec.config(point)
        row["config_hash"] = config_hash(config)
        result = simulate(config, seed=seed)
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


def _worker_init(parent: int) -> None:
    """A local worker leaves Ctrl-C to the parent, which stops them (no traceback from every worker), and
    dies with the parent: a worker left behind by a parent killed with SIGKILL (or SIGTERM from outside)
    would idle on with its memory, holding the parent's stdout and stderr open (a caller waiting for
    end-of-output would wait forever). Linux: the parent-death signal; elsewhere a watchdog thread."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a forked worker inherits the CLI's SIGTERM handler, which would turn the parent's terminate() into an
    # exception inside the task (caught by the pool, the worker going on with its queue): die at once instead
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ppid = os.getppid()  # the sweep's process (or, started by a fork server, the server, which dies with it)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
                if os.getppid() != ppid or not _alive(parent):  # it died before the signal was armed
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid or not _alive(parent):
                os._exit(1)

    threading.Thread(target=watch, name="tlbsim-parent-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours to signal
        return True
    return True


WORKER_DIED = ("the worker process running it died (killed, e.g. by the out-of-memory killer?); "
               "rerun with --resume --retry-failed")


def _failed_part(parts: Path, spec: SweepSpec, point: int, rep: int, error: str) -> None:
    row = {"point": point, "replication": rep, "seed": "", "config_hash": config_hash(spec.config(spec.points[point])),
           "status": "error", "error": error, "traceback": "", "wall_s": 0.0}
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
        ex = ProcessPoolExecutor(1 if isolate else jobs, initializer=_worker_init, initargs=(os.getpid(),))
        try:
            if isolate:  # one at a time: a task that kills its worker again is the culprit
                task = suspects.pop()
                try:
                    ex.submit(_task_in_process, (spec, *task, parts)).result()
                except BrokenProcessPool:
                    _failed_part(parts, spec, *task, WORKER_DIED)
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


RECOMPUTE_HINT = "remove it or choose another --out to compute it again"
#: what a sweep writes in its directory (--force removes these and nothing else)
SWEEP_FILES = ("manifest.json", "points.parquet", "shootdowns.parquet", "vf.parquet", "spec.json", "resolved.json")
PART_FILE = re.compile(r"p\d{5,}_r\d{3,}(\.json|\.parquet|\.vf\.parquet)")
#: manifest kinds that are not sweeps, as the refusal to write a sweep over them names them
OTHER_RESULTS = {"tlbsim-run": "a single run's results (from `tlbsim run --out`)",
                 "tlbsim-run-replications": "a run's replications (from `tlbsim run --replications N --out`)",
                 "tlbsim-validation": "validation results (from `tlbsim validate`)",
                 "tlbsim-sensitivity": "a sensitivity study (from `tlbsim sensitivity`)"}


def run_sweep(spec: SweepSpec, out: str | Path, *, jobs: int | None = None, resume: bool = False,
              dask_scheduler: str | None = None, dask_local: int | None = None,
              progress: bool = True, retry_failed: bool = False, force: bool = False,
              recompute_hint: str = RECOMPUTE_HINT, announce=None) -> SweepOutcome:
    """Run every (point, replication) of ``spec`` not finished in ``out`` yet (``resume``), or all of
    them (a new ``out``, or ``force``). Every refusal (``out`` holds something else, or a sweep without
    ``resume``, or runs of another configuration) comes before anything is written; ``recompute_hint``
    ends the refusals (how to compute the sweep again). ``announce(to_compute, kept)`` is called once the
    directory is accepted, before the runs."""
    out = Path(out)
    parts = out / "parts"
    if dask_local is not None and dask_local < 1:
        raise ConfigError("--dask-local", "needs a number of workers >= 1")
    if force and (resume or retry_failed):
        raise ConfigError("--force", "recomputes every run and --resume keeps the finished ones: give one of them")
    try:
        done = _kept_runs(spec, out, resume=resume, force=force, retry_failed=retry_failed, hint=recompute_hint)
    except OSError as e:  # a name too long, a directory we may not read
        raise ConfigError("--out", f"cannot use {out} for the sweep: {e.strerror or e}") from None
    try:
        parts.mkdir(parents=True, exist_ok=True)
        if force:
            _remove_sweep_files(out)
        for stale in parts.glob(".*.tmp"):  # half-written files of an interrupted or killed run
            stale.unlink(missing_ok=True)
        atomic_write_text(out / "spec.json", json.dumps(_jsonable(spec.source), indent=2))
        atomic_write_text(out / "resolved.json", json.dumps(_resolved_inputs(spec), indent=2, default=str))
    except OSError as e:
        raise ConfigError("--out", f"cannot write the sweep to {out}: {e.strerror or e}") from None
    todo = [t for t in spec.tasks() if t not in done]
    if announce is not None:
        announce(len(todo), len(done))
    bar = Progress(len(todo), f"sweep {spec.name}", enabled=progress)
    t0 = time.perf_counter()
    if dask_scheduler or dask_local:
        _run_dask(spec, todo, parts, bar, dask_scheduler, dask_local)
    else:
        _run_local(spec, todo, parts, jobs or os.cpu_count() or 1, bar)
    wall = time.perf_counter() - t0
    return assemble(spec, out, wall, computed=len(todo), skipped=len(done))


def describe_other_results(out: Path) -> str | None:
    """What ``out`` holds when it holds tlbsim results other than a sweep's (a run's, a validation's...),
    in words; None for a sweep, an empty or a new directory."""
    manifest = out / "manifest.json"
    if manifest.exists() or manifest.is_symlink():
        kind = manifest_kind(manifest)
        if kind is None:
            return "an unreadable manifest.json (not a sweep's that tlbsim can read)"
        if kind == "tlbsim-sweep":
            return None
        return OTHER_RESULTS.get(kind, f"results of another kind ({kind!r} in manifest.json)")
    if not (out / "parts").is_dir() and any((out / f).exists() for f in ("vps.parquet", "exits.parquet",
                                                                          "replication-0")):
        return "a single run's tables (from `tlbsim run --out`; it has no manifest.json: interrupted?)"
    return None


def _kept_runs(spec: SweepSpec, out: Path, *, resume: bool, force: bool, retry_failed: bool,
               hint: str) -> set[tuple[int, int]]:
    """The finished (point, replication)s of ``out`` that this sweep keeps, or a ConfigError saying why
    ``out`` cannot take this sweep (nothing is written here)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    if not out.is_dir():
        return set()
    other = describe_other_results(out)
    if other:
        raise ConfigError("--out", f"{out} holds {other}, not a sweep; a sweep will not write over it: "
                          "choose another --out")
    parts = out / "parts"
    if not ((out / "manifest.json").exists() or (parts.is_dir() and any(parts.glob("*.json")))):
        return set()
    if force:
        return set()
    if not resume:
        raise ConfigError("--out", f"{out} already holds a sweep; use --resume to finish it, or {hint}")
    spec_file = out / "spec.json"
    try:
        old = json.loads(read_text(spec_file, "sweep spec record")) if spec_file.exists() else None
    except (ConfigError, ValueError) as e:
        raise ConfigError("--resume", f"{spec_file} is unreadable ({e}); cannot tell which sweep this is: "
                          f"{hint}") from None
    if old is not None and old != _jsonable(spec.source):
        raise ConfigError("--resume", f"{out} holds a different sweep spec; refusing to mix results: {hint}")
    tasks = set(spec.tasks())
    hashes: dict[int, str] = {}
    kept = set()
    for (p, r), row in sorted(_finished_parts(parts).items()):
        if (p, r) not in tasks or (retry_failed and row.get("status") != "ok"):
            continue  # not this sweep's, or --retry-failed: computed again
        if not row.get("config_hash"):
            continue  # written before tlbsim recorded configurations: computed again, not mixed in
        if p not in hashes:
            hashes[p] = config_hash(spec.config(spec.points[p]))
        if row["config_hash"] != hashes[p]:
            raise ConfigError("--resume", f"{out} holds runs made with another configuration than this sweep's "
                              f"now: {_what_changed(spec, out, p)} (point {p}); refusing to mix them: {hint}")
        kept.add((p, r))
    return kept


def _finished_parts(parts: Path) -> dict[tuple[int, int], dict]:
    """Every readable part record of ``parts``, by (point, replication); an unreadable one (written by
    hand?) is left out: it is computed again and its atomic rewrite replaces it."""
    out = {}
    for f in parts.glob("*.json") if parts.is_dir() else ():
        try:
            row = json.loads(read_text(f, "sweep part"))
            out[(int(row["point"]), int(row["replication"]))] = row
        except (ConfigError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return out


def _resolved_inputs(spec: SweepSpec) -> dict:
    """What a sweep's runs are made from besides its spec: the base config and the trace files named
    (resolved.json; a refused --resume names the first key that differs from it)."""
    files: dict[str, str] = {}
    base = flatten(spec.base)
    for point in spec.points:
        named = {**base, **point.overrides}
        for key in ("workload.trace", "vf.trace"):
            path = named.get(key)
            if isinstance(path, str) and path and path not in files:
                files[path] = file_digest(path)
    return {"base": spec.base, "files": files, "tlbsim": __version__}


def _what_changed(spec: SweepSpec, out: Path, p: int) -> str:
    """Why point ``p`` resolves to another configuration than the finished runs recorded, in words."""
    from tlbsim.config import apply_overrides

    now = spec.config(spec.points[p])
    try:
        old = json.loads(read_text(out / "resolved.json", "sweep inputs record"))
        old_base, old_files = dict(old["base"]), dict(old.get("files", {}))
    except (ConfigError, ValueError, KeyError, TypeError):
        return f"its resolved configuration hashes to {config_hash(now)} now"
    try:
        diff = _first_difference(Config.from_dict(apply_overrides(old_base, spec.points[p].overrides)).to_dict(),
                                 now.to_dict())
    except ConfigError:  # the old base is not valid any more: compare the base configs as written
        diff = _first_difference(old_base, spec.base)
    if diff:
        return diff
    for path in _input_files(now):
        if old_files.get(path, file_digest(path)) != file_digest(path):
            return f"the contents of {path} changed"
    return (f"the same keys resolve differently with this tlbsim (a default changed since tlbsim "
            f"{old.get('tlbsim', '?')} made them)")


def _remove_sweep_files(out: Path) -> None:
    """--force: remove what a sweep wrote in ``out`` (its tables, manifest and parts), nothing else."""
    (out / "manifest.json").unlink(missing_ok=True)  # first: the directory no longer claims a finished sweep
    for name in SWEEP_FILES:
        (out / name).unlink(missing_ok=True)
    parts = out / "parts"
    for f in parts.iterdir() if parts.is_dir() else ():
        if PART_FILE.fullmatch(f.name) and (f.is_file() or f.is_symlink()):
            f.unlink(missing_ok=True)


def assemble(spec: SweepSpec, out: Path, wall_s: float, computed: int, skipped: int) -> SweepOutcome:
    parts = out / "parts"
    tasks = set(spec.tasks())  # parts of another sweep once in this directory are not this one's
    rows = [row for task, row in sorted(_finished_parts(parts).items()) if task in tasks]
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
        "points": [{"point": p.index, "overrides": p.overrides, **({"params": p.params} if p.params else {})}
                   for p in spec.points],
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
        manifest = json.loads(read_text(manifest_path, "manifest"))
        tables = dict(manifest["tables"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # ConfigError is a ValueError
        raise ValueError(f"{manifest_path} is not a tlbsim manifest ({type(e).__name__}: {e})") from None
    root = directory.resolve()
    out = {}
    for name, fname in tables.items():
        path = (directory / str(fname)).resolve()
        if root not in path.parents:  # a manifest names only files inside its own directory
            raise ValueError(f"{manifest_path}: table {name!r} points outside {directory} ({fname!r})")
        out[name] = pd.read_parquet(path)
    return out
