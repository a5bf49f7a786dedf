"""Argument checks of the public layer: every error names the argument and the value.

Kernels never re-check: whatever passes here is safe to launch (a label out
of range would be an out-of-bounds read in a Numba kernel, so the range is
checked here, on the host, before any kernel runs).
"""

import contextlib
import math
import numbers

import numpy as np

from . import _dispatch, _dtypes
from .backends import BadLabels

REDUCTIONS = ("none", "sum", "mean")


# ----------------------------------------------------------------------------
# Arrays and where they live
# ----------------------------------------------------------------------------

def _describe_location(obj):
    return "a CUDA array" if _dispatch.is_cuda_array(obj) else f"a host {type(obj).__name__}"


def arrays(**named):
    """Bring the main array arguments to one array type.

    Returns ``(on_device, {name: array})``: host inputs become numpy arrays
    (lists, numpy scalars and CPU tensors through ``np.asarray``, zero-copy
    where possible), CUDA inputs CuPy arrays on their own device. Mixing the
    two is a ``TypeError`` naming both arguments. Byte-swapped host arrays are
    brought to the native byte order (:func:`native_byte_order`).
    """
    on_device = {name: _dispatch.is_cuda_array(obj) for name, obj in named.items()}
    device_names = [name for name, flag in on_device.items() if flag]
    host_names = [name for name, flag in on_device.items() if not flag]
    if device_names and host_names:
        raise TypeError(
            f"{device_names[0]} is a CUDA array but {host_names[0]} is "
            f"{_describe_location(named[host_names[0]])}; pass both on the same device"
        )
    if device_names:
        converted = {name: _dispatch.as_device_array(obj) for name, obj in named.items()}
        devices = {name: arr.device.id for name, arr in converted.items()}
        first = next(iter(devices))
        for name, dev in devices.items():
            if dev != devices[first]:
                raise TypeError(
                    f"{first} is on cuda:{devices[first]} but {name} is on cuda:{dev}; "
                    "pass both on the same device"
                )
        return True, converted
    converted = {}
    for name, obj in named.items():
        try:
            converted[name] = native_byte_order(np.asarray(obj))
        except Exception as exc:  # noqa: BLE001 -- report what could not be converted
            raise TypeError(f"{name} must be an array, got {type(obj).__name__}: {exc}") from None
    return False, converted


def native_byte_order(array):
    """``array`` itself, or a copy in the machine's byte order when it is byte-swapped
    (``>f4`` on a little-endian machine, as ``np.load`` returns for a file written on a
    big-endian one): the one copy fastxent makes of its own accord, as the kernels read
    native numbers only."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def parameter_array(name, value, on_device):
    """A small parameter array (class_weight, pos_weight, grad_output) on the host.

    Host values are accepted with data on any device; a CUDA array with host
    data is a ``TypeError``.
    """
    if _dispatch.is_cuda_array(value):
        if not on_device:
            raise TypeError(
                f"{name} is a CUDA array but the scores are host arrays; pass {name} on the host"
            )
        return _dispatch.as_device_array(value).get()
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name} must be an array or a number, got {type(value).__name__}: {exc}") from None


# ----------------------------------------------------------------------------
# Scores, axis, classes
# ----------------------------------------------------------------------------

def scores(name, array, min_ndim=1):
    """Floating scores or probabilities: float16, bfloat16, float32 or float64."""
    dtype = array.dtype
    if not _dtypes.is_score_dtype(dtype):
        kind = {"i": "integer", "u": "integer", "b": "boolean", "c": "complex"}.get(dtype.kind, "non-float")
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64 scores, got {kind} dtype {dtype}"
            + ("; cast with .astype(np.float32) if these really are scores" if kind == "integer" else "")
        )
    if array.ndim < min_ndim:
        raise ValueError(f"{name} must have a class axis, got a {array.ndim}-d array of shape {array.shape}")
    return array


def axis(value, ndim):
    """A valid axis index in ``[0, ndim)`` from ``value`` in ``[-ndim, ndim)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"axis must be an int, got {value!r}")
    value = int(value)
    if not -ndim <= value < ndim:
        raise ValueError(f"axis={value} is out of range for logits with {ndim} dimension(s)")
    return value % ndim


def num_classes(function, name, count, single_class_hint=None):
    """C >= 1 always; C >= 2 where ``single_class_hint`` names the binary alternative."""
    if count == 0:
        raise ValueError(f"{name} has 0 classes along the class axis; there is nothing to normalise over")
    if count == 1 and single_class_hint is not None:
        raise ValueError(
            f"{function} over a single class (C == 1) is always 0; for a binary problem with one "
            f"score per example use {single_class_hint}"
        )


# ----------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------

def _without_axis(shape, ax):
    return tuple(shape[:ax]) + tuple(shape[ax + 1:])


