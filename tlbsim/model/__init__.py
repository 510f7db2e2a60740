"""The SimPy model: no file I/O, no printing. See partition.simulate_records."""
