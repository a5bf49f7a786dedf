"""fastxent: fused, numerically stable cross-entropy kernels.

The loss, its gradient and the log-sum-exp in one pass over the scores, on the
CPU (Numba) and on NVIDIA GPUs (CuPy), behind one dispatcher that picks the
backend from where the data lives. ``backend="numpy"`` is the float64
reference every backend is tested against.

Importing fastxent compiles nothing and imports neither Numba nor CuPy: the
kernels are compiled (and cached on disk) on first use.

>>> import numpy as np, fastxent as fx
>>> logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
>>> loss, grad = fx.sparse_softmax_cross_entropy(logits, np.array([0, 2]),
...                                              reduction="mean", return_grad=True)
"""

from ._dispatch import available_backends, use_backend
from ._score import LinearGrad, Score
from .linear import linear_cross_entropy, linear_score
from .losses import (
    binary_cross_entropy,
    categorical_cross_entropy,
    log_softmax,
    logsumexp,
    score,
    sigmoid_cross_entropy,
    sigmoid_cross_entropy_hessian_diag,
    softmax,
    softmax_cross_entropy,
    softmax_cross_entropy_hvp,
    sparse_categorical_cross_entropy,
    sparse_softmax_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "LinearGrad",
    "Score",
    "available_backends",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "linear_cross_entropy",
    "linear_score",
    "log_softmax",
    "logsumexp",
    "score",
    "sigmoid_cross_entropy",
    "sigmoid_cross_entropy_hessian_diag",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_hvp",
    "sparse_categorical_cross_entropy",
    "sparse_softmax_cross_entropy",
    "use_backend",
]
