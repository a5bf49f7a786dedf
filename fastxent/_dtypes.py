"""The dtype rules of the contract (docs/design.md, "dtypes"), written once.

* Scores: float16, bfloat16, float32, float64.
* Loss (and logsumexp, score's float fields): float32 for 16-bit scores, else
  the scores' dtype.
* Gradients, log_softmax, softmax, hvp: the first argument's dtype.
* Accumulation: float32, float64 for float64 scores. The loss dtype and the
  accumulation dtype coincide for every score dtype.
* Probability inputs are clipped to ``[epsilon, 1 - epsilon]``, each bound
  rounded to the probabilities' dtype (as Keras computes them).

Every backend takes these from here; the float64 reference is independent on
purpose and states them again.
"""

import numpy as np

SCORE_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def is_bfloat16(dtype):
    """True for ``ml_dtypes.bfloat16`` (checked by name: importing ml_dtypes is not needed)."""
    return np.dtype(dtype).name == "bfloat16"


def is_score_dtype(dtype):
    """True for the floating dtypes fastxent computes on."""
    return np.dtype(dtype).name in SCORE_DTYPE_NAMES


def is_real_float(dtype):
    """Floating point, bfloat16 included; not complex, not integer, not bool."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or is_bfloat16(dtype)


def accumulation_dtype(dtype):
    """Accumulation dtype: float64 for float64 scores, float32 otherwise (``dtype`` may be a name)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return np.dtype(np.float64) if name == "float64" else np.dtype(np.float32)


def loss_dtype(dtype):
    """Loss dtype for scores of ``dtype``: the accumulation dtype (float32 for 16-bit, else the same)."""
    return accumulation_dtype(dtype)


def round_to(value, dtype):
    """``value`` rounded to ``dtype`` and back to a Python float (Keras's clip bounds)."""
    return float(np.asarray(value, dtype=np.float64).astype(dtype))


def kernel_smoothing(smoothing, count, dtype):
    """The label smoothing a kernel accumulating in ``dtype``'s accumulation type is given
    for rows of ``count`` classes: ``smoothing`` itself, unless ``smoothing / count`` is
    positive but below that type's smallest positive number, where it would round to 0
    and drop the smoothing: then ``count`` times that smallest number, so every class
    keeps a positive share. A positive share on a ``-inf`` score is an infinite loss, as
    in the float64 reference (4.4e-72 on float32 scores [0, -inf] gave 0, not inf).

    >>> kernel_smoothing(1e-72, 2, np.float32) == 2 * float(np.finfo(np.float32).smallest_subnormal)
    True
    """
    tiny = float(np.finfo(accumulation_dtype(dtype)).smallest_subnormal)
    if 0.0 < smoothing and smoothing / count < tiny:
        return count * tiny
    return smoothing


def clip_bounds(epsilon, dtype):
    """Keras's probability clip ``(epsilon, 1 - epsilon)``, each rounded to ``dtype``."""
    return round_to(epsilon, dtype), round_to(1.0 - epsilon, dtype)
