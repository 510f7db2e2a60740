"""Which parameters move an answer (``tlbsim sensitivity SPEC``).

A spec (TOML) names a base config, the variants whose comparison is the
answer, the metrics (a summary metric of one variant, or the ratio of two),
and the parameters to vary with their plausible ranges::

    name = "policy_sensitivity"
    base = "configs/default.toml"
    method = "morris"            # "morris" (screening, many parameters) or "sobol" (Saltelli)
    samples = 10                 # Morris trajectories, or Sobol base samples N
    seed = 7                     # SALib's sampling seed and the simulations' root seed
    replications = 1             # runs per sample point (common random numbers across samples)
    [fixed]                      # overrides for every run
    [variants]                   # what is compared, each a table of overrides
    mask = { "workload.policy" = "mask" }
    ipi = { "workload.policy" = "ipi" }
    [[metric]]
    name = "mask_over_ipi"
    metric = "ops_per_s"
    numerator = "mask"
    denominator = "ipi"          # optional: without it, the numerator's metric itself
    [[parameter]]
    key = "costs.vipi_send_us"
    low = 1.2
    high = 2.5
    source = "calibration: 1.2-2.5"

Every sample point runs each variant through the sweep machinery (so
``--jobs``, ``--dask-*`` and ``--resume`` work); the indices come from SALib
(Morris: mu*, its bootstrap 95 % interval, sigma; Sobol: S1 and ST with
their intervals) and are drawn as bars with those intervals, largest first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlbsim import __version__
from tlbsim.config import Config, ConfigError, apply_overrides
from tlbsim.results import atomic_write_parquet, atomic_write_text, git_revision
from tlbsim.specs import read_spec

SPEC_KEYS = {"name", "description", "base", "method", "samples", "seed", "replications", "fixed", "variants",
             "metric", "parameter", "levels"}


@dataclass(frozen=True)
class Parameter:
    key: str
    low: float
    high: float
    integer: bool
    source: str


@dataclass(frozen=True)
class Metric:
    name: str
    metric: str
    numerator: str
    denominator: str


@dataclass(frozen=True)
class SensitivitySpec:
    name: str
    path: Path
    base: dict[str, Any]
    method: str
    samples: int
    seed: int
    replications: int
    levels: int
    fixed: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    metrics: tuple[Metric, ...]
    parameters: tuple[Parameter, ...]
    raw: dict[str, Any] = field(default_factory=dict)

    def problem(self) -> dict:
        return {"num_vars": len(self.parameters), "names": [p.key for p in self.parameters],
                "bounds": [[p.low, p.high] for p in self.parameters]}

    def sample(self) -> np.ndarray:
        if self.method == "morris":
            from SALib.sample import morris

            return morris.sample(self.problem(), self.samples, num_levels=self.levels, seed=self.seed)
        from SALib.sample import sobol

        return sobol.sample(self.problem(), self.samples, calc_second_order=False, seed=self.seed)

    def overrides_of(self, row: np.ndarray) -> dict[str, Any]:
        out = {}
        for p, value in zip(self.parameters, row, strict=True):
            out[p.key] = int(round(value)) if p.integer else float(value)
        return out


def _field_type(key: str):
    """The Python type of a dotted config key (for rounding integer parameters), or a ConfigError."""
    node: Any = Config()
    for part in key.split("."):
        if not hasattr(node, part):
            raise ConfigError(key, "unknown config key")
        node = getattr(node, part)
    return type(node)


def load_spec(path: str | Path) -> SensitivitySpec:
    path = Path(path)
    data, name, base = read_spec(path, "sensitivity spec", SPEC_KEYS)
    method = data.get("method", "morris")
    if method not in ("morris", "sobol"):
        raise ConfigError("method", "must be 'morris' or 'sobol'")
    samples = data.get("samples", 10)
    if not isinstance(samples, int) or isinstance(samples, bool) or not 2 <= samples <= 4096:
        raise ConfigError("samples", "an integer in 2..4096")
    if method == "sobol" and samples & (samples - 1):
        raise ConfigError("samples", "Sobol sampling needs a power of two")
    levels = data.get("levels", 4)
    if not isinstance(levels, int) or not 2 <= levels <= 16 or levels % 2:
        raise ConfigError("levels", "an even integer in 2..16 (Morris grid levels)")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError("seed", "an integer in 0..2^32-1")
    reps = data.get("replications", 1)
    if not isinstance(reps, int) or isinstance(reps, bool) or not 1 <= reps <= 100:
        raise ConfigError("replications", "an integer in 1..100")
    fixed = data.get("fixed", {})
    variants = data.get("variants", {"all": {}})
    if not isinstance(fixed, dict) or not isinstance(variants, dict) or not variants:
        raise ConfigError("variants", "[fixed] and [variants] are tables (variants: name = { key = value })")
    for vname, v in variants.items():
        if not isinstance(v, dict):
            raise ConfigError(f"variants.{vname}", "must be a table of overrides")
    metrics = []
    for i, m in enumerate(data.get("metric", [])):
        if not isinstance(m, dict) or not isinstance(m.get("metric"), str) or m.get("numerator") not in variants:
            raise ConfigError(f"metric[{i}]", "needs metric = '<summary metric>' and numerator = '<variant>'")
        den = m.get("denominator", "")
        if den and den not in variants:
            raise ConfigError(f"metric[{i}].denominator", f"no variant {den!r}")
        metrics.append(Metric(str(m.get("name", f"metric{i}")), m["metric"], m["numerator"], den))
    if not metrics:
        raise ConfigError("metric", "needs at least one [[metric]]")
    params = []
    for i, p in enumerate(data.get("parameter", [])):
        if not isinstance(p, dict) or not isinstance(p.get("key"), str):
            raise ConfigError(f"parameter[{i}]", "needs key = '<dotted config key>', low and high")
        low, high = p.get("low"), p.get("high")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or not low < high:
            raise ConfigError(f"parameter[{i}]", f"{p['key']}: needs finite low < high")
        tp = _field_type(p["key"])
        if tp not in (int, float):
            raise ConfigError(p["key"], "only numeric keys can be varied")
        params.append(Parameter(p["key"], float(low), float(high), tp is int, str(p.get("source", ""))))
    if len(params) < 2:
        raise ConfigError("parameter", "needs at least two [[parameter]]s")
    if len({p.key for p in params}) != len(params):
        raise ConfigError("parameter", "a key is varied twice")
    spec = SensitivitySpec(name, path, base, method, samples, seed, reps, levels, dict(fixed), dict(variants),
                           tuple(metrics), tuple(params), raw=data)
    # validate the corners up front: a bad range fails before any run
    for corner in ([p.low for p in params], [p.high for p in params]):
        for v in variants.values():
            try:
                Config.from_dict(apply_overrides(base, {**fixed, **v, **spec.overrides_of(np.array(corner))}))
            except ConfigError as e:
                raise ConfigError(e.key, f"{path}: at a corner of the ranges: {str(e).split(': ', 1)[-1]}") from None
    return spec


def sweep_spec(spec: SensitivitySpec, samples: np.ndarray):
    """The sweep that runs every (sample, variant)."""
    from tlbsim.sweep import Point, SweepSpec

    points = []
    for row in samples:
        over = spec.overrides_of(row)
        for v in spec.variants.values():
            points.append(Point(len(points), {**spec.fixed, **v, **over}))
    varied = tuple(sorted({*(p.key for p in spec.parameters), *(k for v in spec.variants.values() for k in v)}))
    return SweepSpec(f"sensitivity-{spec.name}", spec.base, tuple(points), spec.replications, spec.seed, varied,
                     source={"sensitivity_spec": spec.raw})


def outputs(spec: SensitivitySpec, samples: np.ndarray, points: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each metric at each sample point (mean over replications)."""
    n_var = len(spec.variants)
    names = list(spec.variants)
    ok = points[points["status"] == "ok"]
    out = {}
    for m in spec.metrics:
        if m.metric not in ok:
            raise ConfigError("metric", f"the summary has no metric {m.metric!r}")
        values = ok.pivot_table(index="point", columns="replication", values=m.metric, aggfunc="first")
        y = np.full(len(samples), np.nan)
        for i in range(len(samples)):
            num = values.loc[i * n_var + names.index(m.numerator)] if i * n_var + names.index(m.numerator) in \
                values.index else None
            if num is None:
                continue
            if m.denominator:
                j = i * n_var + names.index(m.denominator)
                if j not in values.index:
                    continue
                y[i] = float((num / values.loc[j]).mean())
            else:
                y[i] = float(num.mean())
        out[m.name] = y
    return out


