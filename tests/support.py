"""Shared test support: the tolerance table, the verbose comparison, input makers.

One tolerance table keyed by dtype (CuPy's ``numpy_cupy_allclose`` habit): the
backends are compared with ``fastxent.reference`` (float64, cast to the output
dtype) through ``assert_close``, which prints the mismatch count, the first
indices and the NaN/inf disagreements (Liger-Kernel's ``assert_verbose_allclose``).
"""

import pathlib
import re
import shutil
import subprocess
import types

import ml_dtypes
import numpy as np
import pytest

from fastxent import _dtypes
from fastxent import reference as ref
from fastxent._score import Score

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
CUDA_HOST_DIR = ROOT / "tests" / "cuda_host"

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64))
DTYPE_IDS = [d.name for d in FLOAT_DTYPES]

#: (rtol, atol) per score dtype, for float32/float64 accumulators ("value": losses,
#: lse, anything accumulated) and for outputs stored in the score dtype ("stored":
#: gradients, softmax, log_softmax, hvp). 16-bit outputs are rounded twice (ours,
#: the reference's cast): one or two units in their last place.
TOLERANCE = {
    "float64": {"value": (1e-9, 1e-9), "stored": (1e-9, 1e-12)},
    "float32": {"value": (2e-5, 2e-5), "stored": (1e-4, 2e-6)},
    "float16": {"value": (2e-5, 2e-5), "stored": (2e-3, 2e-6)},
    "bfloat16": {"value": (2e-5, 2e-5), "stored": (1.6e-2, 2e-6)},
}


def tolerance(dtype, kind="value"):
    return TOLERANCE[np.dtype(dtype).name][kind]


def assert_close(actual, expected, dtype=np.float64, kind="value", what="", tol=None):
    """allclose in float64 with NaN == NaN and equal infinities; verbose on failure."""
    rtol, atol = tol if tol is not None else tolerance(dtype, kind)
    actual_host = np.asarray(actual)
    expected_host = np.asarray(expected)
    assert actual_host.shape == expected_host.shape, (
        f"{what}: shape {actual_host.shape} != expected {expected_host.shape}")
    a = actual_host.astype(np.float64)
    e = expected_host.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) | (a == e)
    if not ok.all():
        bad = np.argwhere(~ok)
        lines = [
            f"{what}: {len(bad)} of {ok.size} elements differ (rtol={rtol}, atol={atol}); "
            f"NaN disagreements: {np.count_nonzero(np.isnan(a) != np.isnan(e))}, "
            f"inf disagreements: {np.count_nonzero(np.isinf(a) != np.isinf(e))}"
        ]
        for index in bad[:8]:
            index = tuple(int(k) for k in index)
            lines.append(f"  at {index}: got {a[index]!r}, expected {e[index]!r}")
        pytest.fail("\n".join(lines))


def assert_same_dtype(actual, expected, what=""):
    assert np.asarray(actual).dtype == np.asarray(expected).dtype, (
        f"{what}: dtype {np.asarray(actual).dtype} != expected {np.asarray(expected).dtype}")


