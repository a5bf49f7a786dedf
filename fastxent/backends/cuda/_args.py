"""Argument plumbing of the CUDA backend: CuPy arrays and scalars as the kernels take them.

The kernels index their operands unchecked, so every array handed over here is
checked for the size the kernel will index (a wrongly sized operand is a
``ValueError``, never an out-of-bounds read), and optional pointers become an
explicit NULL.
"""

import numpy as np

from ... import _config, _dtypes
from .. import BadLabels
from . import _build
from ._build import CAST_SOURCE_TYPES, LABEL_TYPES, acc_dtype_name, dense_choices, dtype_name
from ._plans import elementwise_grid

#: A NULL pointer argument: 8 bytes of zero (CuPy turns None into 0xffffffff, cupy#9046).
NULL = np.uint64(0)

# Values of the elementwise kernels' pw_mode (PosWeightMode in elementwise.cu).
_PW_NONE, _PW_SCALAR, _PW_PER_COLUMN, _PW_FULL = 0, 1, 2, 3


def i64(value):
    return np.int64(value)


def f64(value):
    return np.float64(value)


def i32(value):
    return np.int32(value)


def pointer(array):
    """A device array, or NULL for None."""
    return NULL if array is None else array


def device(array):
    """The CuPy device context of ``array``."""
    import cupy

    return cupy.cuda.Device(array.device.id)


def empty(shape, dtype):
    import cupy

    return cupy.empty(shape, dtype=dtype)


def launch(kernel, grid, threads, args, smem=0):
    """One launch on CuPy's current stream; ``smem`` bytes of dynamic shared memory."""
    if smem:
        kernel.max_dynamic_shared_size_bytes = smem
    kernel((int(grid),), (int(threads),), args, shared_mem=int(smem))


def _expect_size(name, array, count):
    """Guards the kernels' unchecked indexing against an operand of the wrong size."""
    if array.size != count:
        raise ValueError(f"{name} has {array.size} elements where the CUDA kernels index {count}")


def _expect_shape(name, array, shape):
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, the CUDA kernels expect {tuple(shape)}")


def scale_args(grad_scale, count):
    """(array or NULL, value) for the kernels' ``scale``/``scale_value`` pair; an array
    must hold ``count`` values (one per loss element)."""
    import cupy

    if grad_scale is None:
        return NULL, f64(0.0)
    if isinstance(grad_scale, (int, float, np.floating, np.integer)):
        return NULL, f64(float(grad_scale))
    scale = cupy.ascontiguousarray(grad_scale, dtype=np.float64).reshape(-1)
    _expect_size("grad_scale", scale, count)
    return scale, f64(0.0)


def class_weight_args(class_weight, count):
    """(device weights or NULL, their sum); the sum of ones when unweighted."""
    import cupy

    if class_weight is None:
        return NULL, f64(count)
    weights = np.ascontiguousarray(class_weight, dtype=np.float64)
    _expect_shape("class_weight", weights, (count,))
    return cupy.asarray(weights), f64(weights.sum())


def block_weights(class_weight, offset, count):
    """The whole row's class weights on the device (the block kernels read ``offset + c``
    for ``c < count``), or NULL."""
    import cupy

    if class_weight is None:
        return NULL
    weights = np.ascontiguousarray(class_weight, dtype=np.float64)
    if weights.ndim != 1 or weights.size < offset + count:
        raise ValueError(f"class_weight has shape {weights.shape}; the block of classes [{offset}, "
                         f"{offset + count}) needs at least {offset + count}")
    return cupy.asarray(weights)


def row_values(name, values, count):
    """A per-row float64 operand (``count`` values, C-contiguous on the device)."""
    import cupy

    array = cupy.ascontiguousarray(cupy.asarray(values), dtype=np.float64).reshape(-1)
    _expect_size(name, array, count)
    return array


def ignore_args(ignore_index):
    """(ignore_index, has_ignore); an ignore_index outside int64 matches no label."""
    if ignore_index is None or not -(2**63) <= int(ignore_index) < 2**63:
        return i64(0), i32(0)
    return i64(int(ignore_index)), i32(1)


def clip_args(epsilon, dtype):
    """Keras's [epsilon, 1 - epsilon] as the kernels' ``lo``/``hi`` (``fastxent._dtypes.clip_bounds``)."""
    lo, hi = _dtypes.clip_bounds(epsilon, dtype)
    return f64(lo), f64(hi)


def pos_weight_args(pos_weight, shape):
    """(mode, array or NULL, value) for the elementwise kernels' pos_weight over (R, K) ``shape``."""
    import cupy

    if pos_weight is None:
        return i32(_PW_NONE), NULL, f64(1.0)
    if isinstance(pos_weight, (int, float, np.floating, np.integer)):
        return i32(_PW_SCALAR), NULL, f64(float(pos_weight))
    weights = cupy.ascontiguousarray(cupy.asarray(pos_weight), dtype=np.float64)
    mode = _PW_PER_COLUMN if weights.ndim == 1 else _PW_FULL
    _expect_size("pos_weight", weights, shape[-1] if mode == _PW_PER_COLUMN else int(np.prod(shape)))
    return i32(mode), weights.reshape(-1), f64(1.0)


def _contiguous(array):
    """``array`` C-contiguous; a 16-bit float array is copied as raw uint16 words, so
    CuPy's copy kernel does not need cuda_fp16.h / cuda_bf16.h at run time."""
    import cupy

    if array.flags.c_contiguous:
        return array
    if array.dtype.itemsize == 2 and array.dtype.kind not in "iub":
        return cupy.ascontiguousarray(array.view(np.uint16)).view(array.dtype)
    return cupy.ascontiguousarray(array)


def class_ids(labels, n_rows):
    """Class ids as int32/int64 (the kernels' label types), C-contiguous, one per row."""
    import cupy

    _expect_shape("labels", labels, (n_rows,))
    if dtype_name(labels.dtype) in LABEL_TYPES:
        return cupy.ascontiguousarray(labels)
    return cupy.ascontiguousarray(labels).astype(np.int64)


def dense_operand(array, score_dtype, info, shape, what="labels"):
    """A dense second operand in the scores' dtype or the accumulation dtype, as is
    when it already is one (no copy), else cast by ``cast_elems`` (not CuPy's astype,
    which for 16-bit types needs CUDA headers at run time). It must have the scores'
    ``shape``: the kernels read it at the scores' indices."""
    _expect_shape(what, array, shape)
    name = dtype_name(array.dtype)
    array = _contiguous(array)
    if name in dense_choices(score_dtype):
        return array
    if name not in CAST_SOURCE_TYPES:
        raise TypeError(f"the CUDA kernels cannot read an operand of dtype {array.dtype}")
    acc = acc_dtype_name(score_dtype)
    out = empty(array.shape, acc)
    if array.size:
        launch(_build.get_kernel("cast_elems", name, acc), elementwise_grid(array.size, 1, info),
               _config.CUDA_ELEMENTWISE_BLOCK_THREADS, (array, out, i64(array.size)))
    return out


def label_flag():
    """A zeroed device flag the sparse kernels raise on a class id outside [0, C)."""
    import cupy

    return cupy.zeros(1, dtype=np.int32)


def check_label_flag(flag):
    """Read the flag (a synchronisation) and raise :class:`fastxent.backends.BadLabels`
    when it is set; skipped when label checks are off (``fastxent/_config.py``)."""
    if _config.cuda_label_check_enabled() and int(flag.get()[0]) != 0:
        raise BadLabels("a sparse kernel met a class id outside [0, C) that is not ignore_index")