def class_ids(function, labels, logits_shape, ax, soft_alternative):
    """Sparse labels: integer class ids with exactly the logits' shape minus the class axis."""
    expected = _without_axis(logits_shape, ax)
    if labels.dtype.kind not in "iu":
        hint = (
            f"; for a distribution over classes use {soft_alternative}"
            if labels.shape == tuple(logits_shape) else ""
        )
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}{hint}")
    if labels.shape != expected:
        hint = ""
        if labels.shape == tuple(logits_shape):
            hint = f"; labels with the logits' shape are one-hot or soft labels: use {soft_alternative}"
        elif labels.shape == expected + (1,):
            hint = "; squeeze the trailing 1 (fastxent does not broadcast labels)"
        raise ValueError(
            f"labels has shape {labels.shape}, expected {expected} (the logits' shape "
            f"{tuple(logits_shape)} without class axis {ax}){hint}"
        )
    return labels


def bad_label_message(labels, num_classes, ignore_index, origin=None):
    """The message for the first label outside ``[0, C)`` that is not ``ignore_index``, or None.

    ``origin``: where ``labels`` starts in a larger array (a block of a Dask array),
    so the message names the position in the whole array.
    """
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if not bad.any():
        return None
    flat = int(np.flatnonzero(bad.reshape(-1))[0])
    position = np.unravel_index(flat, labels.shape) if labels.ndim else ()
    if origin is not None:
        position = tuple(int(start) + int(i) for start, i in zip(origin, position))
    where = ", ".join(str(int(i)) for i in position)
    ignore = f" and is not ignore_index={ignore_index}" if ignore_index is not None else ""
    return f"labels[{where}] = {labels.reshape(-1)[flat]} is outside [0, {num_classes}){ignore}"


@contextlib.contextmanager
def device_labels(labels, num_classes, ignore_index):
    """Turn a device backend's :class:`~fastxent.backends.BadLabels` into the host path's
    ``ValueError`` (the device kernels flag a bad label; it is found here on the host)."""
    try:
        yield
    except BadLabels:
        message = bad_label_message(labels.get(), num_classes, ignore_index)
        raise ValueError(message or f"labels hold a class id outside [0, {num_classes})") from None


def label_range(labels, num_classes, ignore_index):
    """Raise ``ValueError`` for a class id outside ``[0, C)`` that is not ``ignore_index``.

    Labels whose minimum and maximum lie in range are accepted after two
    reductions (0.6 ms for 10^6 int64 labels here, against 2.6 ms for the
    mask of bad positions: 15% of a 1,000,000 x 10 forward).
    """
    if labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes):
        return
    message = bad_label_message(labels, num_classes, ignore_index)
    if message is not None:
        raise ValueError(message)


def dense_labels(function, name, labels, shape, sparse_alternative=None):
    """Soft/elementwise labels: float or bool with exactly ``shape``."""
    if labels.dtype.kind not in "fb" and not _dtypes.is_bfloat16(labels.dtype):
        hint = ""
        if labels.dtype.kind in "iu" and sparse_alternative:
            hint = (
                f"; for class ids use {sparse_alternative}, for one-hot integers pass "
                f"{name}.astype(np.float32)"
            )
        elif labels.dtype.kind in "iu":
            hint = f"; cast 0/1 integers with {name}.astype(np.float32)"
        raise TypeError(f"{name} must be float or bool, got dtype {labels.dtype}{hint}")
    if labels.shape != tuple(shape):
        hint = ""
        if sparse_alternative and labels.ndim == len(shape) - 1:
            hint = f"; class ids (one per row) go to {sparse_alternative}"
        raise ValueError(f"{name} has shape {labels.shape}, expected the logits' shape {tuple(shape)}{hint}")
    return labels


# ----------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------

def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def label_smoothing(value):
    value = _real("label_smoothing", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing={value} must lie in [0, 1]")
    return value


def z_loss(value):
    value = _real("z_loss", value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"z_loss={value} must be finite and >= 0")
    return value


def softcap(value):
    if value is None:
        return None
    value = _real("softcap", value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"softcap={value} must be None or finite and > 0")
    return value


def epsilon(value):
    value = _real("epsilon", value)
    if not 0.0 < value < 0.5:
        raise ValueError(f"epsilon={value} must lie in (0, 0.5)")
    return value


def reduction(value):
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"reduction={value!r} must be one of {list(REDUCTIONS)}")
    return value


