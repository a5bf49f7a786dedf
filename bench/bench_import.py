"""Time of ``import fastxent`` in a fresh interpreter (budget: 0.5 s), beside ``import numpy``.

    python bench/bench_import.py
"""

import statistics
import subprocess
import sys


def import_seconds(module, repeat=5):
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(repeat)]
    return statistics.median(runs)


if __name__ == "__main__":
    numpy_time = import_seconds("numpy")
    fastxent_time = import_seconds("fastxent")
    print(f"import numpy    {numpy_time * 1e3:7.1f} ms")
    print(f"import fastxent {fastxent_time * 1e3:7.1f} ms (includes numpy; budget 500 ms)")
