"""Render a pytest-benchmark JSON of ``bench/bench_cpu.py`` as a markdown table.

    python bench/render.py bench/results/cpu.json > bench/results/cpu.md

One row per group (``op|shape|dtype``): the median of each entry and
fastxent's ratios to them -- speed-up over each peer, and fastxent's time over
one read of the same array (1.0 is the floor of any kernel that reads it).
"""

import json
import sys
from collections import defaultdict


def table(path):
    with open(path) as handle:
        data = json.load(handle)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        entry = bench["params"]["entry"]
        groups[bench["group"]][entry] = bench["stats"]["median"]
    lines = [
        "| op | shape | dtype | fastxent | read once | numpy | torch | reference (f64) "
        "| fastxent / read | numpy / fastxent | torch / fastxent |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(value):
        return f"{value * 1e3:.1f} ms" if value is not None else "—"

    def ratio(num, den):
        return f"{num / den:.2f}×" if num is not None and den else "—"

    for group in sorted(groups):
        op, shape, dtype = group.split("|")
        times = groups[group]
        ours = times.get("fastxent")
        lines.append(
            f"| {op} | {shape} | {dtype} | {ms(ours)} | {ms(times.get('read'))} | {ms(times.get('numpy'))} "
            f"| {ms(times.get('torch'))} | {ms(times.get('reference'))} | {ratio(ours, times.get('read'))} "
            f"| {ratio(times.get('numpy'), ours)} | {ratio(times.get('torch'), ours)} |")
    machine = data.get("machine_info", {})
    lines.append("")
    lines.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
                 f"{machine.get('cpu', {}).get('count', '?')} CPUs; {data.get('datetime', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
