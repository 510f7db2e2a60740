import pytest

from tlbsim import Config

QUIET_EXITS = {f"exits.{name}.rate_per_ms": 0.0 for name in Config().exits.specs()}


def make_config(**overrides) -> Config:
    """The default config with invariant checks on and dotted overrides
    (use __ for dots: partition__vps=8)."""
    flat = {k.replace("__", "."): v for k, v in overrides.items()}
    return Config().with_overrides({"run.check_invariants": True, **flat})


def quiet_config(**overrides) -> Config:
    """No exits, no locks: every cost is deterministic."""
    flat = {k.replace("__", "."): v for k, v in overrides.items()}
    return Config().with_overrides({"run.check_invariants": True, **QUIET_EXITS, **flat})


@pytest.fixture
def cfg():
    return make_config
