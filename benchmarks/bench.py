"""The benchmark behind ``zmqdist bench`` (same options): python benchmarks/bench.py --help"""

from zmqdist.cli import main

if __name__ == "__main__":
    main(["bench", *__import__("sys").argv[1:]])
