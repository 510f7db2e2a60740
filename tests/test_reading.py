"""What a user reads: timelines that tile the run, every arrival a row, target-column identities, and
latency anatomy columns that sum to each row's latency (issue: what a user reads must be true)."""

import itertools

import numpy as np
import pytest

from tests.conftest import make_config
from tlbsim import simulate
from tlbsim.model.accounting import GUEST, VpState
from tlbsim.model.timeline import Timeline

POLICIES = ("ipi", "mask", "all", "linux", "kvm-pv")
PROFILES = ("tlfs", "kvm", "openhcl")


@pytest.mark.parametrize("policy,profile", list(itertools.product(POLICIES, PROFILES)))
def test_timeline_segments_tile_the_run_for_every_vp(policy, profile):
    """Every VP's timeline segments cover the whole window with no gap and no overlap, and its guest
    segments add up to the guest time the vps table reports (a fast path that moved the clock without
    telling the timeline lost 1,245 of 2,000 us per VP under mask)."""
    duration = 3000.0
    config = make_config(workload__policy=policy, partition__semantics=profile, partition__vps=8,
                         partition__lps=4, partition__duration_us=duration, workload__rate_per_ms=2.0,
                         locks__vsm_rate_per_ms=1.0 if profile != "kvm" else 0.0)
    timeline = Timeline(0.0, duration)
    res = simulate(config, seed=3, timeline=timeline)
    segments = {}
    for vp, state, a, b, _ in timeline.segments:
        segments.setdefault(vp, []).append((a, b, state))
    vps = res.vps.set_index("vp")
    for vp in range(8):
        segs = sorted(segments[vp])
        assert segs[0][0] == 0.0 and segs[-1][1] == pytest.approx(duration, abs=1e-9)
        for (_, b, _), (a, _, _) in zip(segs, segs[1:], strict=False):
            assert a == pytest.approx(b, abs=1e-9), f"VP {vp}: gap or overlap at {b} us"
        guest = sum(b - a for a, b, s in segs if s == GUEST)
        row = vps.loc[vp]
        assert guest == pytest.approx(row["guest_us"] + row["hv_flush_us"] + row["refill_us"], rel=1e-9, abs=1e-6)
        for state in VpState:
            if state == GUEST:
                continue
            spent = sum(b - a for a, b, s in segs if s == state)
            assert spent == pytest.approx(row[f"{state.name.lower()}_us"], rel=1e-9, abs=1e-6), state.name
