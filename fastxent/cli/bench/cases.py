"""What ``fastxent bench`` measures: the ops, the cases (op, shape, dtype), their data.

The ops and the labels each takes, the bytes each must move (the numerator of
every GB/s figure), the built-in case lists and the ``--ops/--shapes/--dtypes``
options turned into cases, the synthetic logits every entry of a case is
timed on, and the exact widening of 16-bit scores the comparisons use. What
computes each op (fastxent and its peers) is :mod:`.peers`.
"""

from dataclasses import dataclass

import numpy as np

from ... import _dtypes

#: op -> (description, needs labels kind: "ids" | "binary")
OPS = {
    "sparse_fwd": ("sparse softmax cross-entropy, forward", "ids"),
    "sparse_fwd_bwd": ("sparse softmax cross-entropy, fused forward+backward", "ids"),
    "sigmoid_fwd": ("sigmoid cross-entropy, forward", "binary"),
    "sigmoid_fwd_bwd": ("sigmoid cross-entropy, forward+backward", "binary"),
    "score": ("score bundle (loss, lse, target_logprob, entropy, argmax, correct)", "ids"),
}

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
DEFAULT_OPS = tuple(OPS)

#: ``--quick``: every op on arrays of about 1 MB, for the tests (seconds, not a measurement).
QUICK_CASES = tuple(
    [(op, shape, "float32") for op in ("sparse_fwd", "sparse_fwd_bwd") for shape in ((256, 1000), (4096, 10))]
    + [("sparse_fwd_bwd", (256, 1000), "bfloat16")]
    + [(op, (256, 1000), "float32") for op in ("score", "sigmoid_fwd", "sigmoid_fwd_bwd")]
)
QUICK_REPEAT = 3

DTYPES = ("float16", "bfloat16", "float32", "float64")

#: Normal variates drawn for :func:`synthetic_logits`, tiled over larger arrays.
SYNTHETIC_BLOCK = 1 << 22


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: str

    @property
    def shape_text(self):
        return "x".join(str(n) for n in self.shape)


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
        ops = _parse_list(ops, tuple(OPS), "--ops") if ops else list(DEFAULT_OPS)
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

def make_labels(op, shape, seed=0):
    """Labels suited to ``op`` for logits of ``shape`` (class ids or 0/1 targets)."""
    rng = np.random.default_rng(seed)
    if OPS[op][1] == "ids":
        return rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int64)
    return (rng.random(shape) < 0.5).astype(np.float32)


def bytes_moved(op, logits, labels):
    """Bytes ``op`` must move at least: logits and labels read, loss and gradient written.

    The unreduced loss is one value per row (softmax family, float32 for
    16-bit scores) or per element (sigmoid); the gradient has the logits'
    size. This is the numerator of every GB/s figure, the same for fastxent
    and its peers.
    """
    loss_itemsize = _dtypes.loss_dtype(logits.dtype).itemsize
    rows = logits.size // logits.shape[-1] if logits.ndim else 1
    total = logits.nbytes + labels.nbytes
    if op.endswith("_fwd_bwd"):
        total += logits.nbytes
    elif op.startswith("sigmoid"):
        total += logits.size * loss_itemsize
    elif op == "score":
        total += rows * (4 * loss_itemsize + 8 + 1)
    else:
        total += rows * loss_itemsize
    return int(total)


def synthetic_logits(shape, dtype, seed=0):
    """Spiky random scores of ``shape``, fast to make at any size.

    A block of :data:`SYNTHETIC_BLOCK` (4 M) normal variates (x3, and 2% of
    them x8 so that the softmax is not flat: llm.c's advice) is tiled over the
    array, each copy rotated by a random offset, so no two rows repeat;
    ``standard_normal`` over all of 4096x32000 would take 2.6 s here, this
    takes 0.3 s.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    block = max(1, min(size, SYNTHETIC_BLOCK))
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


def as_float32(x):
    """16-bit scores as float32, exactly; other arrays unchanged.

    bfloat16 is widened through its bits (``uint16 << 16``), 10x faster than
    ml_dtypes' ``astype`` (0.2 s against 2.2 s for 4096x32000 here).
    """
    if x.dtype.name == "bfloat16":
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if x.dtype.itemsize == 2:
        return x.astype(np.float32)
    return x


def as_float64(x):
    """An exact float64 copy of ``x`` (bfloat16 through :func:`as_float32`)."""
    return np.asarray(as_float32(np.asarray(x)), dtype=np.float64)
