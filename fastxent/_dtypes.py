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


def clip_bounds(epsilon, dtype):
    """Keras's probability clip ``(epsilon, 1 - epsilon)``, each rounded to ``dtype``."""
    return round_to(epsilon, dtype), round_to(1.0 - epsilon, dtype)
