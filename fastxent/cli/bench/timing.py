"""Timing one call: ``time.perf_counter`` on the CPU, CUDA events on a device.

Both timers make the untimed warm-up call(s) first (they compile the Numba
kernels or load them from the on-disk cache, jit-compile the peers), inspect
the first result (check it against the reference) and drop it, then time
calls as :func:`keep_going` decides (at least two, usually three or more) and
return every time; the caller reports the median. On a CUDA device each call
is timed with CUDA events on the null stream, the L2 cache flushed before it
(llm.c's habit), so no call reads what the previous one left in the cache.
"""

import gc
import time

import numpy as np

#: Automatic repeat: at least AUTO_MIN_RUNS timed runs and AUTO_MIN_SECONDS of
#: timed calls, at most AUTO_MAX_RUNS; an entry whose fastest of two runs takes
#: over AUTO_SLOW_SECONDS stops at two (a peer at 2 s a call: its ratio to a
#: kernel 10x faster is not read to three digits). Never one run: on this VM
#: the first call that touches fresh memory can take 7x the next (0.89 s
#: against 0.13 s for a 524 MB gradient), and a median needs the second.
AUTO_MIN_RUNS = 3
AUTO_MIN_SECONDS = 0.3
AUTO_SLOW_SECONDS = 1.0
AUTO_MAX_RUNS = 20

#: L2 size assumed when the device does not report one (bytes).
DEFAULT_L2_BYTES = 64 << 20


def keep_going(times, repeat):
    """Whether to time another call after ``times``: ``repeat`` runs, or as above."""
    if repeat:
        return len(times) < repeat
    if len(times) < 2:
        return True
    if len(times) >= AUTO_MAX_RUNS or (len(times) == 2 and min(times) > AUTO_SLOW_SECONDS):
        return False
    return len(times) < AUTO_MIN_RUNS or sum(times) < AUTO_MIN_SECONDS


def time_cpu(call, repeat=None, warm_up=True, inspect=None):
    """``(inspect(result of the first call), [seconds per timed call])``.

    With ``warm_up`` the first call is not timed (it compiles, jit-traces,
    loads caches); without it (the float64 reference, which compiles nothing
    and takes seconds at these sizes) the first call is the first timed run.
    The first result is inspected (checked against the reference) and dropped
    before the timed runs, so they reuse its memory: on this VM memory the
    process has not touched lately costs 1.6 s per 524 MB to fault in, against
    0.06 s for memory just freed, and holding the result made the first timed
    runs of a fused pass 4-8x slower than the rest.
    """
    times = []
    if warm_up:
        result = call()
    else:
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    verdict = inspect(result) if inspect else None
    del result
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while keep_going(times, repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return verdict, times


def time_cuda(call, repeat=None, inspect=None, warm_ups=1):
    """As :func:`time_cpu`, timed with CUDA events, the L2 cache flushed before each call.

    ``warm_ups`` untimed calls first (at least one: its result is inspected).
    The flush writes a buffer of twice the L2's size.
    """
    import cupy

    device = cupy.cuda.Device()
    result = call()
    for _ in range(warm_ups - 1):
        call()
    device.synchronize()
    verdict = inspect(result) if inspect else None
    del result
    l2_bytes = cupy.cuda.runtime.getDeviceProperties(device.id).get("l2CacheSize", DEFAULT_L2_BYTES)
    flush = cupy.empty(max(1, 2 * int(l2_bytes)), dtype=np.uint8)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    while keep_going(times, repeat):
        flush.fill(0)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    del flush
    return verdict, times
