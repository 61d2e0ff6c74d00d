"""A/B of two installs of zmqdist, alternating in one run: did a change cost the per-request path?

    python3 benchmarks/ab.py PYTHON_A PYTHON_B [--rounds 4] [--duration 2] [--only pipelined --only sync]
        [--row zmqdist]    (--only api --row api --row api-async: the public API's rows, sync and pipelined)

Each round runs ``PYTHON -m zmqdist bench --rounds 1`` for A, then for B (from a neutral directory,
so each interpreter imports its own install), and reads the zmqdist and device rows. It prints every
round, then the means and B/A. Both benches measure their device baseline in the same run, so the
ratio to the device is the figure to compare; absolute numbers move with the machine's day.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile

ROW = re.compile(r"^\s+(?P<setup>[\w-]+)\s+(?P<rps>[\d,]+) req/s\s+p50\s+(?P<p50>\d+) us")
SECTIONS = ("sync", "pipelined")
CPU = re.compile(r"cpu\s+(?P<cpu>[\d.]+) us/req")


def run(python: str, only: list[str], duration: float) -> dict[str, dict[str, dict[str, float]]]:
    """One bench run: {section: {setup: {rps, p50, cpu}}}."""
    args = [python, "-m", "zmqdist", "bench", "--rounds", "1", "--duration", str(duration)]
    for o in only:
        args += ["--only", o]
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(args, check=False, cwd=cwd, capture_output=True, text=True, timeout=900).stdout
    found: dict[str, dict[str, dict[str, float]]] = {}
    section = ""
    for line in out.splitlines():
        if line and not line.startswith(" "):
            section = line.split()[0]
        m = ROW.match(line)
        if m and section in SECTIONS:
            cpu = CPU.search(line)
            found.setdefault(section, {})[m["setup"]] = {
                "rps": float(m["rps"].replace(",", "")),
                "p50": float(m["p50"]),
                "cpu": float(cpu["cpu"]) if cpu else float("nan"),
            }
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--only", action="append", default=None, choices=["sync", "pipelined", "api"])
    ap.add_argument(
        "--row", action="append", default=None, help="a setup compared with the device (zmqdist, api, api-inline...)"
    )
    opts = ap.parse_args()
    only = opts.only or ["pipelined", "sync"]
    wanted = opts.row or ["zmqdist"]
    results: dict[str, list[dict[str, dict[str, dict[str, float]]]]] = {"a": [], "b": []}
    for r in range(opts.rounds):
        for side in ("a", "b"):
            res = run(getattr(opts, side), only, opts.duration)
            results[side].append(res)
            for section, rows in res.items():
                for row in wanted:
                    z, d = rows.get(row), rows.get("device")
                    if not (z and d):
                        continue
                    print(
                        f"round {r + 1} {side.upper()} {section:9} {row} {z['rps']:9,.0f} req/s"
                        f" p50 {z['p50']:6.0f} us cpu {z['cpu']:6.2f} us/req"
                        f" | device {d['rps']:9,.0f} req/s p50 {d['p50']:6.0f} us"
                        f" | x{z['rps'] / d['rps']:.3f} throughput, x{z['p50'] / d['p50']:.3f} p50",
                        flush=True,
                    )
    for row in wanted:
        print(f"\n{row}")
        summary(results, row)


def summary(results: dict[str, list[dict[str, dict[str, dict[str, float]]]]], row: str) -> None:
    """Each section's means for A and B, and B/A, for ``row``."""
    for section in SECTIONS:
        means = {}
        for side in ("a", "b"):
            rows = [r[section] for r in results[side] if section in r and row in r[section]]
            if not rows:
                continue
            means[side] = {
                "thr": statistics.mean(x[row]["rps"] / x["device"]["rps"] for x in rows),
                "p50": statistics.mean(x[row]["p50"] / x["device"]["p50"] for x in rows),
                "cpu": statistics.mean(x[row]["cpu"] for x in rows),
                "cpu_dev": statistics.mean(x[row]["cpu"] / x["device"]["cpu"] for x in rows),
            }
            m = means[side]
            print(
                f"{section:9} {side.upper()}: x{m['thr']:.3f} device throughput, x{m['p50']:.3f} device p50, "
                f"broker cpu {m['cpu']:.2f} us/req (x{m['cpu_dev']:.2f} the device's)"
            )
        if len(means) == 2:
            a, b = means["a"], means["b"]
            print(
                f"{section:9} B/A: throughput ratio x{b['thr'] / a['thr']:.3f}, p50 ratio x{b['p50'] / a['p50']:.3f}, "
                f"broker cpu x{b['cpu'] / a['cpu']:.3f}"
            )


if __name__ == "__main__":
    main()
