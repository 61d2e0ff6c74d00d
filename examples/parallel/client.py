"""Send a pipelined load and print how the broker shared it among the workers."""

import sys
from collections import Counter

from zmqdist import Client


def main(endpoint: str = "tcp://127.0.0.1:5555", n: int = 3000) -> int:
    with Client([endpoint], timeout=30) as client:
        results = list(client.map("work", range(n), window=50))
    assert [r["x"] for r in results] == list(range(n)), "replies out of order or wrong"
    served = Counter(r["worker"] for r in results)
    print(f"{n} requests, every reply correct; how the load was shared:")
    for name in ("fast", "medium", "slow"):
        share = served[name] / n
        print(f"  {name:7} {served[name]:5d}  {share:6.1%}  {'#' * round(share * 40)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
