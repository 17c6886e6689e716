"""Measurement helpers of the benchmarks: wall and process-CPU clocks, other processes' CPU use (from /proc),
medians, and a rich table of seconds per step."""

from __future__ import annotations

import os
import statistics
import time


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _fmt(s: float | None) -> str:
    return "-" if s is None else f"{s:.4f}"


# ----------------------------------------------------------------------------------------------
# The peer: imagen-pytorch, run by the peer venv's interpreter (no reimagen import here, only the
# torchvision workaround loaded from its file, so the peer venv needs nothing of this project).
# ----------------------------------------------------------------------------------------------


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return b[0] - a[0], b[1] - a[1]


def _cpu_snapshot(pids: list[int]) -> tuple[int, int, int] | None:
    """(busy jiffies of all CPUs, total jiffies of all CPUs, jiffies of ``pids``) from /proc, or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal
        total = busy + v[3] + v[4]  # + idle iowait
        own = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own += int(fields[11]) + int(fields[12])  # utime stime (all threads)
        return busy, total, own
    except (OSError, ValueError, IndexError):
        return None


def _other_cores(a, b) -> float | None:
    """CPU cores used on average by processes other than ours between two snapshots."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    ncpu = os.cpu_count() or 1
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / ((b[1] - a[1]) / ncpu))


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _print_table(rows, title: str) -> None:
    """rows: (name, what, median wall s/step, raw wall list | None, median CPU s/step, FLOPs | None)."""
    cols = ("measurement", "what", "s/step", "min", "max", "CPU s/step", "GFLOP")
    cells = []
    for name, what, m, raw, c, fl in rows:
        lo, hi = (min(raw), max(raw)) if raw else (None, None)
        cells.append((name, what, f"{m:.4f}", _fmt(lo), _fmt(hi), f"{c:.4f}", "-" if fl is None else f"{fl / 1e9:.1f}"))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain aligned text
        widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(cols)]
        print(title)
        for r in [cols, *cells]:
            print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        return
    table = Table(title=title)
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 2 else "right")
    for r in cells:
        table.add_row(*r)
    Console(width=140).print(table)
