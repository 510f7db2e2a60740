"""Regression checks of simulated latency against committed baselines (CI gate).

Scenarios live in ``<baseline dir>/scenarios.toml`` (users add their own
there); each has a baseline ``<baseline dir>/<name>.json``. Two tiers:

- exact: one run at a fixed seed; every metric must equal the baseline to
  float round-off (relative 1e-9). Any change of behaviour is caught.
- statistical: R replications; replication r uses the seed
  SeedSequence(root, spawn_key=(r,)). With the baseline's seeds the
  comparison is paired (common random numbers): per-replication differences,
  their mean and a 95 % t-interval. With other seeds (``--seed``) it is
  unpaired (Welch). A metric is flagged only when the interval excludes zero
  *and* the relative change exceeds its practical threshold (default 5 %).
  Noise alone does not fail the check.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlbsim import __version__
from tlbsim.config import Config, ConfigError, apply_overrides, read_toml
from tlbsim.model import rng
from tlbsim.results import atomic_write_text, git_revision
from tlbsim.stats import t_quantile

METRICS = ("latency_mean_us", "latency_p50_us", "latency_p99_us", "suspensions_per_shootdown",
           "guest_work_fraction", "shootdowns_completed", "ops_per_s")
#: measured too when the scenario has VFs (vf.count > 0)
VF_METRICS = ("vf_latency_mean_us", "vf_latency_p99_us", "vf_coalescing_ratio")
DEFAULT_THRESHOLD = 0.05
EXACT_RTOL = 1e-9
FAMILY_CONFIDENCE = 0.95


class BaselineError(Exception):
    """A baseline or the scenario file is missing or unreadable (exit 2)."""


def t_crit(df: float, comparisons: int) -> float:
    """Two-sided critical t for a simultaneous (Bonferroni) confidence of
    FAMILY_CONFIDENCE over ``comparisons`` intervals."""
    if df < 1:
        return math.inf
    alpha = (1.0 - FAMILY_CONFIDENCE) / max(1, comparisons)
    return t_quantile(1.0 - alpha / 2.0, df)


@dataclass(frozen=True)
class Scenario:
    name: str
    config: Config
    seed: int = 0
    replications: int = 8
    thresholds: dict[str, float] = field(default_factory=dict)
    description: str = ""

    def threshold(self, metric: str) -> float:
        return self.thresholds.get(metric, DEFAULT_THRESHOLD)

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS + (VF_METRICS if self.config.vf.count else ())


def load_scenarios(directory: Path, overrides: dict[str, Any] | None = None) -> list[Scenario]:
    path = directory / "scenarios.toml"
    try:
        data = read_toml(path, "scenario file")
    except ConfigError as e:
        raise BaselineError(str(e).removeprefix(": ")) from None
    out = []
    scenarios = data.get("scenario", {})
    if not isinstance(scenarios, dict):
        raise BaselineError(f"{path}: 'scenario' must hold [scenario.NAME] tables")
    for name, s in scenarios.items():
        if not isinstance(s, dict):
            raise BaselineError(f"{path}: scenario.{name} must be a table")
        bad = set(s) - {"config", "set", "seed", "replications", "thresholds", "description"}
        if bad:
            raise BaselineError(f"scenario {name}: unknown key {sorted(bad)[0]!r}")
        for key, tp in (("config", str), ("set", dict), ("thresholds", dict), ("description", str)):
            if key in s and not isinstance(s[key], tp):
                raise BaselineError(f"scenario {name}: {key} must be a {'table' if tp is dict else 'string'}")
        for key, low in (("seed", 0), ("replications", 2)):
            v = s.get(key, low)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v < 2**63:
                raise BaselineError(f"scenario {name}: {key} must be an integer >= {low}"
                                    + (" (a statistical tier needs two replications)" if key == "replications" else ""))
        for metric, thr in s.get("thresholds", {}).items():
            if not isinstance(thr, int | float) or isinstance(thr, bool) or not 0 < thr < 10:
                raise BaselineError(f"scenario {name}: threshold of {metric} must be a fraction in (0, 10)")
        base: dict[str, Any] = {}
        if "config" in s:
            try:
                base = read_toml((directory / s["config"]).resolve(), "base config")
            except ConfigError as e:
                raise BaselineError(f"scenario {name}: {str(e).removeprefix(': ')}") from None
        try:
            cfg = Config.from_dict(apply_overrides(base, {**s.get("set", {}), **(overrides or {}),
                                                           "run.check_invariants": True}))
        except ConfigError as e:
            raise ConfigError(e.key, f"scenario {name}: {str(e).split(': ', 1)[-1]}") from None
        unknown = set(s.get("thresholds", {})) - set(METRICS) - set(VF_METRICS)
        if unknown:
            raise BaselineError(f"scenario {name}: thresholds for unknown metrics {sorted(unknown)}")
        out.append(Scenario(name, cfg, int(s.get("seed", 0)), int(s.get("replications", 8)),
                            dict(s.get("thresholds", {})), s.get("description", "")))
    if not out:
        raise BaselineError(f"{path} defines no [scenario.NAME] tables")
    return out


def metrics_of(config: Config, seed: int) -> dict[str, float]:
    from tlbsim.runner import simulate

    s = simulate(config, seed=seed).summary
    n = max(1, int(s["shootdowns_completed"]))
    vf = {m: float(s[m]) for m in VF_METRICS} if config.vf.count else {}
    return {**vf,
        "latency_mean_us": float(s["latency_mean_us"]),
        "latency_p50_us": float(s["latency_p50_us"]),
        "latency_p99_us": float(s["latency_p99_us"]),
        "suspensions_per_shootdown": float(s["suspensions"]) / n,
        "guest_work_fraction": float(s["guest_work_fraction"]),
        "shootdowns_completed": float(s["shootdowns_completed"]),
        "ops_per_s": float(s["ops_per_s"]),
    }


def measure(scenario: Scenario, tiers: set[str], root_seed: int | None = None) -> dict:
    out: dict[str, Any] = {"scenario": scenario.name}
    if "exact" in tiers:
        out["exact"] = {"seed": scenario.seed, "metrics": metrics_of(scenario.config, scenario.seed)}
    if "statistical" in tiers:
        root = scenario.seed if root_seed is None else root_seed
        seeds = [rng.replication_seed(root, r) for r in range(scenario.replications)]
        runs = [metrics_of(scenario.config, s) for s in seeds]
        out["statistical"] = {"root_seed": root, "seeds": [str(s) for s in seeds],
                              "metrics": {m: [r[m] for r in runs] for m in scenario.metrics}}
    return out


# ---------------------------------------------------------------- baselines
def baseline_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.json"


def read_baseline(directory: Path, name: str) -> dict:
    path = baseline_path(directory, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"no baseline for scenario {name} ({path}); create it with tlbsim check --update") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaselineError(f"baseline {path} is corrupt ({e}); fix or regenerate it with --update") from None
    try:
        if data["scenario"] != name:
            raise KeyError("scenario")
        for m in METRICS:
            float(data["exact"]["metrics"][m])
            [float(v) for v in data["statistical"]["metrics"][m]]
        for m in data["statistical"]["metrics"]:
            [float(v) for v in data["statistical"]["metrics"][m]]
        data["statistical"]["seeds"]
    except (KeyError, TypeError, ValueError) as e:
        raise BaselineError(f"baseline {path} is corrupt (missing or bad field {e}); regenerate it with --update") \
            from None
    return data


def write_baseline(directory: Path, scenario: Scenario, measured: dict) -> Path:
    data = {"scenario": scenario.name, "description": scenario.description,
            "tlbsim_version": __version__, "git_revision": git_revision(),
            "config": scenario.config.to_dict(), **measured}
    path = baseline_path(directory, scenario.name)
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=True))
    return path


# ---------------------------------------------------------------- comparison
@dataclass
class Row:
    scenario: str
    tier: str
    metric: str
    baseline: float
    current: float
    change_pct: float
    lo: float = math.nan
    hi: float = math.nan
    threshold_pct: float = math.nan
    verdict: str = "ok"

    @property
    def failed(self) -> bool:
        return self.verdict not in ("ok", "noise")

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def _pct(new: float, old: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / abs(old) * 100.0


def _same(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=EXACT_RTOL, abs_tol=1e-12)


def compare(scenario: Scenario, baseline: dict, current: dict, comparisons: int = 1) -> list[Row]:
    """Rows for one scenario. ``comparisons``: how many statistical intervals the
    whole check computes (the Bonferroni family), so that noise alone fails the
    whole check with probability at most 1 - FAMILY_CONFIDENCE."""
    rows = []

    def common(tier: str) -> list[str]:
        """Metrics measured on both sides; one-sided ones become CHANGED rows
        (e.g. an override that turned the VF model on or off)."""
        old, new = baseline[tier]["metrics"], current[tier]["metrics"]
        for m in [m for m in old if m not in new] + [m for m in new if m not in old]:
            rows.append(Row(scenario.name, tier, m, math.nan, math.nan, math.nan,
                            verdict="CHANGED (" + ("no longer measured)" if m in old else "not in the baseline)")))
        return [m for m in old if m in new]

    if "exact" in current:
        for m in common("exact"):
            b, c = float(baseline["exact"]["metrics"][m]), current["exact"]["metrics"][m]
            same = _same(b, c)
            change = 0.0 if same and math.isnan(b) else _pct(c, b)
            rows.append(Row(scenario.name, "exact", m, b, c, change, verdict="ok" if same else "CHANGED"))
    if "statistical" in current:
        paired = current["statistical"]["seeds"] == baseline["statistical"]["seeds"]
        for m in common("statistical"):
            b = np.asarray(baseline["statistical"]["metrics"][m], dtype=float)
            c = np.asarray(current["statistical"]["metrics"][m], dtype=float)
            thr = scenario.threshold(m) * 100
            if paired and not np.array_equal(np.isnan(b), np.isnan(c)) or (
                    not paired and (np.isnan(b).all() != np.isnan(c).all())):
                # a metric became undefined or defined (e.g. no shootdown completed in a replication)
                rows.append(Row(scenario.name, "statistical", m, float(np.nanmean(b)) if (~np.isnan(b)).any()
                                else math.nan, float(np.nanmean(c)) if (~np.isnan(c)).any() else math.nan,
                                math.nan, threshold_pct=thr, verdict="CHANGED (undefined in some runs)"))
                continue
            if paired:
                keep = ~np.isnan(b)
                b, c = b[keep], c[keep]
            else:
                b, c = b[~np.isnan(b)], c[~np.isnan(c)]
            if len(b) < 2 or len(c) < 2:
                same = np.array_equal(b, c)
                rows.append(Row(scenario.name, "statistical", m, float(b.mean()) if len(b) else math.nan,
                                float(c.mean()) if len(c) else math.nan, 0.0 if same else math.nan,
                                threshold_pct=thr, verdict="ok" if same else "CHANGED (too few defined runs)"))
                continue
            if paired:
                d = c - b
                mean = float(d.mean())
                half = t_crit(len(d) - 1, comparisons) * float(d.std(ddof=1)) / math.sqrt(len(d))
            else:  # Welch
                vb, vc = b.var(ddof=1) / len(b), c.var(ddof=1) / len(c)
                mean = float(c.mean() - b.mean())
                se = math.sqrt(vb + vc)
                df = (vb + vc) ** 2 / ((vb**2 / (len(b) - 1)) + (vc**2 / (len(c) - 1))) if se > 0 else math.inf
                half = t_crit(df, comparisons) * se
            lo, hi = mean - half, mean + half
            base_mean = float(b.mean())
            change = _pct(base_mean + mean, base_mean)
            excludes_zero = lo > 0 or hi < 0
            if excludes_zero and abs(change) > thr:
                verdict = "CHANGED"
            elif excludes_zero:
                verdict = "ok"  # real but below the practical threshold
            else:
                verdict = "noise" if mean != 0 else "ok"
            rows.append(Row(scenario.name, "statistical" + ("" if paired else " (unpaired)"), m, base_mean,
                            float(c.mean()), change, lo, hi, thr, verdict))
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'scenario':<22} {'tier':<12} {'metric':<26} {'baseline':>12} {'current':>12} {'change %':>9} " \
           f"{'simultaneous 95% interval':>32}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        interval = "" if math.isnan(r.lo) else f"[{r.lo:+.4g}, {r.hi:+.4g}] (thr {r.threshold_pct:.0f}%)"
        change = "" if r.change_pct == 0 else f"{r.change_pct:+.2f}"
        lines.append(f"{r.scenario:<22} {r.tier.split()[0]:<12} {r.metric:<26} {r.baseline:>12.6g} "
                     f"{r.current:>12.6g} {change:>9} {interval:>32}  {r.verdict}")
    return "\n".join(lines)


def _selected(directory: Path, overrides: dict | None, only: list[str] | None) -> list[Scenario]:
    """The scenarios to check or update; an unknown name, or none at all, is an error (a gate that
    checks nothing must not pass)."""
    scenarios = load_scenarios(directory, overrides)
    names = {s.name for s in scenarios}
    unknown = [n for n in only or () if n not in names]
    if unknown:
        raise BaselineError(f"no scenario {unknown[0]!r} in {directory}/scenarios.toml "
                            f"(have: {', '.join(sorted(names)) or 'none'})")
    chosen = [s for s in scenarios if not only or s.name in only]
    if not chosen:
        raise BaselineError(f"{directory}/scenarios.toml defines no scenario: nothing to check")
    return chosen


def _config_differences(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a baseline's config and the scenario's now (keys the
    baseline does not have are new options at their defaults: not a difference)."""
    if old is None:
        return ["config (the baseline has none)"]
    out = []
    for key, value in new.items():
        if key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            out += _config_differences(old[key], value, f"{prefix}{key}.")
        elif old[key] != value:
            out.append(f"{prefix}{key}")
    return out


