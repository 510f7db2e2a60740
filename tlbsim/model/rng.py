"""Random streams: one numpy Generator per (VP, purpose), drawn in blocks.

All randomness of a run flows from one SeedSequence. Each VP gets a child
sequence, and each purpose (exits, workload, halts, VSM locks) a grandchild,
so a policy that consumes more or fewer exit draws never shifts the workload
of another VP or another purpose: runs of different policies at one seed see
common random numbers.
"""

from __future__ import annotations

from array import array

import numpy as np

PURPOSES = ("exits", "workload", "halt", "vsm", "sched", "tlbcheck")  # new purposes go last: the others' draws stay
VF_PURPOSES = ("pf", "fault")
#: VF streams live under spawn keys (VF_KEY, vf) and the PF's under (VF_KEY + 1,):
#: disjoint from the VPs' (0..4095), so turning VFs on changes no VP's draws.
VF_KEY = 1 << 20
_BLOCK = 512


class Stream:
    """Exponential and uniform draws from one Generator, refilled in blocks
    (a numpy call per block instead of per draw). A block is a typed array
    (8 bytes a draw, where a list of floats takes 32: a 4,096-VP partition holds
    about 16,000 blocks)."""

    __slots__ = ("_gen", "_exp", "_ei", "_uni", "_ui")

    def __init__(self, seed_seq: np.random.SeedSequence):
        self._gen = np.random.Generator(np.random.PCG64(seed_seq))
        self._exp = array("d")
        self._ei = _BLOCK  # empty: the first draw fills a block
        self._uni = array("d")
        self._ui = _BLOCK

    def exp(self, mean: float) -> float:
        """An exponential draw with the given mean (inf for mean inf)."""
        if self._ei == _BLOCK:
            self._exp = array("d", self._gen.standard_exponential(_BLOCK).tobytes())
            self._ei = 0
        x = self._exp[self._ei]
        self._ei += 1
        return x * mean

    def uniform(self) -> float:
        if self._ui == _BLOCK:
            self._uni = array("d", self._gen.random(_BLOCK).tobytes())
            self._ui = 0
        x = self._uni[self._ui]
        self._ui += 1
        return x


def vp_streams(seed: int | np.random.SeedSequence, n_vps: int) -> list[dict[str, Stream]]:
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    out = []
    for child in root.spawn(n_vps):
        out.append(dict(zip(PURPOSES, (Stream(s) for s in child.spawn(len(PURPOSES))), strict=True)))
    return out


COTENANT_KEY = VF_KEY + 2


def cotenant_streams(seed: int | np.random.SeedSequence, n_vps: int) -> list[Stream]:
    """One stream per co-tenant VP, under a spawn key of their own: adding
    co-tenants changes no draw of the partition under study."""
    root = _root(seed)
    return [Stream(np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, COTENANT_KEY, j)))
            for j in range(n_vps)]


def _root(seed: int | np.random.SeedSequence) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


def vf_streams(seed: int | np.random.SeedSequence, n_vfs: int) -> tuple[list[dict[str, Stream]], Stream]:
    """(per VF: a stream per VF purpose; the PF's stream for its other OIDs)."""
    root = _root(seed)
    out = []
    for j in range(n_vfs):
        base = np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, VF_KEY, j))
        out.append(dict(zip(VF_PURPOSES, (Stream(s) for s in base.spawn(len(VF_PURPOSES))), strict=True)))
    pf = Stream(np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, VF_KEY + 1)))
    return out, pf


GUEST_KEY = VF_KEY + 3


def guest_seed(seed: int | np.random.SeedSequence, index: int) -> np.random.SeedSequence:
    """The seed of guest partition ``index`` >= 1 (guest 0 uses the run's own): a spawn key of its
    own, so adding guests changes no draw of the first one."""
    root = _root(seed)
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, GUEST_KEY, index))


def replication_seed(root: int, replication: int) -> int:
    """Replication ``replication``'s seed: the first word of SeedSequence(root, spawn_key=(replication,)).
    Every command that replicates (run --replications, sweep, the regression gate) uses this one."""
    return int(np.random.SeedSequence(root, spawn_key=(replication,)).generate_state(1, dtype=np.uint64)[0])
