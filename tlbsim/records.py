"""Tables and the summary of a run: the tidy DataFrames made from the model's records
(tlbsim.model.recorder) and every figure of the summary derived from them."""

from __future__ import annotations

from array import array

import numpy as np
import pandas as pd

from tlbsim.config import Config
from tlbsim.model.recorder import (  # noqa: F401 (SHOOTDOWN_COLUMNS, Records re-exported)
    ANATOMY_COLUMNS,
    ANATOMY_PARTS,
    SHOOTDOWN_COLUMNS,
    Records,
)

# ---------------------------------------------------------------- DataFrames
_DTYPES = {"q": np.int64, "d": np.float64, "b": np.int8}


def column(values):
    """A numpy view (or a categorical) of one recorded column: an array of the recorder, or a string
    column's (codes, categories)."""
    if isinstance(values, array):  # zero-copy view of the recorder's buffer
        return np.frombuffer(values, dtype=_DTYPES[values.typecode])
    codes, categories = values  # a string column: codes + its few distinct values
    return pd.Categorical.from_codes(np.frombuffer(codes, dtype=np.int8), categories=categories)


def shootdowns_frame(rec: Records) -> pd.DataFrame:
    """One row per shootdown. Numeric columns are views of the recorder's
    arrays (no copy); string columns are categoricals."""
    return pd.DataFrame({name: column(v) for name, v in rec.shootdowns.items()}, copy=False)


def vps_frame(rec: Records) -> pd.DataFrame:
    return pd.DataFrame(rec.vps)


def latency_stats(lat: np.ndarray, prefix: str) -> dict[str, float]:
    """``{prefix}_mean_us``, ``_p50_us``, ``_p99_us`` of a latency array (nan when empty)."""
    if not lat.size:
        return {f"{prefix}_{k}_us": np.nan for k in ("mean", "p50", "p99")}
    p50, p99 = np.percentile(lat, [50, 99])
    return {f"{prefix}_mean_us": float(lat.mean()), f"{prefix}_p50_us": float(p50), f"{prefix}_p99_us": float(p99)}


VF_DTYPES = {"partition": "int64",
             "vf": "int64", "call": "int64", "block_mask": "uint64", "pf_call_us": "float64", "notification": "int64",
             "sent_us": "float64", "delivered_us": "float64", "read_done_us": "float64", "latency_us": "float64",
             "coalesced": "int64", "dropped": "bool"}


def vf_frame(rec: Records) -> pd.DataFrame:
    """One row per PF call (empty with the VF columns when the VF model is off)."""
    from tlbsim.model.vf import VF_COLUMNS

    data = rec.vf or {c: [] for c in ("partition", *VF_COLUMNS)}
    df = pd.DataFrame(data, columns=["partition", *VF_COLUMNS]).astype(VF_DTYPES)
    df["status"] = pd.Categorical(df["status"], categories=["read", "pending", "lost"])
    return df


def vf_summary(vf: pd.DataFrame, vps: pd.DataFrame, stats: dict) -> dict:
    """VF latency (PF call -> every block read), coalescing, losses."""
    read = vf[vf["status"] == "read"]
    lat = read["latency_us"].to_numpy(dtype=float)
    sent = vf[vf["notification"] >= 0]
    notifications = sent.groupby(["partition", "vf", "notification"]).ngroups
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


def censored_latencies(shootdowns: pd.DataFrame, duration_us: float) -> tuple[np.ndarray, np.ndarray]:
    """(latencies of the shootdowns that succeeded, lower bounds of those still in flight at the end:
    the run's end minus their issue time). Incomplete shootdowns are censored observations, not
    absent ones: leaving them out biases every latency statistic low. QUEUED rows (never issued)
    have no issue-to-completion latency to bound: they count in ``censored_responses``."""
    if not len(shootdowns):
        return np.array([]), np.array([])
    done = shootdowns["status"] == "SUCCESS"
    incomplete = shootdowns["status"] == "INCOMPLETE"
    lat = shootdowns.loc[done, "latency_us"].to_numpy(dtype=float)
    waited = duration_us - shootdowns.loc[incomplete, "issue_us"].to_numpy(dtype=float)
    return lat, np.maximum(waited, 0.0)


