"""The SimPy model: no file I/O, no printing. See partition.simulate_records."""


class InvariantError(AssertionError):
    """The model broke one of its own invariants (run.check_invariants on)."""