def ignore_index(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be None or an int, got {value!r}")
    return int(value)


#: Binary size suffixes of ``memory=`` (case-insensitive; an optional "B" or "iB" follows).
_SIZE_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def memory(value):
    """``memory=``: None, a positive number of bytes, or a size such as ``"256M"``, ``"1.5G"``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in "kmgt" else ""
        try:
            size = int(float(text[:len(text) - len(unit)]) * 2 ** _SIZE_UNITS[unit])
        except (ValueError, OverflowError):
            raise ValueError(f"memory={value!r} is not a size such as '256M', '1G' or a number of bytes") from None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"memory={value!r} must be a positive size")
        size = int(value)
    else:
        raise TypeError(f"memory must be a number of bytes or a size such as '256M', got {value!r}")
    if not 0 < size < 2**63:
        raise ValueError(f"memory={value!r} must be a positive size")
    return size


def flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def inplace(value, return_grad, name, original, array, ax, labels, xp):
    """``inplace=True`` writes the gradient over ``array``, the first argument as the
    kernels read it (``original`` as the caller passed it); every way that could not
    reach the caller's buffer, or would overwrite what the kernel still has to read,
    is a ``ValueError``. ``ax`` is the class axis, None for elementwise functions."""
    if not flag("inplace", value):
        return False
    if not return_grad:
        raise ValueError(f"inplace=True writes the gradient over {name}, so it needs return_grad=True")
    if xp is np:
        if array.size and not np.may_share_memory(array, np.asarray(original)):
            what = (f"byte-swapped (dtype {np.asarray(original).dtype.str}), so fastxent reads a native copy"
                    if isinstance(original, np.ndarray) else f"a {type(original).__name__}, not an array")
            raise ValueError(f"inplace=True needs {name} to be an array the gradient can be written into; "
                             f"got {what}")
        if not array.flags.writeable:
            raise ValueError(f"inplace=True needs {name} to be writable; got a read-only array")
    rows = array if ax is None else xp.moveaxis(array, ax, -1)
    if not rows.flags.c_contiguous:
        where = "C-contiguous" if ax is None else f"C-contiguous along its class axis (axis={ax})"
        raise ValueError(f"inplace=True needs {name} {where}; got shape {array.shape} with strides "
                         f"{array.strides}: pass a contiguous copy (np.ascontiguousarray) or inplace=False")
    if labels is not None and xp.may_share_memory(array, labels):
        raise ValueError(f"inplace=True would overwrite labels: {name} and labels share memory")
    return True


def class_weight(value, count, on_device):
    """``None`` or a finite 1-D float64 host array of length C.

    Any sign, as in PyTorch (whose own module tests draw weights from [-9, 9]):
    the losses are linear in the weights, so the kernels need no sign rule. A
    mean whose denominator ``sum_i w[y_i]`` is zero is still 0.0 (see
    ``losses._reduce``).
    """
    if value is None:
        return None
    weights = parameter_array("class_weight", value, on_device)
    if weights.dtype.kind not in "iuf" and not _dtypes.is_bfloat16(weights.dtype):
        raise TypeError(f"class_weight must be real numbers, got dtype {weights.dtype}")
    if weights.shape != (count,):
        raise ValueError(f"class_weight has shape {weights.shape}, expected ({count},): one weight per class")
    weights = weights.astype(np.float64)
    bad = ~np.isfinite(weights)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"class_weight[{index}] = {weights[index]} must be finite")
    return weights


def pos_weight(value, shape, on_device):
    """``None``, a float, or a float64 host array broadcastable to ``shape`` without enlarging it."""
    if value is None:
        return None
    weights = parameter_array("pos_weight", value, on_device)
    if weights.dtype.kind not in "iuf" and not _dtypes.is_bfloat16(weights.dtype):
        raise TypeError(f"pos_weight must be real numbers, got dtype {weights.dtype}")
    try:
        broadcast = np.broadcast_shapes(weights.shape, tuple(shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"pos_weight has shape {weights.shape}, which does not broadcast to the logits' shape {tuple(shape)}"
        )
    weights = weights.astype(np.float64)
    if np.isnan(weights).any():
        raise ValueError("pos_weight must not contain NaN")
    if weights.ndim == 0:
        return float(weights)
    return weights


def grad_output(value, loss_shape, on_device, xp):
    """``None`` or an array broadcastable to the loss's shape without enlarging it."""
    if value is None:
        return None
    if _dispatch.is_cuda_array(value):
        if not on_device:
            raise TypeError("grad_output is a CUDA array but the scores are host arrays")
        array = _dispatch.as_device_array(value)
    else:
        array = np.asarray(value)
        if on_device:
            array = xp.asarray(array)
    if array.dtype.kind not in "iuf" and not _dtypes.is_bfloat16(array.dtype):
        raise TypeError(f"grad_output must be real numbers, got dtype {array.dtype}")
    try:
        broadcast = np.broadcast_shapes(array.shape, tuple(loss_shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(loss_shape):
        raise ValueError(
            f"grad_output has shape {array.shape}, which does not broadcast to the loss's shape "
            f"{tuple(loss_shape)} without enlarging it"
        )
    return array
