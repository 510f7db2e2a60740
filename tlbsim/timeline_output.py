"""A run's timeline as people read it: Chrome trace event JSON (Perfetto, chrome://tracing) and a
figure of the VPs' states. The model collects the timeline (tlbsim.model.timeline); this writes it."""

from __future__ import annotations

import json
from pathlib import Path

from tlbsim.model.accounting import VpState
from tlbsim.model.timeline import Timeline
from tlbsim.results import atomic_write_text


def chrome_trace(timeline: Timeline, vps: int, vf_rows=None, label: str = "tlbsim") -> dict:
    """Chrome trace events of ``timeline``: one track per VP, shootdowns as async slices, VF events."""
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": label}}]
    for i in range(vps):
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": f"VP {i}"}})
    for vp, state, a, b, reason in timeline.segments:
        name = reason or VpState(state).name.lower()
        events.append({"name": name, "cat": "vp_state", "ph": "X", "pid": 1, "tid": vp, "ts": a,
                       "dur": max(b - a, 0.0)})
    for vp, name, t, args in timeline.instants:
        events.append({"name": name, "cat": "interrupt", "ph": "i", "s": "t", "pid": 1, "tid": vp, "ts": t,
                       "args": args})
    for sid, initiator, issue, complete, policy in timeline.shootdowns:
        common = {"name": f"shootdown {sid} ({policy})", "cat": "shootdown", "id": sid, "pid": 1,
                  "tid": initiator}
        events.append({**common, "ph": "b", "ts": issue})
        if complete is not None:
            events.append({**common, "ph": "e", "ts": complete})
    for row in vf_rows or ():
        for key, name in (("pf_call_us", "PF NdisMInvalidateConfigBlock"), ("delivered_us", "VF notified"),
                          ("read_done_us", "VF blocks read")):
            t = row.get(key)
            if t is not None and t == t and timeline.start_us <= t <= timeline.end_us:
                events.append({"name": name, "cat": "vf", "ph": "i", "s": "p", "pid": 1, "tid": 0, "ts": t,
                               "args": {"vf": int(row["vf"]), "call": int(row["call"]),
                                        "block_mask": hex(int(row["block_mask"]))}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"time_unit": "simulated microseconds", "window_us": [timeline.start_us, timeline.end_us]}}


def write_chrome_trace(timeline: Timeline, path, vps: int, vf_rows=None) -> None:
    """Write ``chrome_trace`` to ``path`` atomically (Perfetto, chrome://tracing)."""
    atomic_write_text(Path(path), json.dumps(chrome_trace(timeline, vps, vf_rows)))


def draw_timeline(timeline: Timeline, path, vps: int, title: str = "") -> None:
    """Draw the VPs' states over the window of ``timeline`` (any format matplotlib writes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"guest": "#2ca02c", "exit": "#ff7f0e", "hypercall": "#1f77b4", "flush": "#9467bd",
               "spinning": "#d62728", "suspended": "#8c564b", "halted": "#cccccc", "descheduled": "#eeeeee",
               "vf": "#e377c2", "vtl1": "#17becf"}
    fig, ax = plt.subplots(figsize=(11, 0.28 * vps + 1.6))
    by_state: dict = {}
    for vp, state, a, b, _ in timeline.segments:
        a, b = max(a, timeline.start_us), min(b, timeline.end_us)
        if b > a:
            by_state.setdefault(VpState(state).name.lower(), []).append((vp, a, b - a))
    for name, bars in by_state.items():
        for vp, a, width in bars:
            ax.broken_barh([(a, width)], (vp - 0.4, 0.8), color=colours.get(name, "#000000"), linewidth=0)
    for vp, _, t, _ in timeline.instants:
        if timeline.start_us <= t <= timeline.end_us:
            ax.plot([t], [vp], marker="|", color="black", markersize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in colours if n in by_state]
    ax.legend(handles, [n for n in colours if n in by_state], fontsize=7, ncol=5, loc="upper center",
              bbox_to_anchor=(0.5, -0.18))
    ax.set_xlim(timeline.start_us, timeline.end_us)
    ax.set_ylim(-0.6, vps - 0.4)
    ax.set_yticks(range(vps), [f"VP {i}" for i in range(vps)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("simulated time (us); | = an IPI delivered")
    ax.set_title(title or "VP states", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
