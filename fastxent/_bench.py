"""``fastxent bench``: fastxent beside its yardstick and its peers, checked against the reference.

For each case (op, shape, dtype) this module generates synthetic logits once,
then times, one after the other in this process:

* ``read``: one pass reading the logits (``fastxent._peers.read_yardstick``),
  the floor any kernel over them must pay;
* fastxent on each backend asked for (``numba``; ``numpy``, the float64
  reference, only up to :data:`REFERENCE_MAX_ELEMENTS` unless named with
  ``--backend``; ``cupy`` on a CUDA device);
* every installed peer of the op (``fastxent._peers.PEERS``; on a device
  ``GPU_PEERS``).

Timing: one warm-up call first (it compiles the Numba kernels, or loads them
from the on-disk cache, and jit-compiles the peers), excluded; its result is
checked and dropped; then timed calls as :func:`_keep_going` decides (at least
two, usually three or more), the median reported. The float64 reference is
timed from its first call (it compiles nothing and takes seconds). On the CPU
each call is timed with ``time.perf_counter``; on a CUDA device with CUDA
events on the null stream, the L2 cache flushed before each call (llm.c).

Agreement: each result is compared with the float64 reference
(``backend="numpy"``, :class:`_Reference`) within ``fastxent._peers.TOLERANCE``:
per-row losses (and lse) on every row, the reduced loss against the mean of
the reference's per-row losses, gradients and the other fields on a sample of
rows spread over the array (the reference needs ~40 bytes per element, too
much for 131 M elements in a benchmark of a minute or two).

GB/s is ``fastxent._peers.bytes_moved`` (logits and labels read, loss and
gradient written) over the median time; ``x read`` is the time over the
read's time (1.0 is the floor); ``vs P`` is peer P's time over this row's
time (above 1: this row is faster).
"""

import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import _peers

#: The built-in default: sparse softmax cross-entropy forward and fused
#: forward+backward at an LLM vocabulary, a mid-size classifier and a short
#: row, float32; the fused pass in bfloat16 at the LLM vocabulary; the score
#: bundle and multi-label sigmoid where a fastxent backend other than the
#: reference has them. Most of the time goes to the peers: each installed one
#: adds its own (see the README for figures; --peers chooses).
DEFAULT_CASES = (
    ("sparse_fwd", (4096, 32000), "float32"),
    ("sparse_fwd_bwd", (4096, 32000), "float32"),
    ("sparse_fwd", (65536, 1000), "float32"),
    ("sparse_fwd_bwd", (65536, 1000), "float32"),
    ("sparse_fwd", (1_000_000, 10), "float32"),
    ("sparse_fwd_bwd", (1_000_000, 10), "float32"),
    ("sparse_fwd_bwd", (4096, 32000), "bfloat16"),
    ("score", (65536, 1000), "float32"),
    ("sigmoid_fwd", (16384, 1000), "float32"),
    ("sigmoid_fwd_bwd", (16384, 1000), "float32"),
)
DEFAULT_SHAPES = ((4096, 32000), (65536, 1000), (1_000_000, 10))
DEFAULT_OPS = tuple(_peers.OPS)

#: ``--quick``: every op on arrays of about 1 MB, for the tests (seconds, not a measurement).
QUICK_CASES = tuple(
    [(op, shape, "float32") for op in ("sparse_fwd", "sparse_fwd_bwd") for shape in ((256, 1000), (4096, 10))]
    + [("sparse_fwd_bwd", (256, 1000), "bfloat16")]
    + [(op, (256, 1000), "float32") for op in ("score", "sigmoid_fwd", "sigmoid_fwd_bwd")]
)
QUICK_REPEAT = 3

#: The float64 reference is timed only up to this many elements unless named
#: with ``--backend``: it needs ~40 bytes per element and ~0.1 us per element here.
REFERENCE_MAX_ELEMENTS = 10_000_000
#: Elements of the row sample checked against the reference for the fields
#: that are not checked on every row (gradients, entropy, argmax, sigmoid rows).
SAMPLE_ELEMENTS = 1_000_000
#: Elements per chunk when the reference runs over a whole array.
REFERENCE_CHUNK_ELEMENTS = 1_000_000

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

DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: str

    @property
    def shape_text(self):
        return "x".join(str(n) for n in self.shape)


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


