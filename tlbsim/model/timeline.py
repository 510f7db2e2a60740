"""A timeline of one run, for people: VP states, exits, hypercalls, suspensions, IPIs, shootdowns and
VF events within a time window.

Free when off: nothing here runs unless a run asks for a timeline. Partition then builds
``TracingVP`` (a VP whose state changes and IPIs are also written down) and wraps the recorder's
``started`` / ``completed``; the plain VP class and recorder are untouched. Its output (Chrome trace event
JSON, a figure) is tlbsim.timeline_output's: the model does no I/O. Times are simulated microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlbsim.model.accounting import EXIT, EXIT_REASONS, GUEST
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
