"""What ``fastxent bench`` reports: the markdown table and its legend, the
machine it ran on, the JSON of every measurement, the plot.

GB/s is :func:`.cases.bytes_moved` (logits and labels read, loss and
gradient written) over the median time; ``x read`` is the time over the
read's time (1.0 is the floor); ``vs P`` is peer P's time over this row's
time (above 1: this row is faster).
"""

import json
import os
import platform
import sys

import numpy as np

from .timing import AUTO_MAX_RUNS, AUTO_MIN_RUNS, AUTO_MIN_SECONDS, AUTO_SLOW_SECONDS


def _format_time(seconds):
    if seconds != seconds:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _format_rate(gbps):
    return f"{gbps:.1f}" if gbps >= 10 else f"{gbps:.2f}" if gbps >= 0.1 else f"{gbps:.2g}"


def skipped_lines(skipped):
    """One line per (entry, reason), listing the cases it applies to."""
    grouped = {}
    for case, name, reason in skipped:
        grouped.setdefault((name, reason), []).append(f"{case.op} {case.shape_text} {case.dtype}")
    return [f"- {name}: {reason}: {', '.join(cases)}" for (name, reason), cases in grouped.items()]


def _peer_columns(rows):
    seen = []
    for row in rows:
        if row.entry.kind == "peer" and row.entry.name not in seen:
            seen.append(row.entry.name)
    return seen


def _group(rows):
    """rows grouped by (case, device) -> {entry name: row}."""
    groups = {}
    for row in rows:
        groups.setdefault((row.case, row.entry.device), {})[row.entry.name] = row
    return groups


def ratios(row, rows_by_name):
    """(time / read time, {peer: peer time / this time}) within the row's case and device."""
    read = rows_by_name.get("read") or rows_by_name.get("read-cuda")
    x_read = row.median / read.median if read and read.times and row.times else None
    vs = {}
    for name, other in rows_by_name.items():
        if row.entry.kind == "yardstick":
            break
        if other.entry.kind == "peer" and name != row.entry.name and other.times and row.times:
            vs[name] = other.median / row.median
    return x_read, vs