class BenchError(Exception):
    """Bad options (unknown op, dtype, shape): one line for the user."""


# ----------------------------------------------------------------------------
# Options -> cases
# ----------------------------------------------------------------------------

def parse_shapes(text):
    shapes = []
    for part in text.split(","):
        part = part.strip().lower().replace("×", "x")
        if not part:
            continue
        try:
            dims = tuple(int(d.replace("_", "")) for d in part.split("x"))
        except ValueError:
            raise BenchError(f"--shapes: {part!r} is not ROWSxCLASSES (e.g. 4096x32000)") from None
        if len(dims) != 2 or min(dims) < 1:
            raise BenchError(f"--shapes: {part!r} is not ROWSxCLASSES with both at least 1")
        shapes.append(dims)
    if not shapes:
        raise BenchError("--shapes: no shape given")
    return shapes


def _parse_list(text, allowed, option):
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in allowed:
            raise BenchError(f"{option}: {name!r} is not one of {', '.join(allowed)}")
    if not names:
        raise BenchError(f"{option}: nothing given")
    return names


def make_cases(ops=None, shapes=None, dtypes=None, quick=False):
    """The cases to run: the built-in list, or the product of what was given.

    With none of ``ops``/``shapes``/``dtypes`` the built-in list
    (:data:`DEFAULT_CASES`, or :data:`QUICK_CASES` with ``quick``); else every
    op x shape x dtype, each list defaulting to all ops, the default (or
    quick) shapes and float32. The 16-bit dtypes need ml_dtypes for bfloat16.
    """
    if ops is None and shapes is None and dtypes is None:
        cases = QUICK_CASES if quick else DEFAULT_CASES
    else:
        ops = _parse_list(ops, tuple(_peers.OPS), "--ops") if ops else list(DEFAULT_OPS)
        if shapes:
            shapes = parse_shapes(shapes)
        else:
            shapes = sorted({case[1] for case in QUICK_CASES}) if quick else list(DEFAULT_SHAPES)
        dtypes = _parse_list(dtypes, DTYPES, "--dtypes") if dtypes else ["float32"]
        cases = [(op, tuple(shape), dtype) for shape in shapes for dtype in dtypes for op in ops]
    return [Case(op, tuple(shape), dtype) for op, shape, dtype in cases]


def usable_cases(cases, strict):
    """``(cases that can run here, skipped)``: bfloat16 needs ml_dtypes.

    ``strict`` (the dtypes were asked for by name): a missing ml_dtypes is an
    error. Otherwise (the built-in list) its bfloat16 cases are skipped with
    the reason, so that ``pip install . && fastxent bench`` runs without it.
    """
    kept, skipped = [], []
    for case in cases:
        try:
            numpy_dtype(case.dtype)
        except BenchError as exc:
            if strict:
                raise
            skipped.append((case, "the whole case", str(exc).replace("--dtypes bfloat16 ", "bfloat16 ")))
            continue
        kept.append(case)
    return kept, skipped


