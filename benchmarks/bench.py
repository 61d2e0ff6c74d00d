"""The benchmark behind ``zmqdist bench`` (same options): ``python3 benchmarks/bench.py --help``."""

import sys

from zmqdist.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
