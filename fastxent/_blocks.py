"""One block of classes of a split row, run on its backend: the public layer of a vocabulary split.

``fastxent.dask`` splits a row along the class axis when the logits' class axis is
in several chunks. For each block ``[offset, offset + Cb)`` this module brings the
block into rows (class axis last, C-contiguous, native byte order), runs the
backend's ``softmax_partials`` or ``softmax_block_grad`` (``fastxent/backends/__init__.py``;
``backend="numpy"`` runs ``fastxent.reference``) and packs or unpacks the records
of ``fastxent/_partials.py``. Options arrive validated (``fastxent/_validate.py``,
called once for the whole array); class ids are range-checked once per block of
rows (:func:`check_labels`) before any gradient or loss is formed from them.
"""

import numpy as np

from . import _dispatch, _dtypes, _partials
from . import _validate as check


def _backend(name):
    if name == "numpy":
        from . import reference

        return reference
    return _dispatch.backend_module(name)


def _as_rows(block):
    """A block with the class axis last as C-contiguous ``(N, Cb)`` rows in native byte order."""
    xp = _partials.array_module(block)
    if xp is np:
        block = check.native_byte_order(np.asarray(block))
    return xp.ascontiguousarray(block).reshape(-1, block.shape[-1])


def check_labels(labels, num_classes, ignore_index, origin):
    """Raise the public layer's ``ValueError`` for a class id outside ``[0, C)`` that is not
    ``ignore_index``, naming its position in the whole array (``origin``: the block's first
    index there). Returns ``labels``."""
    xp = _partials.array_module(labels)
    host = labels if xp is np else labels.get()
    message = check.bad_label_message(host, num_classes, ignore_index, origin=origin)
    if message is not None:
        raise ValueError(message)
    return labels


def partials(block, labels, offset, *, ignore_index=None, class_weight=None, label_smoothing=0.0, softcap=None,
             kind="sparse", backend="numba"):
    """Packed records ``(..., F)`` of a block ``(..., Cb)`` (class axis last) of classes from ``offset``.

    ``kind``: ``"lse"`` (no labels; the NaN flags ``logsumexp`` needs), ``"sparse"``
    (the target, and the smoothing sum when ``label_smoothing`` > 0) or ``"score"``
    (the entropy term and the argmax).
    """
    lead = block.shape[:-1]
    rows = _as_rows(block)
    count = rows.shape[1]
    ids = None if labels is None else labels.reshape(-1)
    weights = None
    weight_sum = 0.0
    if kind == "sparse" and label_smoothing != 0:
        weights = np.ones(offset + count) if class_weight is None else class_weight
        weight_sum = float(np.sum(weights[offset:offset + count]))
    fields = _backend(backend).softmax_partials(rows, ids, offset, ignore_index, weights, softcap, kind == "score")
    nan = None
    if kind == "lse":
        # Rare rows whose sum is NaN hold NaN or +inf; logsumexp tells them apart.
        xp = _partials.array_module(rows)
        unsure = xp.isnan(fields.total)
        nan = xp.zeros(rows.shape[0], dtype=np.float64)
        if bool(unsure.any()):
            nan[unsure] = _holds_nan(rows[unsure])
    records = _partials.pack(fields, weight_sum, nan)
    return records.reshape(lead + (1, len(_partials.RECORD)))


def _holds_nan(rows):
    """Rows holding a NaN, read from the bits for 16-bit scores (no 16-bit arithmetic:
    CuPy's own float16/bfloat16 kernels need CUDA headers at run time)."""
    xp = _partials.array_module(rows)
    if rows.dtype.itemsize == 2:
        exponent_ones = 0x7F80 if _dtypes.is_bfloat16(rows.dtype) else 0x7C00
        return ((rows.view(np.uint16) & 0x7FFF) > exponent_ones).any(axis=-1)
    return xp.isnan(rows).any(axis=-1)


def sparse_grad(block, labels, merged, scale, offset, *, ignore_index=None, class_weight=None, label_smoothing=0.0,
                z_loss=0.0, softcap=None, num_classes, backend="numba"):
    """The sparse softmax cross-entropy gradient of a block ``(..., Cb)`` of classes from
    ``offset``, from the rows' merged records ``(..., F)``; ``scale`` is the gradient
    multiplier (a float, or one per row). In the block's dtype and shape."""
    rows = _as_rows(block)
    ids = labels.reshape(-1)
    records = merged.reshape(-1, merged.shape[-1])
    if not isinstance(scale, float):
        scale = scale.reshape(-1)
    p_coef, target_coef, weight_coef = _partials.sparse_grad_coefficients(
        records, ids, ignore_index, class_weight, label_smoothing, z_loss, num_classes, scale)
    shift, log_sum = _partials.normaliser(records)
    weights = None
    if label_smoothing != 0:
        weights = np.ones(num_classes) if class_weight is None else class_weight
    grad = _backend(backend).softmax_block_grad(rows, ids, offset, ignore_index, weights, softcap, shift, log_sum,
                                                p_coef, target_coef, weight_coef)
    return grad.reshape(block.shape)