def censored_responses(shootdowns: pd.DataFrame, duration_us: float) -> tuple[np.ndarray, np.ndarray]:
    """(response times, arrival to completion, of the shootdowns that succeeded; lower bounds of
    every other arrival not finished at the end: its queueing delay so far, plus its time in flight if
    it had started). Every arrival is in one of the two: the open loop's end-to-end figure."""
    if not len(shootdowns):
        return np.array([]), np.array([])
    status = shootdowns["status"]
    done = (status == "SUCCESS").to_numpy(dtype=bool)
    open_ = (status == "INCOMPLETE").to_numpy(dtype=bool) | (status == "QUEUED").to_numpy(dtype=bool)
    queue = shootdowns["queue_us"].to_numpy(dtype=float)
    latency = shootdowns["latency_us"].to_numpy(dtype=float)
    # in flight: the time since its issue; QUEUED (no issue time): nothing more than its queueing delay
    waited = np.nan_to_num(duration_us - shootdowns["issue_us"].to_numpy(dtype=float), nan=0.0)
    return queue[done] + latency[done], queue[open_] + waited[open_]


#: the shootdown columns ``summarize`` reads (a spilled run reads only these back)
SUMMARY_COLUMNS = ("partition", "status", "origin", "latency_us", "issue_us", "queue_us", "suspensions", "reissues",
                   "continuations", "suspended_us", "hypercall_us")


def summarize(shootdowns: pd.DataFrame, vps: pd.DataFrame, duration_us: float, extra: dict) -> pd.Series:
    """The summary is derived from the tidy tables, never kept separately: what became of the
    shootdowns and their latency (``outcomes``), sums of the shootdown rows and of the VP table, the
    caller's ``extra`` figures, and what shootdowns cost the guest (``shootdown_cost``)."""
    out = {**outcomes(shootdowns, duration_us), **_row_sums(shootdowns), **_vp_sums(vps, duration_us)}
    out.update(extra)
    issued = int((shootdowns["status"] != "QUEUED").sum()) if len(shootdowns) else 0
    out.update(shootdown_cost(out, issued, duration_us * len(vps)))
    return pd.Series(out, dtype=object)


def outcomes(shootdowns: pd.DataFrame, duration_us: float) -> dict:
    """Counts by outcome and the latency statistics. Latency statistics count incomplete shootdowns
    with the time they had waited at the end (a lower bound of their latency);
    ``latency_p99_is_lower_bound`` says whether such a censored value reaches the p99 (then the true
    p99 is at least the one given). Response times (arrival to completion) count every arrival."""
    # the columns it needs, not a filtered copy of the whole table (that copy was the peak of a
    # million-shootdown run)
    status = shootdowns["status"]
    success = (status == "SUCCESS").to_numpy(dtype=bool)
    n_done = int(success.sum())
    done_queue_us = shootdowns["queue_us"][success]
    completed_lat, censored = censored_latencies(shootdowns, duration_us)
    lat = np.concatenate([completed_lat, censored])
    queued = int((status == "QUEUED").sum()) if len(shootdowns) else 0
    incomplete = int((status == "INCOMPLETE").sum()) if len(shootdowns) else 0
    stats = latency_stats(lat, "latency")
    p99 = stats["latency_p99_us"]
    return {
        "shootdowns_completed": n_done,
        "shootdowns_failed": len(shootdowns) - n_done - incomplete - queued,  # an HV_STATUS other than SUCCESS
        "shootdowns_incomplete": incomplete,
        "shootdowns_queued": queued,
        # every arrival not finished at the end: in flight (INCOMPLETE) or never started (QUEUED)
        "incomplete_fraction": float((incomplete + queued) / len(shootdowns)) if len(shootdowns) else 0.0,
        **stats,
        **latency_stats(np.concatenate(censored_responses(shootdowns, duration_us)), "response"),
        "latency_p99_is_lower_bound": bool(censored.size and p99 == p99 and censored.max() >= p99),
        "latency_max_us": float(lat.max()) if lat.size else np.nan,
        # operations (workload shootdowns) completed per second of simulated time, all VPs together:
        # the closed loop's figure of merit
        "ops_per_s": float(((shootdowns["origin"] == "workload").to_numpy(dtype=bool) & success).sum()
                           / (duration_us * 1e-6)) if n_done else 0.0,
        "queue_mean_us": float(done_queue_us.mean()) if n_done else np.nan,
        "queue_p99_us": float(np.percentile(done_queue_us, 99)) if n_done else np.nan,
    }