def numpy_dtype(name):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise BenchError("--dtypes bfloat16 needs ml_dtypes (pip install 'fastxent[bfloat16]')") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def synthetic_logits(shape, dtype, seed=0):
    """Spiky random scores of ``shape``, fast to make at any size.

    A block of 4 M normal variates (x3, and 2% of them x8 so that the softmax
    is not flat: llm.c's advice) is tiled over the array, each copy rotated by
    a random offset, so no two rows repeat; ``standard_normal`` over all of
    4096x32000 would take 2.6 s here, this takes 0.3 s.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    block = max(1, min(size, 1 << 22))
    base = rng.standard_normal(block, dtype=np.float32) * 3
    base[rng.random(block) < 0.02] *= 8
    flat = np.empty(size, np.float32)
    for start in range(0, size, block):
        out = flat[start:start + block]
        shift = int(rng.integers(block))
        head = base[shift:shift + out.size]
        out[:head.size] = head
        if head.size < out.size:
            out[head.size:] = base[:out.size - head.size]
    flat = flat.reshape(shape)
    return flat if dtype == np.float32 else flat.astype(dtype)


def _f64(x):
    """Exact float64 copy (bfloat16 through its bits: ml_dtypes' astype is 10x slower)."""
    if x.dtype.name == "bfloat16":
        x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------
# Agreement with the float64 reference
# ----------------------------------------------------------------------------

class _Reference:
    """The float64 reference (``backend="numpy"``) for one array, computed lazily.

    ``loss``/``lse``: every row, from the reference's ``logsumexp`` run over
    float64 chunks of rows (``loss = lse - x[y]``, the sparse loss without
    options). Everything else on the rows of :attr:`sample`.
    """

    def __init__(self, logits, labels):
        import fastxent

        self.fx = fastxent
        self.logits = logits
        self.labels = labels
        rows, count = logits.shape
        take = max(1, min(rows, SAMPLE_ELEMENTS // count))
        self.sample = np.unique(np.linspace(0, rows - 1, take).astype(np.int64))
        self._cache = {}

    def _chunks(self):
        rows, count = self.logits.shape
        step = max(1, REFERENCE_CHUNK_ELEMENTS // count)
        return [(start, min(rows, start + step)) for start in range(0, rows, step)]

    def lse(self):
        if "lse" not in self._cache:
            self._cache["lse"] = np.concatenate([
                self.fx.logsumexp(_f64(self.logits[a:b]), backend="numpy") for a, b in self._chunks()])
        return self._cache["lse"]

    def loss(self):
        if "loss" not in self._cache:
            rows = np.arange(self.logits.shape[0])
            self._cache["loss"] = self.lse() - _f64(self.logits[rows, self.labels])
        return self._cache["loss"]

    def sigmoid_mean(self):
        if "sigmoid_mean" not in self._cache:
            total = sum(float(self.fx.sigmoid_cross_entropy(_f64(self.logits[a:b]), self.labels[a:b],
                                                            reduction="sum", backend="numpy"))
                        for a, b in self._chunks())
            self._cache["sigmoid_mean"] = total / self.logits.size
        return self._cache["sigmoid_mean"]

    def rows(self, op):
        """The reference on the sampled rows: per-row results, gradients unscaled."""
        if op not in self._cache:
            # float64 copies of the sampled rows: the reference's results are then float64
            # too, not rounded to the scores' dtype before the comparison.
            x, y = _f64(self.logits[self.sample]), self.labels[self.sample]
            fx = self.fx
            if op == "sparse_fwd_bwd":
                value = fx.sparse_softmax_cross_entropy(x, y, return_grad=True, backend="numpy")
            elif op == "sigmoid_fwd":
                value = fx.sigmoid_cross_entropy(x, y, backend="numpy")
            elif op == "sigmoid_fwd_bwd":
                value = fx.sigmoid_cross_entropy(x, y, return_grad=True, backend="numpy")
            elif op == "score":
                value = tuple(fx.score(x, y, backend="numpy"))
            else:
                raise KeyError(op)
            self._cache[op] = value
        return self._cache[op]


def _mismatch(what, actual, expected, tol, exact=False):
    """None when ``actual`` agrees with ``expected``, else a short description."""
    actual = np.asarray(actual)
    a = _f64(actual) if actual.dtype.name == "bfloat16" else np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return f"{what}: shape {a.shape}, expected {e.shape}"
    with np.errstate(invalid="ignore"):
        if exact:
            ok = (a == e) | (np.isnan(a) & np.isnan(e))
        else:
            rtol, atol = tol
            ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) | (a == e)
    if ok.all():
        return None
    bad = np.argwhere(~ok) if a.ndim else [()]
    first = tuple(int(i) for i in bad[0])
    return (f"{what}: {len(bad)} of {max(1, a.size)} differ, first at {first}: "
            f"{a[first]!r} vs reference {e[first]!r}")


def check(op, result, ref):
    """Compare one result with the reference: None when it agrees, else why not."""
    result = _peers.to_host(result)
    sample = ref.sample
    rows, count = ref.logits.shape
    problems = []

    def compare(what, actual, expected, kind="value", exact=False, dtype=None):
        actual = np.asarray(actual)
        tol = _peers.tolerance(dtype or actual.dtype, kind)
        problems.append(_mismatch(what, actual, expected, tol, exact))

    if op == "sparse_fwd":
        compare("loss", result, ref.loss())
    elif op == "sparse_fwd_bwd":
        loss, grad = result
        compare("mean loss", loss, ref.loss().mean())
        grad = np.asarray(grad)
        # Scaled back to one row's gradient (x N): atol then means the same at any N.
        compare(f"grad (x{rows}) rows", _f64(grad[sample]) * rows, ref.rows(op)[1], kind="stored",
                dtype=grad.dtype)
    elif op == "score":
        fields = dict(zip(_peers.SCORE_FIELDS, result))
        expected = dict(zip(_peers.SCORE_FIELDS, ref.rows(op)))
        compare("loss", fields["loss"], ref.loss())
        compare("lse", fields["lse"], ref.lse())
        compare("target_logprob", fields["target_logprob"], -ref.loss())
        compare("entropy", np.asarray(fields["entropy"])[sample], expected["entropy"])
        compare("argmax", np.asarray(fields["argmax"])[sample], expected["argmax"], exact=True)
        compare("correct", np.asarray(fields["correct"])[sample], expected["correct"], exact=True)
    elif op == "sigmoid_fwd":
        compare("loss rows", np.asarray(result)[sample], ref.rows(op))
    elif op == "sigmoid_fwd_bwd":
        loss, grad = result
        compare("mean loss", loss, ref.sigmoid_mean())
        grad = np.asarray(grad)
        compare(f"grad (x{rows * count}) rows", _f64(grad[sample]) * (rows * count),
                ref.rows(op)[1], kind="stored", dtype=grad.dtype)
    else:
        raise KeyError(op)
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else None


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def _keep_going(times, repeat):
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
        while _keep_going(times, repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return verdict, times


def time_cuda(call, repeat=None, inspect=None):
    """As :func:`time_cpu`, timed with CUDA events, the L2 cache flushed before each call."""
    import cupy

    device = cupy.cuda.Device()
    result = call()
    device.synchronize()
    verdict = inspect(result) if inspect else None
    del result
    l2_bytes = cupy.cuda.runtime.getDeviceProperties(device.id).get("l2CacheSize", 64 << 20)
    flush = cupy.empty(max(1, 2 * int(l2_bytes)), dtype=np.uint8)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    while _keep_going(times, repeat):
        flush.fill(0)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    del flush
    return verdict, times


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
    y = _peers.make_labels(op, (2, 3))
    try:
        if backend == "cupy":
            import cupy

            x, y = cupy.asarray(x), cupy.asarray(y)
    except Exception as exc:  # noqa: BLE001 -- e.g. CuPy has no bfloat16
        return f"cannot put {np.dtype(dtype).name} on the device ({type(exc).__name__}: {exc})"
    try:
        _peers.fastxent_call(op, x, y, backend=backend)()
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
        for peer in _peers.installed_peers(case.op):
            if peers is None or peer in peers:
                entries.append(Entry(peer, "peer", "cpu", peer))
    if "cupy" in backends:
        entries.append(Entry("read-cuda", "yardstick", "cuda", "read"))
        entries.append(Entry("fastxent[cupy]", "backend", "cuda", "cupy"))
        for peer in _peers.installed_gpu_peers(case.op):
            if peers is None or peer in peers:
                entries.append(Entry(peer, "peer", "cuda", peer))
    return entries, skipped


def _entry_call(case, entry, logits, labels):
    if entry.kind == "yardstick":
        return _peers.read_yardstick(logits)
    if entry.kind == "backend":
        return _peers.fastxent_call(case.op, logits, labels, backend=entry.target)
    if entry.device == "cuda":
        return _peers.gpu_peer_call(case.op, entry.target, logits, labels)
    return _peers.peer_call(case.op, entry.target, logits, labels)


def run(cases, backends, peers=None, repeat=None, explicit_numpy=False, progress=None, log=None):
    """Run ``cases`` on ``backends`` and ``peers``; return ``(rows, skipped, notes)``.

    ``peers``: None for every installed peer, else the names to keep.
    ``progress``: a callable ``(total) -> object with update(text) and close()``.
    ``log``: where to write one-line warnings (stderr), or None.
    """
    rows, skipped, notes = [], [], []
    # Which (op, backend, dtype) run at all, probed on a 2x3 array: an op a backend
    # does not have yet is skipped with the reason, not reported as a failure.
    probes = {}
    for case in cases:
        for backend in backends:
            key = (case.op, backend, case.dtype)
            if key not in probes:
                probes[key] = _probe(case.op, backend, numpy_dtype(case.dtype))
    runnable = []
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

    plan = []
    for case, ready in runnable:
        entries, skips = _entries(case, ready, peers, explicit_numpy)
        skipped.extend((case, name, why) for name, why in skips)
        plan.append((case, entries))
    bar = progress(sum(len(entries) for _, entries in plan)) if progress else None

    # One (shape, dtype) of data at a time, shared by the ops on it.
    plan.sort(key=lambda item: (item[0].shape, item[0].dtype, list(_peers.OPS).index(item[0].op)))
    data_key, data = None, {}
    try:
        for case, entries in plan:
            dtype = numpy_dtype(case.dtype)
            if data_key != (case.shape, case.dtype):
                data.clear()
                gc.collect()
                data_key = (case.shape, case.dtype)
                data["logits"] = synthetic_logits(case.shape, dtype)
            kind = _peers.OPS[case.op][1]
            if kind not in data:
                labels = _peers.make_labels(case.op, case.shape)
                data[kind] = (labels, _Reference(data["logits"], labels))
            labels, ref = data[kind]
            for entry in entries:
                if bar:
                    bar.update(f"{case.op} {case.shape_text} {case.dtype} {entry.name}")
                row = _measure(case, entry, data, kind, labels, ref, repeat, skipped)
                if row is not None:
                    rows.append(row)
                    if row.agrees is False and log:
                        log(f"{entry.name} disagrees with the reference on {case.op} "
                            f"{case.shape_text} {case.dtype}: {row.detail}")
    finally:
        if bar:
            bar.close()
        data.clear()
    # Computed grouped by data; reported in the order the cases were given.
    order = {case: index for index, case in enumerate(cases)}
    rows.sort(key=lambda row: order[row.case])
    if any(b == "numba" for b in backends):
        notes.append("the warm-up call before the timed runs compiles the Numba kernels "
                     "(or loads them from the on-disk cache); it is excluded from the timings")
    return rows, skipped, notes


def _device_data(data, kind):
    import cupy

    if "cuda_logits" not in data:
        data["cuda_logits"] = cupy.asarray(data["logits"])
    key = f"cuda_labels_{kind}"
    if key not in data:
        data[key] = cupy.asarray(data[kind][0])
    return data["cuda_logits"], data[key]


def _measure(case, entry, data, kind, labels, ref, repeat, skipped):
    """Time one entry on one case; None (and a ``skipped`` line) when it cannot run."""
    started = time.perf_counter()
    row = _measure_row(case, entry, data, kind, labels, ref, repeat, skipped)
    if row is not None:
        row.spent = time.perf_counter() - started
    return row


def _measure_row(case, entry, data, kind, labels, ref, repeat, skipped):
    logits = data["logits"]
    timer = time_cpu
    try:
        if entry.device == "cuda":
            logits, labels = _device_data(data, kind)
            timer = time_cuda
        call = _entry_call(case, entry, logits, labels)
        inspect = None if entry.kind == "yardstick" else (lambda result: check(case.op, result, ref))
        if timer is time_cpu:
            # The float64 reference compiles nothing and takes seconds a call: its first
            # call is timed. (The numpy peer is warmed up: its first call at 4096x32000
            # took 3.0 s against 0.46 s for the next, all of it first-touch page faults.)
            problem, times = timer(call, repeat, inspect=inspect,
                                   warm_up=not (entry.kind == "backend" and entry.target == "numpy"))
        else:
            problem, times = timer(call, repeat, inspect=inspect)
    except Exception as exc:  # noqa: BLE001 -- report, do not stop the benchmark
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if entry.kind == "backend":
            return Row(case, entry, [], _peers.bytes_moved(case.op, logits, labels), False,
                       f"failed: {message}")
        skipped.append((case, entry.name, f"failed: {message}"))
        return None
    if entry.kind == "yardstick":
        return Row(case, entry, times, logits.nbytes, None, "")
    return Row(case, entry, times, _peers.bytes_moved(case.op, logits, labels),
               problem is None, problem or "")


# ----------------------------------------------------------------------------
# Output: table, JSON, plot
# ----------------------------------------------------------------------------

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
