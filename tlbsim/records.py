"""Columnar run records -> tidy DataFrames (once, at the end of a run)."""

from __future__ import annotations

from array import array

import numpy as np
import pandas as pd

from tlbsim.model.partition import Records

_DTYPES = {"q": np.int64, "d": np.float64, "b": np.int8}


def _column(values):
    if isinstance(values, array):  # zero-copy view of the recorder's buffer
        return np.frombuffer(values, dtype=_DTYPES[values.typecode])
    codes, categories = values  # a string column: codes + its few distinct values
    return pd.Categorical.from_codes(np.frombuffer(codes, dtype=np.int8), categories=categories)


def shootdowns_frame(rec: Records) -> pd.DataFrame:
    """One row per shootdown. Numeric columns are views of the recorder's
    arrays (no copy); string columns are categoricals."""
    return pd.DataFrame({name: _column(v) for name, v in rec.shootdowns.items()}, copy=False)


def vps_frame(rec: Records) -> pd.DataFrame:
    return pd.DataFrame(rec.vps)


def exits_frame(rec: Records) -> pd.DataFrame:
    df = pd.DataFrame(rec.exits)
    return df.astype({"reason": "string"}) if len(df) else df


def summarize(shootdowns: pd.DataFrame, vps: pd.DataFrame, duration_us: float, extra: dict) -> pd.Series:
    """The summary is derived from the tidy tables, never kept separately."""
    done = shootdowns[shootdowns["status"] == "SUCCESS"] if len(shootdowns) else shootdowns
    lat = done["latency_us"].to_numpy(dtype=float) if len(done) else np.array([])
    n_vps = len(vps)
    total_us = duration_us * n_vps
    out = {
        "shootdowns_completed": int(len(done)),
        "shootdowns_failed": int(((shootdowns["status"] != "SUCCESS") & (shootdowns["status"] != "INCOMPLETE")).sum())
        if len(shootdowns) else 0,
        "shootdowns_incomplete": int((shootdowns["status"] == "INCOMPLETE").sum()) if len(shootdowns) else 0,
        "latency_mean_us": float(lat.mean()) if lat.size else np.nan,
        "latency_p50_us": float(np.percentile(lat, 50)) if lat.size else np.nan,
        "latency_p99_us": float(np.percentile(lat, 99)) if lat.size else np.nan,
        "latency_max_us": float(lat.max()) if lat.size else np.nan,
        "suspensions": int(shootdowns["suspensions"].sum()) if len(shootdowns) else 0,
        "reissues": int(shootdowns["reissues"].sum()) if len(shootdowns) else 0,
        "suspended_us": float(shootdowns["suspended_us"].sum()) if len(shootdowns) else 0.0,
        "hypercall_us": float(shootdowns["hypercall_us"].sum()) if len(shootdowns) else 0.0,
        "guest_work_fraction": float(vps["guest_us"].sum() / total_us),
        "refill_us": float(vps["refill_us"].sum()),
        "hv_flush_us": float(vps["hv_flush_us"].sum()),
        "spinning_us": float(vps["spinning_us"].sum()),
        "collateral_entries": float(vps["collateral_entries"].sum()),
        "duration_us": float(duration_us),
        "vps": n_vps,
    }
    out.update(extra)
    return pd.Series(out, dtype=object)
