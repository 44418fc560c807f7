#!/usr/bin/env python3
"""Summarizes a CubeCL kernel profile (`[profiling.logger] level = "basic"` in cubecl.toml: one
line `| duration | kernel name` per launch), as scripts/gpu_session.sh records it.

Prints the time by kernel family over the whole log, then per training step: steps are cut
at each launch of MARKER, a kernel that runs once a step (default: the loss's scatter-add).

    python3 scripts/kernel_profile.py kernels.log [--marker ScatterAddAtomicKernel]
"""
import argparse
import collections
import re

UNITS = {"ns": 1e-9, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\| ([0-9.]+)(ns|µs|ms|s)\s+\| (.+?)\s*$")


def family(name):
    """The kernel's name without its hash, and a matrix product named by its algorithm."""
    base = re.sub(r"_[0-9a-f]{8}\b", "", name).split(" |")[0]
    if base == "MatmulEntry":
        algorithm = re.search(r"\| (\w+MatmulFamily|GlobalPartitionMatmul)", name)
        return "Matmul(" + (algorithm.group(1) if algorithm else "?") + ")"
    return base


def table(launches, title):
    time, count = collections.Counter(), collections.Counter()
    for seconds, name in launches:
        time[family(name)] += seconds
        count[family(name)] += 1
    total = sum(time.values())
    print(f"\n{title}: {len(launches)} launches, {total * 1e3:.1f} ms of kernel time")
    for name, seconds in time.most_common(12):
        print(f"  {seconds * 1e3:9.2f} ms {100 * seconds / total:5.1f}% {count[name]:6d}x  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--marker", default="ScatterAddAtomicKernel")
    args = parser.parse_args()
    launches = []
    with open(args.log, encoding="utf-8") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                launches.append((float(m.group(1)) * UNITS[m.group(2)], m.group(3)))
    table(launches, "whole log")
    marks = [i for i, (_, name) in enumerate(launches) if name.startswith(args.marker)]
    steps = [launches[a:b] for a, b in zip(marks, marks[1:])]
    if steps:
        table(steps[0], "first full step")
        table([l for step in steps[1:] for l in step], f"the {len(steps) - 1} steps after it")
        for i, step in enumerate(steps):
            print(f"step {i + 1}: {sum(s for s, _ in step) * 1e3:.1f} ms, {len(step)} launches")
        # The slowest single launches in the last step: which layers dominate.
        print("\nlaunches over 0.5 ms in the last step, in order:")
        for seconds, name in steps[-1]:
            if seconds > 0.5e-3:
                print(f"  {seconds * 1e3:7.3f} ms  {family(name)}")


if __name__ == "__main__":
    main()
