"""Plain benchmark script (CI does not time it): python benchmarks/bench.py [--quick]."""

import sys

from tlbsim.bench import main

if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
