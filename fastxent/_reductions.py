"""Reductions and the gradient multiplier: the rules of ``reduction=`` and ``grad_output=``, once.

* ``"none"`` keeps the per-row (or per-element) loss; ``"sum"`` adds it up;
  ``"mean"`` divides the sum by a denominator: the number of rows or elements,
  or for class ids ``sum_i w[y_i]`` over the rows that are not ignored
  (PyTorch's rule, :func:`mean_denominator`).
* A mean whose denominator is zero is ``0.0`` with a zero gradient, never NaN
  (fastxent's contract; ``fastxent.torch`` applies torch's own rule on top).
* A fused kernel multiplies the gradient of row ``i`` (or element) by
  ``grad_output_i * factor``, ``factor = 1 / denominator`` for a mean, else 1.

Used by the public functions (``losses.py``), the adapters and the command line;
the float64 reference states the same rules on its own, on purpose.
"""

import numpy as np


def mean_denominator(labels, ignore_index, class_weight, xp=np):
    """``sum_i w[y_i]`` over the rows whose class id is not ``ignore_index`` (the count
    of those rows when ``class_weight`` is None): the denominator of a sparse mean.

    ``labels`` is a flat array of class ids already checked to lie in ``[0, C)`` or
    equal ``ignore_index``; ``class_weight`` a host array of length C or None. Returns
    a 0-d array of ``xp`` (no host synchronisation for a device array).
    """
    counted = None if ignore_index is None else labels != ignore_index
    if class_weight is None:
        return xp.asarray(labels.size) if counted is None else counted.sum()
    weights = xp.asarray(class_weight)
    picked = weights[xp.clip(labels, 0, weights.shape[0] - 1)]
    return picked.sum() if counted is None else (picked * counted).sum()


def reduce(loss, reduction, denominator, xp=np):
    """The unreduced ``loss`` reduced; a reduced loss is a 0-d array of the loss dtype
    (a mean over a zero denominator is 0.0)."""
    if reduction == "none":
        return loss
    with np.errstate(over="ignore"):   # a sum beyond the loss dtype is inf, as the kernels' losses are
        total = loss.sum(dtype=np.float64)
    return from_total(total, reduction, denominator, loss.dtype, xp)


def from_total(total, reduction, denominator, dtype, xp=np):
    """The reduced loss from the sum of the unreduced one (a backend asked for the sum
    computes it without the unreduced buffer): ``total`` for ``"sum"``,
    ``total / denominator`` for ``"mean"`` (0.0 over a zero denominator), as a 0-d
    array of the loss ``dtype``."""
    if reduction == "mean":
        denominator = float(denominator)
        if denominator == 0.0:
            # not total * 0.0: rows that count for nothing may still hold inf (a smoothed
            # row of class weight 0 with a masked class), and inf * 0.0 is NaN
            return xp.zeros((), dtype=dtype)
        total = total / denominator
    with np.errstate(over="ignore"):   # a float64 total beyond the float32 maximum is inf
        return xp.asarray(total, dtype=dtype)


def empty_mean(reduction, denominator):
    """True for a mean over a zero denominator (its gradient is all zeros)."""
    return reduction == "mean" and float(denominator) == 0.0


def grad_scale(grad_output, loss_shape, reduction, denominator, xp=np):
    """The per-row (or per-element) gradient multiplier of a fused kernel.

    ``grad_output`` (already validated to broadcast to ``loss_shape``) times the
    reduction factor. A Python float when uniform, else a C-contiguous float64
    array of ``loss_shape``.
    """
    factor = 1.0 / float(denominator) if reduction == "mean" else 1.0
    if grad_output is None:
        return factor
    if grad_output.ndim == 0 or reduction != "none":
        return float(grad_output) * factor
    scale = xp.broadcast_to(grad_output.astype(np.float64) * factor, tuple(loss_shape))
    return xp.ascontiguousarray(scale)
