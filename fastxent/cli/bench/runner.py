"""The ``fastxent bench`` run: which entries each case gets, measured one after the other.

For each case (op, shape, dtype) the synthetic logits are made once, then
timed, one after the other in this process:

* ``read``: one pass reading the logits (:func:`.peers.read_yardstick`),
  the floor any kernel over them must pay;
* fastxent on each backend asked for (``numba``; ``numpy``, the float64
  reference, only up to :data:`REFERENCE_MAX_ELEMENTS` unless named with
  ``--backend``; ``cupy`` on a CUDA device);
* every installed peer of the op (:data:`.peers.PEERS`; on a device
  :data:`.peers.GPU_PEERS`).

Each entry is timed by :mod:`.timing` (the float64 reference from its first
call: it compiles nothing and takes seconds) and its first result checked by
:mod:`.agreement`. An op a backend does not have, or a dtype it refuses, is
skipped with the reason; any other failure of a fastxent backend is a failed
(✗) row, of a peer a skipped one.
"""

import gc
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from .agreement import Reference, check
from .cases import OPS, Case, bytes_moved, make_labels, numpy_dtype, synthetic_logits
from .peers import fastxent_call, gpu_peer_call, installed_gpu_peers, installed_peers, peer_call, read_yardstick
from .timing import time_cpu, time_cuda

#: The float64 reference is timed only up to this many elements unless named
#: with ``--backend``: it needs ~40 bytes per element and ~0.1 us per element here.
REFERENCE_MAX_ELEMENTS = 10_000_000


@dataclass(frozen=True)
class Entry:
    name: str      # "read", "fastxent[numba]", "torch", "torch-cuda", ...
    kind: str      # "yardstick" | "backend" | "peer"
    device: str    # "cpu" | "cuda"
    target: str    # backend or peer name


@dataclass
class Row:
    case: Case
    entry: Entry
    times: list = field(default_factory=list)
    nbytes: int = 0
    agrees: object = None  # True / False / None (yardstick)
    detail: str = ""
    spent: float = 0.0  # seconds this entry took in all: factory, warm-up, timed runs, check

    @property
    def median(self):
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def gbps(self):
        return self.nbytes / self.median / 1e9 if self.times else float("nan")


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

def _probe(op, backend, dtype):
    """None if fastxent should run ``op`` on ``backend`` for ``dtype`` here, else why not.

    A function the backend does not have yet, or a dtype it refuses, is a
    reason to skip; any other failure is left to the measurement, which
    reports it as a failed (✗) row.
    """
    x = synthetic_logits((2, 3), dtype)
    y = make_labels(op, (2, 3))
    try:
        if backend == "cupy":
            import cupy

            x, y = cupy.asarray(x), cupy.asarray(y)
    except Exception as exc:  # noqa: BLE001 -- e.g. CuPy has no bfloat16
        return f"cannot put {np.dtype(dtype).name} on the device ({type(exc).__name__}: {exc})"
    try:
        fastxent_call(op, x, y, backend=backend)()
    except (AttributeError, NotImplementedError, ImportError) as exc:
        return f"not available in this build ({type(exc).__name__}: {exc})"
    except (TypeError, ValueError) as exc:
        return f"not supported ({exc})"
    except Exception:  # noqa: BLE001 -- a real failure: measured, and reported as such
        return None
    return None


def _entries(case, backends, peers, explicit_numpy):
    """The entries measured for ``case``: yardstick, backends, peers (host, then device)."""
    host_backends = [b for b in backends if b != "cupy"]
    entries = []
    skipped = []
    if host_backends:
        entries.append(Entry("read", "yardstick", "cpu", "read"))
        for backend in host_backends:
            if backend == "numpy" and not explicit_numpy and np.prod(case.shape) > REFERENCE_MAX_ELEMENTS:
                skipped.append(("fastxent[numpy]", f"the float64 reference is timed up to "
                                f"{REFERENCE_MAX_ELEMENTS:,} elements (name it in --backend to force)"))
                continue
            entries.append(Entry(f"fastxent[{backend}]", "backend", "cpu", backend))
        for peer in installed_peers(case.op):
            if peers is None or peer in peers:
                entries.append(Entry(peer, "peer", "cpu", peer))
    if "cupy" in backends:
        entries.append(Entry("read-cuda", "yardstick", "cuda", "read"))
        entries.append(Entry("fastxent[cupy]", "backend", "cuda", "cupy"))
        for peer in installed_gpu_peers(case.op):
            if peers is None or peer in peers:
                entries.append(Entry(peer, "peer", "cuda", peer))
    return entries, skipped


def _entry_call(case, entry, logits, labels):
    if entry.kind == "yardstick":
        return read_yardstick(logits)
    if entry.kind == "backend":
        return fastxent_call(case.op, logits, labels, backend=entry.target)
    if entry.device == "cuda":
        return gpu_peer_call(case.op, entry.target, logits, labels)
    return peer_call(case.op, entry.target, logits, labels)


