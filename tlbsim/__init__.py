"""tlbsim: a discrete-event simulator of TLB shootdowns in multi-VP VMs."""

__version__ = "0.1.0"

from tlbsim.config import Config, ConfigError  # noqa: E402
from tlbsim.results import Result  # noqa: E402
from tlbsim.runner import simulate  # noqa: E402
from tlbsim.sweep import load_results  # noqa: E402

__all__ = ["Config", "ConfigError", "Result", "load_results", "simulate", "__version__"]
