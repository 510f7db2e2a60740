"""tlbsim: a discrete-event simulator of TLB shootdowns in multi-VP VMs."""

__version__ = "0.1.0"

from tlbsim.config import Config, ConfigError  # noqa: E402
from tlbsim.results import Result  # noqa: E402
from tlbsim.simulate import simulate  # noqa: E402

__all__ = ["Config", "ConfigError", "Result", "simulate", "__version__"]