def run(cases, backends, peers=None, repeat=None, explicit_numpy=False, progress=None, log=None):
    """Run ``cases`` on ``backends`` and ``peers``; return ``(rows, skipped, notes)``.

    ``peers``: None for every installed peer, else the names to keep.
    ``progress``: a callable ``(total) -> object with update(text) and close()``.
    ``log``: where to write one-line warnings (stderr), or None.
    """
    runnable, skipped = _runnable(cases, backends, explicit_numpy)
    plan = []
    for case, ready in runnable:
        entries, skips = _entries(case, ready, peers, explicit_numpy)
        skipped.extend((case, name, why) for name, why in skips)
        plan.append((case, entries))
    rows = _measure_plan(plan, repeat, skipped, progress, log)
    # Computed grouped by data; reported in the order the cases were given.
    order = {case: index for index, case in enumerate(cases)}
    rows.sort(key=lambda row: order[row.case])
    notes = []
    if any(b == "numba" for b in backends):
        notes.append("the warm-up call before the timed runs compiles the Numba kernels "
                     "(or loads them from the on-disk cache); it is excluded from the timings")
    return rows, skipped, notes


def _runnable(cases, backends, explicit_numpy):
    """``([(case, backends that run it)], skipped)``, each (op, backend, dtype) probed once.

    Probed on a 2x3 array: an op a backend does not have yet is skipped with
    the reason, not reported as a failure.
    """
    probes = {}
    for case in cases:
        for backend in backends:
            key = (case.op, backend, case.dtype)
            if key not in probes:
                probes[key] = _probe(case.op, backend, numpy_dtype(case.dtype))
    runnable, skipped = [], []
    for case in cases:
        ready = [b for b in backends if probes[(case.op, b, case.dtype)] is None]
        for backend in backends:
            reason = probes[(case.op, backend, case.dtype)]
            if reason:
                skipped.append((case, f"fastxent[{backend}]", reason))
        # A case only the float64 reference can run is not worth its peers' time.
        if any(b != "numpy" for b in ready) or (ready and explicit_numpy):
            runnable.append((case, ready))
        elif ready:
            skipped.append((case, "the whole case", "no fastxent backend but the reference runs it"))
    return runnable, skipped


class CaseData:
    """The arrays of one (shape, dtype), shared by the ops on it.

    The synthetic logits; per labels kind (:data:`.cases.OPS`) the labels and
    their :class:`.agreement.Reference`; CuPy copies made on first use.
    """

    def __init__(self, shape, dtype):
        self.logits = synthetic_logits(shape, numpy_dtype(dtype))
        self.labels = {}
        self.device = {}

    def host(self, op):
        """``(logits, labels, reference)`` for ``op`` on the host."""
        kind = OPS[op][1]
        if kind not in self.labels:
            labels = make_labels(op, self.logits.shape)
            self.labels[kind] = (labels, Reference(self.logits, labels))
        labels, ref = self.labels[kind]
        return self.logits, labels, ref

    def cuda(self, op):
        """``(logits, labels)`` for ``op`` as CuPy arrays on the current device."""
        import cupy

        _, labels, _ = self.host(op)
        if "logits" not in self.device:
            self.device["logits"] = cupy.asarray(self.logits)
        kind = OPS[op][1]
        if kind not in self.device:
            self.device[kind] = cupy.asarray(labels)
        return self.device["logits"], self.device[kind]


def _measure_plan(plan, repeat, skipped, progress, log):
    """Measure every ``(case, entries)`` of ``plan``, one (shape, dtype) of data at a time."""
    rows = []
    bar = progress(sum(len(entries) for _, entries in plan)) if progress else None
    plan = sorted(plan, key=lambda item: (item[0].shape, item[0].dtype, list(OPS).index(item[0].op)))
    data_key, data = None, None
    try:
        for case, entries in plan:
            if data_key != (case.shape, case.dtype):
                data = None
                gc.collect()
                data_key = (case.shape, case.dtype)
                data = CaseData(case.shape, case.dtype)
            for entry in entries:
                if bar:
                    bar.update(text=f"{case.op} {case.shape_text} {case.dtype} {entry.name}")
                row = _measure(case, entry, data, repeat, skipped)
                if row is not None:
                    rows.append(row)
                    if row.agrees is False and log:
                        log(f"{entry.name} disagrees with the reference on {case.op} "
                            f"{case.shape_text} {case.dtype}: {row.detail}")
    finally:
        if bar:
            bar.close()
    return rows


def _measure(case, entry, data, repeat, skipped):
    """Time one entry on one case; None (and a ``skipped`` line) when it cannot run."""
    started = time.perf_counter()
    row = _measure_row(case, entry, data, repeat, skipped)
    if row is not None:
        row.spent = time.perf_counter() - started
    return row


def _measure_row(case, entry, data, repeat, skipped):
    logits, labels, ref = data.host(case.op)
    try:
        if entry.device == "cuda":
            logits, labels = data.cuda(case.op)
        call = _entry_call(case, entry, logits, labels)
        inspect = None if entry.kind == "yardstick" else (lambda result: check(case.op, result, ref))
        if entry.device == "cuda":
            problem, times = time_cuda(call, repeat, inspect=inspect)
        else:
            # The float64 reference compiles nothing and takes seconds a call: its first
            # call is timed. (The numpy peer is warmed up: its first call at 4096x32000
            # took 3.0 s against 0.46 s for the next, all of it first-touch page faults.)
            problem, times = time_cpu(call, repeat, inspect=inspect,
                                      warm_up=not (entry.kind == "backend" and entry.target == "numpy"))
    except Exception as exc:  # noqa: BLE001 -- report, do not stop the benchmark
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if entry.kind == "backend":
            return Row(case, entry, [], bytes_moved(case.op, logits, labels), False,
                       f"failed: {message}")
        skipped.append((case, entry.name, f"failed: {message}"))
        return None
    if entry.kind == "yardstick":
        return Row(case, entry, times, logits.nbytes, None, "")
    return Row(case, entry, times, bytes_moved(case.op, logits, labels),
               problem is None, problem or "")