def make_logits(shape, dtype, seed=0, scale=3.0, spiky=True):
    """Random scores; ``spiky`` adds a few large values per row so softmax is not flat
    (llm.c: "otherwise all probabilities will be basically zero")."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    if spiky and x.size:
        mask = rng.random(shape) < 0.02
        x = np.where(mask, x * 8, x)
    return x.astype(dtype)


def make_class_ids(shape, num_classes, seed=1, ignore_index=None, ignore_fraction=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=shape).astype(np.int64)
    if ignore_index is not None and ignore_fraction and labels.size:
        labels = np.where(rng.random(shape) < ignore_fraction, ignore_index, labels)
    return labels


def make_distribution(shape, axis=-1, seed=2, dtype=np.float32, sparsity=0.3):
    """Soft labels: non-negative, some exact zeros, rows summing to 1."""
    rng = np.random.default_rng(seed)
    y = rng.random(shape)
    y = np.where(rng.random(shape) < sparsity, 0.0, y)
    total = y.sum(axis=axis, keepdims=True)
    y = np.divide(y, total, out=np.zeros_like(y), where=total > 0)
    return y.astype(dtype)


#: The sparse softmax options every backend's equivalence suite runs (one table).
SPARSE_OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": -100},
    "weights": {"class_weight": "random"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "all": {"ignore_index": -100, "class_weight": "random", "label_smoothing": 0.2,
            "z_loss": 1e-4, "softcap": 6.0},
}


def sparse_options(name, num_classes):
    """The keyword arguments of option set ``name`` (random class weights made concrete)."""
    options = dict(SPARSE_OPTIONS[name])
    if options.get("class_weight") == "random":
        options["class_weight"] = np.random.default_rng(5).uniform(0.2, 2.0, num_classes)
    return options


def compare(got, expected, dtype, what, scale=1.0, grad_scale=None):
    """A backend's ``(loss, grad)`` (or loss alone) against the reference's: the loss with
    the "value" tolerance, the gradient with the "stored" one, dtypes equal. ``scale``
    multiplies the absolute tolerances (an lse of 1e4 carries an absolute error of ~1e-3
    in float32); ``grad_scale``, when given, those of the gradient."""
    pairs = [("loss", got[0], expected[0], "value", scale),
             ("grad", got[1], expected[1], "stored", scale if grad_scale is None else grad_scale)] if isinstance(
        expected, tuple) else [("", got, expected, "value", scale)]
    for name, actual, wanted, kind, factor in pairs:
        assert_same_dtype(actual, wanted, f"{what} {name}")
        rtol, atol = tolerance(dtype, kind)
        assert_close(actual, wanted, dtype, kind, f"{what} {name}", tol=(rtol, atol * np.asarray(factor)))


def compare_score(got, expected, dtype, what, scale=1.0):
    """A backend's :class:`fastxent.Score` against the reference's, field by field."""
    assert type(got) is type(expected), f"{what}: {type(got).__name__} is not {type(expected).__name__}"
    for field in ("loss", "lse", "target_logprob", "entropy"):
        actual, wanted = np.asarray(getattr(got, field)), np.asarray(getattr(expected, field))
        assert_same_dtype(actual, wanted, f"{what} {field}")
        rtol, atol = tolerance(dtype, "value")
        assert_close(actual, wanted, dtype, "value", f"{what} {field}", tol=(rtol, atol * np.asarray(scale)))
    for field in ("argmax", "correct"):
        actual, wanted = np.asarray(getattr(got, field)), np.asarray(getattr(expected, field))
        assert_same_dtype(actual, wanted, f"{what} {field}")
        np.testing.assert_array_equal(actual, wanted, err_msg=f"{what} {field}")


# ----------------------------------------------------------------------------
# CUDA sources on a machine without a GPU
# ----------------------------------------------------------------------------

_KERNEL_DEF = re.compile(
    r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(([^)]*)\)",
    re.S)


def kernel_signatures():
    """kernel -> (file, template parameter names, [(C++ type, name), ...]) parsed from kernels/*.cu."""
    signatures = {}
    for path in sorted(KERNEL_DIR.glob("*.cu")):
        for template, name, params in _KERNEL_DEF.findall(path.read_text()):
            names = [t.split()[-1] for t in template.split(",")]
            parsed = []
            for param in params.split(","):
                param = " ".join(param.split())
                ctype, pname = param.rsplit(" ", 1)
                while pname.startswith("*"):
                    ctype, pname = ctype + "*", pname[1:]
                parsed.append((ctype.replace(" *", "*"), pname))
            signatures[name] = (path.name, names, parsed)
    return signatures


class FakeDeviceArray(np.ndarray):
    """numpy memory that looks like a CuPy array to fastxent (device 0)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "version": 3}

    def get(self):
        return np.array(self)


def build_host_library(tmp_path_factory, source):
    """Compile ``tests/cuda_host/<source>`` (which includes kernels/ headers) as a shared
    library with the kernels' -D options, loaded with ctypes; skips without a C++ compiler."""
    import ctypes

    from fastxent.backends.cuda import _build

    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip(f"no C++ compiler: the host build of {source} needs g++ or clang++")
    work = tmp_path_factory.mktemp(pathlib.Path(source).stem)
    library = work / f"lib{pathlib.Path(source).stem}.so"
    defines = [option for option in _build.compile_options() if option.startswith("-D")]
    command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(CUDA_HOST_DIR), "-I", str(KERNEL_DIR),
               *defines, "-o", str(library), str(CUDA_HOST_DIR / source)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(library))


# ----------------------------------------------------------------------------
# Scores near the float range: the reference of the row shifted by its maximum
# ----------------------------------------------------------------------------

#: The softmax-family functions whose value is the same for ``x`` and ``x - max(x)`` per row
#: (``logsumexp`` and ``score.lse`` move by the shift, added back by ``expected``).
SHIFTED_FUNCTIONS = ("sparse_softmax_cross_entropy", "softmax_cross_entropy", "log_softmax", "softmax",
                     "logsumexp", "softmax_cross_entropy_hvp", "score")


def _row_shift(rows):
    """Per row (class axis last, float64): the largest finite score, 0 for a row with none."""
    finite = np.where(np.isfinite(rows), rows, -np.inf)
    peak = finite.max(axis=-1, keepdims=True) if rows.shape[-1] else np.zeros(rows.shape[:-1] + (1,))
    return np.where(np.isfinite(peak), peak, 0.0)


#: The losses: their ``reduction=`` adds the unreduced losses as fastxent stores them.
LOSSES = ("sparse_softmax_cross_entropy", "softmax_cross_entropy", "sigmoid_cross_entropy", "binary_cross_entropy",
          "categorical_cross_entropy", "sparse_categorical_cross_entropy")


def expected(fn, first, second=None, **options):
    """The expected result of ``fastxent.<fn>``: :func:`expected_unreduced`'s, except that a
    reduction adds the per-row (per-element) losses of the loss dtype, as fastxent does
    (``_reductions.reduce``): where one of them is inf (a float32 loss beyond 3.4e38), the
    sum and the mean are, even where the reference's float64 mean of the exact values is
    finite (the losses' docstrings say so)."""
    answer = expected_unreduced(fn, first, second, **options)
    reduction = options.get("reduction", "none")
    if fn not in LOSSES or reduction == "none":
        return answer
    rows = expected_unreduced(fn, first, second, **{**options, "reduction": "none", "return_grad": False,
                                                    "grad_output": None})
    if np.isfinite(rows).all():
        return answer
    with np.errstate(invalid="ignore"):
        total = rows.astype(np.float64).sum()
    if reduction == "mean":
        denominator = _mean_denominator(fn, rows, second, options)
        total = total / denominator if denominator else 0.0
    loss = np.asarray(total, dtype=rows.dtype)
    return (loss, answer[1]) if options.get("return_grad") else loss


def _mean_denominator(fn, rows, labels, options):
    """The denominator of a mean (docs/design.md, "reduction")."""
    if fn not in ("sparse_softmax_cross_entropy", "sparse_categorical_cross_entropy"):
        return rows.size
    ids = np.asarray(labels).astype(np.int64)
    kept = np.ones(ids.shape, bool) if options.get("ignore_index") is None else ids != options["ignore_index"]
    weights = options.get("class_weight")
    if fn == "sparse_categorical_cross_entropy" or weights is None:
        return np.count_nonzero(kept)
    return np.asarray(weights, np.float64)[np.where(kept, ids, 0)][kept].sum()


def expected_unreduced(fn, first, second=None, **options):
    """``fastxent.reference.<fn>``'s answer, reductions included, with the softmax family
    computed on each row shifted by its largest finite score (docs/design.md, "Scores near
    the float range").

    The reference forms ``sum(y) * lse - sum(y x)`` and ``exp(x - lse)``, which lose every
    digit once |x| passes ~1e15 (float64's spacing at 3e19 is 4096); the softmax losses,
    log_softmax, softmax, the hvp and score's loss, entropy and target_logprob do not change
    when a row moves by a constant, and ``logsumexp`` (score's ``lse``) moves by it, so they
    are computed on ``x - max(x)`` (in float64) and cast by the dtype rules. A softcapped row
    is not shifted (the cap is not shift-invariant; the capped scores are bounded by it).
    PaLM's z-loss depends on ``lse`` itself: the shifted loss gets ``z_loss * lse**2`` and its
    gradient ``2 z_loss lse p`` back before the reduction. The categorical losses: the reference,
    but what fastxent's docstring states on rows whose sum overflows the accumulation dtype
    (``_expected_probabilities``). Other functions: the reference as is.
    """
    if fn in ("categorical_cross_entropy", "sparse_categorical_cross_entropy"):
        return _expected_probabilities(fn, first, second, **options)
    if fn not in SHIFTED_FUNCTIONS or options.get("softcap") is not None:
        return getattr(ref, fn)(first, *(() if second is None else (second,)), **options)
    dtype = np.asarray(first).dtype
    axis = options.get("axis", -1)
    rows = np.moveaxis(np.asarray(first).astype(np.float64), axis, -1)
    shift = _row_shift(rows)
    shifted = np.moveaxis(rows - shift, -1, axis)
    peak = np.moveaxis(shift, -1, axis).squeeze(axis)
    loss_dtype = _dtypes.loss_dtype(dtype)
    if fn in ("log_softmax", "softmax"):
        return getattr(ref, fn)(shifted, **options).astype(dtype)
    if fn == "logsumexp":
        return np.asarray(ref.logsumexp(shifted, **options) + peak, dtype=loss_dtype)
    if fn == "softmax_cross_entropy_hvp":
        return ref.softmax_cross_entropy_hvp(shifted, second, **options).astype(dtype)
    if fn == "score":
        got = ref.score(shifted, second, **options)
        plain = ref.score(first, second, **options)
        return Score(got.loss.astype(loss_dtype), np.asarray(got.lse + peak, dtype=loss_dtype),
                     got.target_logprob.astype(loss_dtype), got.entropy.astype(loss_dtype), plain.argmax,
                     plain.correct)
    if fn == "softmax_cross_entropy":
        answer = ref.softmax_cross_entropy(shifted, second, **options)
        if options.get("return_grad"):
            return answer[0].astype(loss_dtype), answer[1].astype(dtype)
        return answer.astype(loss_dtype)
    return _expected_sparse(shifted, second, peak, dtype, **options)


def _expected_sparse(shifted, labels, peak, dtype, *, axis=-1, ignore_index=None, class_weight=None,
                     label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none", return_grad=False,
                     grad_output=None):
    """``expected`` for ``sparse_softmax_cross_entropy``: the shifted reference without the
    z-loss, unreduced; the z-loss term of the true ``lse``; then the reduction rules."""
    loss, grad = ref.sparse_softmax_cross_entropy(shifted, labels, axis=axis, ignore_index=ignore_index,
                                                  class_weight=class_weight, label_smoothing=label_smoothing,
                                                  return_grad=True)
    labels = np.asarray(labels).astype(np.int64)
    kept = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    with np.errstate(all="ignore"):
        if z_loss:
            lse = peak + ref.logsumexp(shifted, axis=axis)
            probs = np.moveaxis(ref.softmax(shifted, axis=axis), axis, -1)
            loss = loss + np.where(kept, z_loss * lse * lse, 0.0)
            extra = np.where(kept[..., None], 2.0 * z_loss * lse[..., None] * probs, 0.0)
            grad = grad + np.moveaxis(extra, -1, axis)
        count = shifted.shape[axis]
        weights = np.ones(count) if class_weight is None else np.asarray(class_weight, np.float64)
        denominator = weights[np.where(kept, labels, 0)][kept].sum()
    return _finish(loss, grad, dtype, denominator=denominator, reduction=reduction, return_grad=return_grad,
                   grad_output=grad_output, axis=axis)


def _finish(loss, grad, dtype, *, denominator, reduction, return_grad, grad_output, axis=None):
    """The reduction and ``grad_output`` rules (docs/design.md) on an unreduced float64 loss and
    its per-element gradient (class axis ``axis``, None for elementwise), cast by the dtype rules."""
    with np.errstate(all="ignore"):
        total = loss if reduction == "none" else loss.sum()
        scale = np.ones(()) if grad_output is None else np.asarray(grad_output, np.float64)
        if reduction == "mean":
            total, scale = (total / denominator, scale / denominator) if denominator != 0 else (0.0, None)
        if scale is None:   # a mean over nothing: 0.0 with a zero gradient
            grad = np.zeros_like(grad)
        else:
            scale = np.broadcast_to(scale, loss.shape)
            grad = grad * (scale if axis is None else np.expand_dims(scale, axis))
        # a float64 loss beyond the float32 maximum is inf
        out = np.asarray(total, dtype=_dtypes.loss_dtype(dtype))
        grad = grad.astype(dtype)
    return (out, grad) if return_grad else out


def _expected_probabilities(fn, probs, labels, *, axis=-1, epsilon=1e-7, label_smoothing=0.0,
                            ignore_index=None, reduction="none", return_grad=False, grad_output=None):
    """``expected`` for the categorical losses: the reference, except on rows whose sum
    overflows the accumulation dtype, where fastxent's docstring says what it returns
    (as Keras, which sums in the input dtype: every ``q`` is 0, clipped to ``epsilon``:
    loss ``-sum_c y'_c log(epsilon)``, gradient 0). The float64 reference sums a float32
    row in float64, where it does not overflow."""
    sparse = fn == "sparse_categorical_cross_entropy"
    options = {"axis": axis, "epsilon": epsilon,
               **({"ignore_index": ignore_index} if sparse else {"label_smoothing": label_smoothing})}
    dtype = np.asarray(probs).dtype
    rows = np.moveaxis(np.asarray(probs).astype(np.float64), axis, -1)
    limit = float(np.finfo(_dtypes.accumulation_dtype(dtype)).max)
    with np.errstate(all="ignore"):
        overflow = np.isfinite(rows).all(axis=-1) & ((rows * 2.0**-16).sum(axis=-1) > limit * 2.0**-16)
    if not overflow.any():
        return getattr(ref, fn)(probs, labels, **options, reduction=reduction, return_grad=return_grad,
                                grad_output=grad_output)
    # the probabilities in their own dtype: the clip bounds are rounded to it
    loss, grad = getattr(ref, fn)(np.moveaxis(np.asarray(probs), axis, -1), labels if sparse else np.moveaxis(
        np.asarray(labels), axis, -1), **{**options, "axis": -1}, return_grad=True)
    loss, grad = loss.astype(np.float64), grad.astype(np.float64)
    count = rows.shape[-1]
    if sparse:
        ids = np.asarray(labels).astype(np.int64)
        kept = np.ones(ids.shape, bool) if ignore_index is None else ids != ignore_index
        targets = (ids[..., None] == np.arange(count)) & kept[..., None]
        denominator = np.count_nonzero(kept)
    else:
        targets = (1.0 - label_smoothing) * np.moveaxis(np.asarray(labels), axis, -1).astype(np.float64)
        targets = targets + label_smoothing / count
        denominator = loss.size
    lo, _ = _dtypes.clip_bounds(epsilon, dtype)
    loss = np.where(overflow, -np.where(targets != 0, targets * np.log(lo), 0.0).sum(axis=-1), loss)
    grad = np.where(overflow[..., None], 0.0, grad)
    out = _finish(loss, grad, dtype, denominator=denominator, reduction=reduction, return_grad=return_grad,
                  grad_output=grad_output, axis=-1)
    return (out[0], np.moveaxis(out[1], -1, axis)) if return_grad else out