def check(directory: Path, tiers: set[str], overrides: dict | None = None, root_seed: int | None = None,
          only: list[str] | None = None) -> list[Row]:
    scenarios = _selected(directory, overrides, only)
    baselines = {s.name: read_baseline(directory, s.name) for s in scenarios}  # all read before any work
    if not overrides:  # with --set the difference is the point; without, a baseline must match its scenario
        for s in scenarios:
            stale = _config_differences(baselines[s.name].get("config"), s.config.to_dict())
            if stale:
                raise BaselineError(f"baseline of scenario {s.name} was made for another configuration "
                                    f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''} differ): "
                                    "regenerate it with --update if the change is deliberate")
    comparisons = sum(len(s.metrics) for s in scenarios) if "statistical" in tiers else 1
    rows = []
    for s in scenarios:
        rows += compare(s, baselines[s.name], measure(s, tiers, root_seed), comparisons)
    if not rows:
        raise BaselineError("the check compared no metric (empty baselines?): regenerate them with --update")
    return rows


def update(directory: Path, overrides: dict | None = None,
           only: list[str] | None = None) -> list[tuple[str, list[Row] | None]]:
    """Rewrite baselines; returns, per scenario, what changed against the old one (if it was readable)."""
    changes = []
    for s in _selected(directory, overrides, only):
        new = measure(s, {"exact", "statistical"})
        try:
            old = read_baseline(directory, s.name)
            diff = [r for r in compare(s, old, new) if r.verdict != "ok" or r.change_pct != 0]
        except BaselineError:
            diff = None
        write_baseline(directory, s, new)
        changes.append((s.name, diff))
    return changes