def table(rows):
    """The markdown table, one line per row."""
    peers = _peer_columns(rows)
    header = ["op", "shape", "dtype", "entry", "median", "GB/s", "x read"] + [f"vs {p}" for p in peers] + ["ref"]
    lines = [header]
    groups = _group(rows)
    for row in rows:
        x_read, vs = ratios(row, groups[(row.case, row.entry.device)])
        mark = {True: "✓", False: "✗", None: "—"}[row.agrees]
        cells = [row.case.op, row.case.shape_text, row.case.dtype, row.entry.name,
                 _format_time(row.median), _format_rate(row.gbps) if row.times else "—",
                 f"{x_read:.2f}" if x_read is not None else "—"]
        cells += [f"{vs[p]:.2f}x" if p in vs else "" for p in peers]
        cells.append(mark)
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    numeric = {4, 5, 6} | set(range(7, 7 + len(peers)))

    def render(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(str(cell).rjust(widths[i]) if i in numeric else str(cell).ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([render(lines[0]), rule] + [render(cells) for cells in lines[1:]])


LEGEND = "\n".join((
    "- median: of the timed runs (see above).",
    "- GB/s: bytes the op must move (logits and labels read, loss and gradient written) / median.",
    "- x read: median / the time of one read of the same logits (`x.max()`); 1.0 is the floor.",
    "- vs P: P's median / this row's median (above 1: this row is faster).",
    "- ref: ✓ agrees with the float64 reference (`backend=\"numpy\"`) within the dtype's tolerance "
    "(per-row losses on every row, gradients and the other fields on sampled rows), ✗ does not, "
    "— not checked (the yardstick).",
))


def machine():
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    import fastxent

    versions = {"fastxent": fastxent.__version__, "numpy": np.__version__}
    for name in ("numba", "torch", "jax", "tensorflow", "cupy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    info["versions"] = versions
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
            info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 -- CuPy without a device: no GPU line
            pass
    return info


def header(info, repeat):
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    runs = (f"median of {repeat} runs" if repeat else
            f"median of {AUTO_MIN_RUNS}-{AUTO_MAX_RUNS} runs (at least {AUTO_MIN_SECONDS:g} s of timed "
            f"calls; 2 runs for an entry over {AUTO_SLOW_SECONDS:g} s a call)")
    load = info.get("load_average")
    load_text = f", load average {load[0]:.2f} at start" if load else ""
    gpu = f" and {info['gpu']}" if info.get("gpu") else ""
    return (f"fastxent bench on {info['cpu']} ({info['cores']} cores{load_text}){gpu}; {versions}.\n"
            f"Times: {runs}, after one untimed warm-up call (none for the float64 reference, "
            f"which compiles nothing).")


def to_json(rows, skipped, notes, info, settings):
    groups = _group(rows)
    out = []
    for row in rows:
        x_read, vs = ratios(row, groups[(row.case, row.entry.device)])
        out.append({
            "op": row.case.op, "shape": list(row.case.shape), "dtype": row.case.dtype,
            "entry": row.entry.name, "kind": row.entry.kind, "device": row.entry.device,
            "times_s": row.times, "median_s": row.median if row.times else None,
            "bytes": row.nbytes, "gb_per_s": row.gbps if row.times else None,
            "x_read": x_read, "vs": vs, "agrees": row.agrees, "detail": row.detail,
            "spent_s": row.spent,
        })
    return {
        "machine": info, "settings": settings, "rows": out,
        "skipped": [{"op": c.op, "shape": list(c.shape), "dtype": c.dtype, "entry": n, "reason": r}
                    for c, n, r in skipped],
        "notes": notes,
    }


def write_json(path, rows, skipped, notes, info, settings):
    """:func:`to_json` written to ``path``."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(to_json(rows, skipped, notes, info, settings), handle, indent=1)


def text(rows, skipped, notes, info, repeat, elapsed):
    """What ``fastxent bench`` prints: header, table, legend, what was not measured, notes."""
    lines = [header(info, repeat), "", table(rows), "", LEGEND]
    if skipped:
        lines += ["", "Not measured:", *skipped_lines(skipped)]
    lines += [f"\nNote: {note}." for note in notes]
    lines.append(f"\nTotal wall time {elapsed:.1f} s.")
    return "\n".join(lines)


def plot(rows, path):
    """GB/s against the number of classes, one panel per (op, dtype), one line per entry.

    The read yardstick is the dashed black line: the bandwidth of one pass over
    the same logits. Each entry keeps its colour across panels; the x ticks name
    the shapes. Needs matplotlib (``pip install 'fastxent[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, names = [], []
    for row in rows:
        key = (row.case.op, row.case.dtype, row.entry.device)
        if key not in panels:
            panels.append(key)
        if row.entry.kind != "yardstick" and row.entry.name not in names:
            names.append(row.entry.name)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    columns = min(3, len(panels)) or 1
    lines_count = (len(panels) + columns - 1) // columns or 1
    fig, axes = plt.subplots(lines_count, columns, figsize=(5.4 * columns, 4.0 * lines_count),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (op, dtype, device) in zip(axes.flat, panels):
        series, ticks = {}, {}
        for row in rows:
            if (row.case.op, row.case.dtype, row.entry.device) == (op, dtype, device) and row.times:
                series.setdefault(row.entry.name, []).append((row.case.shape[-1], row.gbps))
                ticks[row.case.shape[-1]] = row.case.shape_text
        for name, points in series.items():
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if name.startswith("read"):
                ax.plot(xs, ys, "k--", marker="_", markersize=14, label="one read of the logits", linewidth=1.5)
            else:
                fastxent = name.startswith("fastxent")
                ax.plot(xs, ys, "o-" if fastxent else "s:", color=colours[name], label=name,
                        linewidth=2.2 if fastxent else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if ticks:
            ax.set_xticks(sorted(ticks), [ticks[c] for c in sorted(ticks)], fontsize=8)
            ax.minorticks_off()
            low, high = min(ticks), max(ticks)
            ax.set_xlim(low / 2.5, high * 2.5)
        ax.set_xlabel("shape (rows x classes), classes on a log scale")
        ax.set_ylabel("GB/s (bytes moved / median time)")
        ax.set_title(f"{op}, {dtype}" + (" (CUDA)" if device == "cuda" else ""))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fastxent bench: throughput against the number of classes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
