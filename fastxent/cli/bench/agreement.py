"""Agreement with the float64 reference: is a timed result right?

Each result is compared with the reference (``backend="numpy"``,
:class:`Reference`) within :data:`TOLERANCE`: per-row losses (and lse) on
every row, the reduced loss against the mean of the reference's per-row
losses, gradients and the other fields on a sample of rows spread over the
array (the reference needs ~40 bytes per element, too much for 131 M elements
in a benchmark of a minute or two).
"""

import numpy as np

from ... import Score
from .cases import as_float64
from .peers import to_host

#: Elements of the row sample checked against the reference for the fields
#: that are not checked on every row (gradients, entropy, argmax, sigmoid rows).
SAMPLE_ELEMENTS = 1_000_000
#: Elements per chunk when the reference runs over a whole array.
REFERENCE_CHUNK_ELEMENTS = 1_000_000

#: Agreement with the float64 reference, ``(rtol, atol)`` keyed by the dtype of
#: the result compared: "value" for losses and anything accumulated, "stored"
#: for arrays stored in the scores' dtype (gradients, compared after scaling
#: back to one row's gradient so that atol means something for any N). A peer
#: returning a bfloat16 loss (torch on bfloat16 scores) is held to bfloat16's
#: precision; fastxent's loss is float32 for 16-bit scores and held to float32's.
#: 16-bit "stored" allows four units in the last place: torch's bfloat16
#: gradient is computed with bfloat16 intermediates and lands up to 1.8% off
#: the exact value at 256x1000 here. This is a sanity check beside a timing;
#: fastxent's own tests (tests/support.py) hold its kernels to two units.
TOLERANCE = {
    "float64": {"value": (1e-9, 1e-9), "stored": (1e-9, 1e-12)},
    "float32": {"value": (5e-5, 5e-5), "stored": (1e-4, 2e-6)},
    "float16": {"value": (2e-3, 2e-3), "stored": (4e-3, 2e-6)},
    "bfloat16": {"value": (1.6e-2, 1.6e-2), "stored": (3.2e-2, 2e-6)},
}


def tolerance(dtype, kind="value"):
    """``(rtol, atol)`` for a result of ``dtype`` (anything else: float32's)."""
    name = np.dtype(dtype).name
    return TOLERANCE.get(name, TOLERANCE["float32"])[kind]


class Reference:
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
                self.fx.logsumexp(as_float64(self.logits[a:b]), backend="numpy") for a, b in self._chunks()])
        return self._cache["lse"]

    def loss(self):
        if "loss" not in self._cache:
            rows = np.arange(self.logits.shape[0])
            self._cache["loss"] = self.lse() - as_float64(self.logits[rows, self.labels])
        return self._cache["loss"]

    def sigmoid_mean(self):
        if "sigmoid_mean" not in self._cache:
            total = sum(float(self.fx.sigmoid_cross_entropy(as_float64(self.logits[a:b]), self.labels[a:b],
                                                            reduction="sum", backend="numpy"))
                        for a, b in self._chunks())
            self._cache["sigmoid_mean"] = total / self.logits.size
        return self._cache["sigmoid_mean"]

    def rows(self, op):
        """The reference on the sampled rows: per-row results, gradients unscaled."""
        if op not in self._cache:
            # float64 copies of the sampled rows: the reference's results are then float64
            # too, not rounded to the scores' dtype before the comparison.
            x, y = as_float64(self.logits[self.sample]), self.labels[self.sample]
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
    a = as_float64(actual)
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
    result = to_host(result)
    sample = ref.sample
    rows, count = ref.logits.shape
    problems = []

    def compare(what, actual, expected, kind="value", exact=False, dtype=None):
        actual = np.asarray(actual)
        tol = tolerance(dtype or actual.dtype, kind)
        problems.append(_mismatch(what, actual, expected, tol, exact))

    if op == "sparse_fwd":
        compare("loss", result, ref.loss())
    elif op == "sparse_fwd_bwd":
        loss, grad = result
        compare("mean loss", loss, ref.loss().mean())
        grad = np.asarray(grad)
        # Scaled back to one row's gradient (x N): atol then means the same at any N.
        compare(f"grad (x{rows}) rows", as_float64(grad[sample]) * rows, ref.rows(op)[1], kind="stored",
                dtype=grad.dtype)
    elif op == "score":
        fields = dict(zip(Score._fields, result))
        expected = dict(zip(Score._fields, ref.rows(op)))
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
        compare(f"grad (x{rows * count}) rows", as_float64(grad[sample]) * (rows * count),
                ref.rows(op)[1], kind="stored", dtype=grad.dtype)
    else:
        raise KeyError(op)
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else None
