"""Plain benchmark script (CI does not time it): python benchmarks/bench.py [--quick] [--json F] [--compare F];
the same as `tlbsim bench`."""

import sys

from tlbsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
