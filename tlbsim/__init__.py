"""tlbsim: a discrete-event simulator of TLB shootdowns in multi-VP VMs.

The public names are imported on first use (PEP 562), so that importing the model alone
(``import tlbsim.model``) loads neither pandas nor matplotlib."""

__version__ = "0.1.0"

_PUBLIC = {"Config": "tlbsim.config", "ConfigError": "tlbsim.config", "Result": "tlbsim.results",
           "simulate": "tlbsim.runner", "load_results": "tlbsim.sweep"}

__all__ = ["Config", "ConfigError", "Result", "load_results", "simulate", "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tlbsim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])
