"""A timeline of one run, for people: VP states, exits, hypercalls, suspensions, IPIs, shootdowns and
VF events within a time window.

Free when off: nothing here runs unless a run asks for a timeline. Partition then builds
``TracingVP`` (a VP whose state changes and IPIs are also written down) and wraps the recorder's
``started`` / ``completed``; the plain VP class and recorder are untouched. Output: Chrome trace event
JSON (Perfetto, chrome://tracing: one track per VP, shootdowns as async slices) and a matplotlib
figure of the VPs' states. Times are simulated microseconds (the trace format's unit too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tlbsim.model.accounting import EXIT, EXIT_REASONS, GUEST, VpState
from tlbsim.model.vp import VP


@dataclass
class Timeline:
    start_us: float
    end_us: float
    segments: list = field(default_factory=list)  # (vp, state, start_us, end_us, exit reason name or "")
    instants: list = field(default_factory=list)  # (vp, name, time_us, args)
    shootdowns: list = field(default_factory=list)  # (id, initiator, issue_us, complete_us or None, policy)

    def overlaps(self, a: float, b: float) -> bool:
        return b >= self.start_us and a <= self.end_us

    # ------------------------------------------------------------ output
    def chrome_trace(self, vps: int, vf_rows=None, label: str = "tlbsim") -> dict:
        events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": label}}]
        for i in range(vps):
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": f"VP {i}"}})
        for vp, state, a, b, reason in self.segments:
            name = reason or VpState(state).name.lower()
            events.append({"name": name, "cat": "vp_state", "ph": "X", "pid": 1, "tid": vp, "ts": a,
                           "dur": max(b - a, 0.0)})
        for vp, name, t, args in self.instants:
            events.append({"name": name, "cat": "interrupt", "ph": "i", "s": "t", "pid": 1, "tid": vp, "ts": t,
                           "args": args})
        for sid, initiator, issue, complete, policy in self.shootdowns:
            common = {"name": f"shootdown {sid} ({policy})", "cat": "shootdown", "id": sid, "pid": 1,
                      "tid": initiator}
            events.append({**common, "ph": "b", "ts": issue})
            if complete is not None:
                events.append({**common, "ph": "e", "ts": complete})
        for row in vf_rows or ():
            for key, name in (("pf_call_us", "PF NdisMInvalidateConfigBlock"), ("delivered_us", "VF notified"),
                              ("read_done_us", "VF blocks read")):
                t = row.get(key)
                if t is not None and t == t and self.start_us <= t <= self.end_us:
                    events.append({"name": name, "cat": "vf", "ph": "i", "s": "p", "pid": 1, "tid": 0, "ts": t,
                                   "args": {"vf": int(row["vf"]), "call": int(row["call"]),
                                            "block_mask": hex(int(row["block_mask"]))}})
        return {"traceEvents": events, "displayTimeUnit": "ns",
                "otherData": {"time_unit": "simulated microseconds", "window_us": [self.start_us, self.end_us]}}

    def write_json(self, path, vps: int, vf_rows=None) -> None:
        from pathlib import Path

        from tlbsim.results import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.chrome_trace(vps, vf_rows)))

    def figure(self, path, vps: int, title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colours = {"guest": "#2ca02c", "exit": "#ff7f0e", "hypercall": "#1f77b4", "flush": "#9467bd",
                   "spinning": "#d62728", "suspended": "#8c564b", "halted": "#cccccc", "descheduled": "#eeeeee",
                   "vf": "#e377c2", "vtl1": "#17becf"}
        fig, ax = plt.subplots(figsize=(11, 0.28 * vps + 1.6))
        by_state: dict = {}
        for vp, state, a, b, _ in self.segments:
            a, b = max(a, self.start_us), min(b, self.end_us)
            if b > a:
                by_state.setdefault(VpState(state).name.lower(), []).append((vp, a, b - a))
        for name, bars in by_state.items():
            for vp, a, width in bars:
                ax.broken_barh([(a, width)], (vp - 0.4, 0.8), color=colours.get(name, "#000000"), linewidth=0)
        for vp, _, t, _ in self.instants:
            if self.start_us <= t <= self.end_us:
                ax.plot([t], [vp], marker="|", color="black", markersize=6)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in colours if n in by_state]
        ax.legend(handles, [n for n in colours if n in by_state], fontsize=7, ncol=5, loc="upper center",
                  bbox_to_anchor=(0.5, -0.18))
        ax.set_xlim(self.start_us, self.end_us)
        ax.set_ylim(-0.6, vps - 0.4)
        ax.set_yticks(range(vps), [f"VP {i}" for i in range(vps)], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("simulated time (us); | = an IPI delivered")
        ax.set_title(title or "VP states", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class TracingVP(VP):
    """A VP that also writes its state changes and IPIs into a Timeline (only when tracing)."""

    __slots__ = ("timeline", "_exit_name")

    def __init__(self, part, index, address_space, streams, arrivals, has_thread: bool = True):
        self.timeline = part.timeline
        self._exit_name = ""
        super().__init__(part, index, address_space, streams, arrivals, has_thread)

    def _segment(self, until: float) -> None:
        if until > self.since and self.timeline.overlaps(self.since, until):
            self.timeline.segments.append((self.index, self.state, self.since, until,
                                           self._exit_name if self.state == EXIT else ""))

    def set_state(self, new, now=None):
        if now is None:
            now = self.env.now
        if new != self.state or now > self.since:
            self._segment(now)
        if new == EXIT:
            self._exit_name = EXIT_REASONS[self.exit_index].name if self.exit_index >= 0 else "EXIT"
        super().set_state(new, now)

    def advance_guest(self, now: float) -> None:
        if self.state == GUEST and now > self.since:
            self._segment(now)
        super().advance_guest(now)

    def switch_at(self, new, when: float) -> None:
        self._segment(when)
        super().switch_at(new, when)

    def post_ipi(self, shootdown, scope, acks) -> bool:
        t = self.env.now
        if self.timeline.start_us <= t <= self.timeline.end_us:
            self.timeline.instants.append((self.index, "IPI", t, {"shootdown": shootdown.id}))
        return super().post_ipi(shootdown, scope, acks)

    def close(self, end_us: float) -> None:
        self._segment(end_us)


def trace_recorder(recorder, timeline: Timeline, partition: int = 0) -> None:
    """Also write each shootdown of guest ``partition`` (the one traced) into the timeline: its start
    and completion (instance-level wrappers)."""
    started, completed, finish = recorder.started, recorder.completed, recorder.finish

    def traced_started(initiator, policy, request, now, targets, part, clock):
        sd = started(initiator, policy, request, now, targets, part, clock)
        if part == partition and timeline.start_us <= now <= timeline.end_us:
            timeline.shootdowns.append([sd.id, initiator, now, None, policy])
        return sd

    def traced_completed(shootdown, status, now, clock):
        for row in reversed(timeline.shootdowns):
            if row[0] == shootdown.id:
                row[3] = now
                break
        completed(shootdown, status, now, clock)

    recorder.started, recorder.completed, recorder.finish = traced_started, traced_completed, finish
