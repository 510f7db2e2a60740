"""tlbsim: a discrete-event simulator of TLB shootdowns in multi-VP VMs."""

__version__ = "0.1.0"