def _row_sums(shootdowns: pd.DataFrame) -> dict:
    def total(column, kind=float):
        return kind(shootdowns[column].sum()) if len(shootdowns) else kind(0)

    return {
        "suspensions": total("suspensions", int),
        # suspended more than once: a reissued call found a lock again (TLFS reissue can starve)
        "shootdowns_resuspended": int((shootdowns["suspensions"] >= 2).sum()) if len(shootdowns) else 0,
        "reissues": total("reissues", int),
        "suspended_us": total("suspended_us"),
        "hypercall_us": total("hypercall_us"),
        "continuations": total("continuations", int),
    }


def _vp_sums(vps: pd.DataFrame, duration_us: float) -> dict:
    out = {"guest_work_fraction": float(vps["guest_us"].sum() / (duration_us * len(vps)))}
    for column in ("refill_us", "hv_flush_us", "spinning_us", "vtl1_us", "ipi_send_us", "ipi_interrupt_us",
                   "flush_us", "collateral_entries", "evicted_entries"):
        out[column] = float(vps[column].sum())
    for column in ("spin_exits", "spin_yields", "lock_holder_preemptions", "deferred_pending"):
        out[column] = int(vps[column].sum())
    out["duration_us"] = float(duration_us)
    out["vps"] = len(vps)
    return out


def shootdown_cost(out: dict, issued: int, total_us: float) -> dict:
    """Everything shootdowns cost the guest, all VPs together: sending IPIs, the targets' Canceled exits
    and flush handlers (and the initiator's own flush), spinning for acks, flush hypercalls, time
    suspended on locked TLBs, hypervisor interruptions, and refilling what the flushes removed (not
    what co-tenants evicted); its share of VP time, and per shootdown issued (QUEUED arrivals cost
    nothing yet). Every term is time that elapsed within the run."""
    cost = (out["ipi_send_us"] + out.get("canceled_exit_us", 0.0) + out.get("ipi_interrupt_us", 0.0)
            + out["flush_us"] + out["spinning_us"]
            + out["hypercall_us"] + out["suspended_us"] + out["hv_flush_us"]
            + out.get("shootdown_refill_us", out["refill_us"]))
    return {"shootdown_cost_us": float(cost),
            "shootdown_time_fraction": float(cost / total_us) if total_us else np.nan,
            "cost_per_shootdown_us": float(cost / issued) if issued else np.nan}


def shootdown_refill_us(vps) -> float:
    """Refill time the guest spent on entries shootdowns removed, all VPs: each VP's refill time
    (what it repaid, not what it still owes at the end) in the proportion of the entries flushes removed
    to all it lost (flushes, and evictions by other VPs on its LP)."""
    flushed = (vps["refill_entries"] + vps["collateral_entries"]).to_numpy(dtype=float)
    lost = flushed + vps["evicted_entries"].to_numpy(dtype=float)
    share = np.divide(flushed, lost, out=np.zeros_like(flushed), where=lost > 0)
    return float((vps["refill_us"].to_numpy(dtype=float) * share).sum())


def run_summary(shootdowns, vps, exits, config: Config, duration_us: float, extra: dict):
    """A run's summary: summarize() with what it needs from the exits table and the configuration."""
    canceled_exit_us = float(exits.loc[exits["reason"] == "CANCELED", "time_us"].sum()) if len(exits) else 0.0
    extra = {**extra,
             # costs a shootdown causes that the VP time columns do not name apart
             "canceled_exit_us": canceled_exit_us,
             "shootdown_refill_us": shootdown_refill_us(vps)}
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
    policies = [config.workload.policy, *config.host.guest_policies]
    rows = []
    for g in range(config.host.guests):
        if only is not None:
            row = only.drop("policy")
        else:
            sd = shootdowns[shootdowns["partition"] == g]
            v, x = vps[vps["partition"] == g], exits[exits["partition"] == g]
            row = run_summary(sd, v, x, config, duration_us, {})
        rows.append({"partition": g, "policy": policies[g] if policies[g:] else config.workload.policy, **row})
    return pd.DataFrame(rows)
