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


def latency_stats(lat: np.ndarray, prefix: str) -> dict[str, float]:
    """``{prefix}_mean_us``, ``_p50_us``, ``_p99_us`` of a latency array (nan when empty)."""
    if not lat.size:
        return {f"{prefix}_{k}_us": np.nan for k in ("mean", "p50", "p99")}
    p50, p99 = np.percentile(lat, [50, 99])
    return {f"{prefix}_mean_us": float(lat.mean()), f"{prefix}_p50_us": float(p50), f"{prefix}_p99_us": float(p99)}


VF_DTYPES = {"vf": "int64", "call": "int64", "block_mask": "uint64", "pf_call_us": "float64", "notification": "int64",
             "sent_us": "float64", "delivered_us": "float64", "read_done_us": "float64", "latency_us": "float64",
             "coalesced": "int64", "dropped": "bool"}


def vf_frame(rec: Records) -> pd.DataFrame:
    """One row per PF call (empty with the VF columns when the VF model is off)."""
    from tlbsim.model.vf import VF_COLUMNS

    data = rec.vf or {c: [] for c in VF_COLUMNS}
    df = pd.DataFrame(data, columns=list(VF_COLUMNS)).astype(VF_DTYPES)
    df["status"] = pd.Categorical(df["status"], categories=["read", "pending", "lost"])
    return df


def vf_summary(vf: pd.DataFrame, vps: pd.DataFrame, stats: dict) -> dict:
    """VF latency (PF call -> every block read), coalescing, losses."""
    read = vf[vf["status"] == "read"]
    lat = read["latency_us"].to_numpy(dtype=float)
    sent = vf[vf["notification"] >= 0]
    notifications = sent.groupby(["vf", "notification"]).ngroups
    return {
        "vf_calls": int(len(vf)),
        "vf_calls_read": int(len(read)),
        "vf_calls_pending": int((vf["status"] == "pending").sum()),
        "vf_calls_lost": int((vf["status"] == "lost").sum()),
        **latency_stats(lat, "vf_latency"),
        # PF calls per notification sent: 1 = no coalescing
        "vf_coalescing_ratio": float(len(sent) / notifications) if notifications else np.nan,
        "vf_vp_time_us": float(vps["vf_us"].sum()),
        **stats,
    }


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
        **latency_stats(lat, "latency"),
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