def analyze(spec: SensitivitySpec, samples: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    if np.isnan(y).any():
        raise ConfigError("metric", f"{int(np.isnan(y).sum())} sample points gave no value (failed or empty runs)")
    problem = spec.problem()
    if spec.method == "morris":
        from SALib.analyze import morris

        r = morris.analyze(problem, samples, y, num_levels=spec.levels, conf_level=0.95, seed=spec.seed)
        return pd.DataFrame({"parameter": problem["names"], "mu_star": r["mu_star"],
                             "mu_star_conf": r["mu_star_conf"], "mu": r["mu"], "sigma": r["sigma"]})
    from SALib.analyze import sobol

    r = sobol.analyze(problem, y, calc_second_order=False, conf_level=0.95, seed=spec.seed)
    return pd.DataFrame({"parameter": problem["names"], "S1": r["S1"], "S1_conf": r["S1_conf"], "ST": r["ST"],
                         "ST_conf": r["ST_conf"]})


def draw_figure(spec: SensitivitySpec, indices: pd.DataFrame):
    """One panel of bars per metric (Morris mu* or Sobol indices, 95 % intervals), every label inside
    the figure (constrained layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(indices["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 0.32 * len(spec.parameters) + 1.6),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], metrics, strict=True):
        d = indices[indices["metric"] == name]
        if spec.method == "morris":
            d = d.sort_values("mu_star")
            ax.barh(d["parameter"], d["mu_star"], xerr=d["mu_star_conf"], capsize=3, color="#1f77b4")
            ax.set_xlabel("Morris mu* = mean |elementary effect| (95 % bootstrap CI)", fontsize=8)
        else:
            d = d.sort_values("ST")
            y = np.arange(len(d))
            ax.barh(y + 0.2, d["ST"], height=0.4, xerr=d["ST_conf"], capsize=3, label="total order ST")
            ax.barh(y - 0.2, d["S1"], height=0.4, xerr=d["S1_conf"], capsize=3, label="first order S1")
            ax.set_yticks(y, d["parameter"])
            ax.set_xlabel("Sobol index (95 % CI)")
            ax.legend(fontsize=7)
        m = next(x for x in spec.metrics if x.name == name)
        what = f"{m.metric}({m.numerator}) / {m.metric}({m.denominator})" if m.denominator else \
            f"{m.metric}({m.numerator})"
        ax.set_title(f"{name}: {what}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"Sensitivity: {spec.name} ({spec.method}, {spec.samples} "
                 f"{'trajectories' if spec.method == 'morris' else 'base samples'})", fontsize=10)
    return fig


def figure(spec: SensitivitySpec, indices: pd.DataFrame, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = draw_figure(spec, indices)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec.name}.png"
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path


def run(spec: SensitivitySpec, out: Path, jobs: int | None = None, resume: bool = False, progress: bool = True,
        dask_scheduler: str | None = None, dask_local: int | None = None) -> tuple[pd.DataFrame, Path]:
    from tlbsim.sweep import run_sweep

    samples = spec.sample()
    outcome = run_sweep(sweep_spec(spec, samples), out / "runs", jobs=jobs, resume=resume, progress=progress,
                        dask_scheduler=dask_scheduler, dask_local=dask_local)
    ys = outputs(spec, samples, outcome.points)
    frames = []
    for name, y in ys.items():
        d = analyze(spec, samples, y)
        d.insert(0, "metric", name)
        d["output_mean"] = float(np.mean(y))
        d["output_min"], d["output_max"] = float(np.min(y)), float(np.max(y))
        frames.append(d)
    indices = pd.concat(frames, ignore_index=True)
    atomic_write_parquet(indices, out / "indices.parquet")
    sample_table = pd.DataFrame(samples, columns=[p.key for p in spec.parameters])
    for name, y in ys.items():
        sample_table[name] = y
    atomic_write_parquet(sample_table, out / "samples.parquet")
    path = figure(spec, indices, out / "figures")
    manifest = {"kind": "tlbsim-sensitivity", "name": spec.name, "spec": json.loads(json.dumps(spec.raw, default=str)),
                "method": spec.method, "samples": int(len(samples)), "runs": int(len(outcome.points)),
                "failed": len(outcome.failed), "version": __version__, "git_revision": git_revision(),
                "tables": {"indices": "indices.parquet", "samples": "samples.parquet"}, "figure": str(path)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return indices, path


def format_indices(indices: pd.DataFrame) -> str:
    lines = []
    for name, d in indices.groupby("metric", sort=False):
        lines.append(f"{name} (over the samples: {d['output_min'].iloc[0]:.4g} .. {d['output_max'].iloc[0]:.4g}, "
                     f"mean {d['output_mean'].iloc[0]:.4g})")
        if "mu_star" in d:
            for r in d.sort_values("mu_star", ascending=False).itertuples():
                lines.append(f"  {r.parameter:36s} mu* {r.mu_star:9.4g} +- {r.mu_star_conf:<9.3g} sigma {r.sigma:9.4g}")
        else:
            for r in d.sort_values("ST", ascending=False).itertuples():
                lines.append(f"  {r.parameter:36s} ST {r.ST:7.3f} +- {r.ST_conf:<6.3f} "
                             f"S1 {r.S1:7.3f} +- {r.S1_conf:.3f}")
    return "\n".join(lines)
