"""CuPy CUDA backend: loads ``kernels/``, compiles per configuration, picks launches.

Implements every function of the backend contract (``fastxent/backends/__init__.py``)
with the same argument order and return conventions as ``numba_cpu``, on CuPy arrays,
on the arrays' own device and on CuPy's current stream. No host copy of the data is
made, except in the error path of a bad label (below).

Kernels
-------
The CUDA C++ in ``kernels/`` (shipped in the wheel as ``fastxent.kernels``) is the one
source of the GPU kernels: templates over the score type, the label type and the
threads per row, instantiated through ``cupy.RawModule(name_expressions=...)`` from the
dtype table below (:data:`SCORE_TYPES`, :data:`LABEL_TYPES`, :data:`KERNELS`). Each
instantiation is compiled by NVRTC on first use, once per process (and cached on disk
by CuPy); :func:`get_kernel` is the one lookup. The 16-bit score types are raw 16-bit
words in the kernels, so no CUDA header is needed at run time.

bfloat16 on the device is a CuPy array of dtype ``ml_dtypes.bfloat16`` (CuPy >= 14
with ml_dtypes installed); the kernels read its storage as raw bits.

Label checks, and skipping them
-------------------------------
Sparse labels (``sparse_softmax_cross_entropy``, ``sparse_categorical_cross_entropy``,
``score``) are range-checked by the kernels themselves: a label outside ``[0, C)`` that
is not ``ignore_index`` sets a device flag instead of being read out of bounds. Reading
that flag back is a **synchronisation** of the current stream; on a bad label the labels
are copied to the host and the CPU path's ``ValueError`` is raised. A caller who vouches
for its labels can skip the read (and the sync) with ``CHECK_LABELS = False`` on this
module or ``FASTXENT_CUDA_SKIP_LABEL_CHECK=1`` in the environment (read at each call); a
bad label then gives NaN in its row's loss and a zero gradient row, never an
out-of-bounds read.

Inplace gradients
-----------------
``sparse_softmax_cross_entropy`` and ``softmax_cross_entropy`` take ``inplace=True``
(keyword only, beyond the contract): the fused kernel writes the gradient into the
logits buffer and returns it as the gradient, saving an (N, C) allocation and its
memory traffic budget. The logits are destroyed: a framework must not reuse them (for
instance, autograd must not have saved them for another backward).
"""

import functools
import importlib.resources
import os
import pathlib
import re
from typing import NamedTuple

import numpy as np

from .. import _dtypes
from .._score import Score
from .._validate import bad_label_message

# ----------------------------------------------------------------------------
# Tunables (tests may patch them)
# ----------------------------------------------------------------------------

#: Threads per block of the group kernels (several rows per block). Must not exceed
#: ``fx::GROUP_BLOCK_THREADS`` in kernels/fx_common.cuh, their launch bound.
GROUP_BLOCK_THREADS = 256

#: C up to this: 8 threads per row (1,000,000 x 10 runs 32 rows per 256-thread block
#: instead of a million blocks whose threads are mostly idle).
GROUP8_MAX_CLASSES = 64

#: C up to this: a warp per row (32 lanes x 4 floats read 512 contiguous bytes per
#: step); above it a block per row.
WARP_MAX_CLASSES = 1024

#: Block-per-row sizing: about this many classes per thread, the block rounded up to a
#: power of two within [ROW_BLOCK_MIN_THREADS, ROW_BLOCK_MAX_THREADS].
ROW_ELEMENTS_PER_THREAD = 16
ROW_BLOCK_MIN_THREADS = 128
ROW_BLOCK_MAX_THREADS = 1024

#: Fused forward+backward: the rows in flight (resident blocks x row bytes) should fit
#: this fraction of the L2, so the gradient pass re-reads the row from L2, not DRAM.
#: When more blocks would be resident, dynamic shared memory is requested to cap the
#: blocks per SM (H200: 2 x 132 blocks x 256.5 KB bfloat16 rows of 128256 classes =
#: 67.7 MB > 50 MB of L2; 1 x 132 = 33.9 MB fits).
FUSED_L2_FRACTION = 0.75

#: Split-row path of the sparse softmax cross-entropy: used when there are fewer rows
#: than SMs and C is at least SPLIT_MIN_CLASSES; aims at SPLIT_BLOCKS_PER_SM blocks per
#: SM, with chunks of at least SPLIT_MIN_CHUNK classes rounded up to SPLIT_CHUNK_ALIGN
#: (4 x 262144 on 132 SMs: 64 chunks of 4096 classes, 256 blocks).
SPLIT_MIN_CLASSES = 16384
SPLIT_BLOCKS_PER_SM = 2
SPLIT_MIN_CHUNK = 4096
SPLIT_CHUNK_ALIGN = 256
SPLIT_BLOCK_THREADS = 256

#: Elementwise kernels: 256-thread blocks, at most this many blocks per SM (grid-stride).
ELEMENTWISE_BLOCK_THREADS = 256
ELEMENTWISE_BLOCKS_PER_SM = 8

#: Largest grid.x (CUDA's limit); rows beyond it are covered by the grid-stride loops.
MAX_GRID = 2**31 - 1

#: Read the device's bad-label flag after each sparse kernel (a synchronisation).
CHECK_LABELS = True

#: Environment variable that skips that read when set to 1/true/yes (read at each call).
SKIP_LABEL_CHECK_ENV = "FASTXENT_CUDA_SKIP_LABEL_CHECK"

#: NVRTC options of every kernel module.
COMPILE_OPTIONS = ("-std=c++17",)

# ----------------------------------------------------------------------------
# The dtype table: the one place that says which instantiations exist
# ----------------------------------------------------------------------------

#: numpy dtype name of the scores -> (C++ storage type, accumulation = loss dtype name).
SCORE_TYPES = {
    "float16": ("fx::f16", "float32"),
    "bfloat16": ("fx::bf16", "float32"),
    "float32": ("float", "float32"),
    "float64": ("double", "float64"),
}

#: Sparse label dtypes the kernels read; other integer dtypes are cast to int64 first.
LABEL_TYPES = {"int32": "int", "int64": "long long"}

#: Dense second operands (soft labels, v, elementwise labels) the kernels read: the
#: scores' own dtype or their accumulation dtype; any other (bool, another width) is
#: first cast to the accumulation dtype by ``cast_elems``.
DENSE_TYPES = {"float16": "fx::f16", "bfloat16": "fx::bf16", "float32": "float", "float64": "double"}

#: Source dtypes of ``cast_elems``.
CAST_SOURCE_TYPES = {"bool": "bool", **DENSE_TYPES}

#: Threads per row of the row kernels: 8, 32 (a warp), 0 (the whole block).
GROUPS = (8, 32, 0)

#: kernel -> (file in kernels/, template parameters). Parameter kinds: "score" (a key of
#: SCORE_TYPES), "label" (LABEL_TYPES), "dense" (the score dtype or its accumulation
#: dtype), "group" (GROUPS), "source" (CAST_SOURCE_TYPES), "acc" (float32, float64).
KERNELS = {
    "sparse_xent_rows": ("softmax_rows.cu", ("score", "label", "group")),
    "sparse_xent_partial": ("softmax_rows.cu", ("score", "label")),
    "sparse_xent_merge": ("softmax_rows.cu", ("score", "label")),
    "sparse_xent_split_grad": ("softmax_rows.cu", ("score", "label")),
    "soft_xent_rows": ("softmax_rows.cu", ("score", "dense", "group")),
    "softmax_rows": ("softmax_rows.cu", ("score", "group")),
    "hvp_rows": ("softmax_rows.cu", ("score", "dense", "group")),
    "score_rows": ("softmax_rows.cu", ("score", "label", "group")),
    "categorical_rows": ("probs_rows.cu", ("score", "dense", "group")),
    "sparse_categorical_rows": ("probs_rows.cu", ("score", "label", "group")),
    "sigmoid_xent_elems": ("elementwise.cu", ("score", "dense")),
    "sigmoid_hess_elems": ("elementwise.cu", ("score", "dense")),
    "binary_xent_elems": ("elementwise.cu", ("score", "dense")),
    "cast_elems": ("elementwise.cu", ("source", "acc")),
}

# Values of softmax_rows' mode argument (SoftmaxMode in softmax_rows.cu).
_MODE_LOGSUMEXP, _MODE_LOG_SOFTMAX, _MODE_SOFTMAX = 0, 1, 2

# Values of the elementwise kernels' pw_mode (PosWeightMode in elementwise.cu).
_PW_NONE, _PW_SCALAR, _PW_PER_COLUMN, _PW_FULL = 0, 1, 2, 3

# A NULL pointer argument: 8 bytes of zero (CuPy turns None into 0xffffffff, cupy#9046).
_NULL = np.uint64(0)


def _dtype_name(dtype):
    """A dtype's numpy name ("bfloat16" for ml_dtypes.bfloat16); names pass through."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def acc_dtype_name(score_dtype):
    """Accumulation (= loss) dtype name of a score dtype in :data:`SCORE_TYPES`."""
    return SCORE_TYPES[_dtype_name(score_dtype)][1]


def _choices(kind, score):
    """The values a template parameter of ``kind`` takes (given the score dtype name)."""
    if kind == "score":
        return tuple(SCORE_TYPES)
    if kind == "label":
        return tuple(LABEL_TYPES)
    if kind == "dense":
        return tuple(dict.fromkeys((score, SCORE_TYPES[score][1])))
    if kind == "group":
        return GROUPS
    if kind == "source":
        return tuple(CAST_SOURCE_TYPES)
    if kind == "acc":
        return ("float32", "float64")
    raise KeyError(kind)


def _cpp(kind, value):
    if kind == "score":
        return SCORE_TYPES[value][0]
    if kind == "label":
        return LABEL_TYPES[value]
    if kind in ("dense", "acc"):
        return DENSE_TYPES[value]
    if kind == "source":
        return CAST_SOURCE_TYPES[value]
    return str(int(value))  # group


def name_expression(kernel, *params):
    """The C++ name of one instantiation, e.g. ``fx::sparse_xent_rows<fx::bf16, long long, 0>``.

    ``params`` follow ``KERNELS[kernel][1]``: dtype names (or dtypes) and group sizes.
    """
    kinds = KERNELS[kernel][1]
    if len(params) != len(kinds):
        raise TypeError(f"{kernel} takes template parameters {kinds}, got {params}")
    values = [p if isinstance(p, int) and not isinstance(p, bool) else _dtype_name(p) for p in params]
    score = values[kinds.index("score")] if "score" in kinds else None
    for kind, value in zip(kinds, values):
        if value not in _choices(kind, score):
            raise ValueError(f"{kernel}: no {kind} instantiation for {value!r}")
    return f"fx::{kernel}<{', '.join(_cpp(k, v) for k, v in zip(kinds, values))}>"


def instantiations():
    """Every (file, name expression) the table allows: what CI compiles."""
    out = []
    for kernel, (filename, kinds) in KERNELS.items():
        combos = [()]
        for kind in kinds:
            combos = [c + (v,) for c in combos
                      for v in _choices(kind, c[kinds.index("score")] if "score" in kinds and c else None)]
        out.extend((filename, name_expression(kernel, *combo)) for combo in combos)
    return out


# ----------------------------------------------------------------------------
# Sources and the compiled-kernel cache
# ----------------------------------------------------------------------------

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def kernel_dir():
    """Where the ``.cu``/``.cuh`` files live: the installed ``fastxent.kernels`` package
    (a wheel), else ``kernels/`` beside the ``fastxent/`` source directory."""
    try:
        return importlib.resources.files("fastxent.kernels")
    except ModuleNotFoundError:
        return pathlib.Path(__file__).resolve().parents[2] / "kernels"


@functools.lru_cache(maxsize=None)
def kernel_source(filename):
    """The text of ``kernels/<filename>`` with its local ``#include "..."`` inlined once each.

    NVRTC gets one self-contained string (no include path), which also works when the
    package is a zip; ``nvcc`` in CI compiles the same files with real includes.
    """
    root = kernel_dir()
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        text = _PRAGMA_ONCE.sub("", (root / name).read_text(encoding="utf-8"))
        return _LOCAL_INCLUDE.sub(lambda match: expand(match.group(1)), text)

    return expand(filename)


@functools.lru_cache(maxsize=None)
def _module(expression, options):
    import cupy

    filename = KERNELS[expression[len("fx::"):expression.index("<")]][0]
    return cupy.RawModule(code=kernel_source(filename), options=options, name_expressions=(expression,))


def get_kernel(kernel, *params):
    """The compiled ``cupy.RawKernel`` of one instantiation (compiled once, then cached).

    ``get_kernel("sparse_xent_rows", logits.dtype, labels.dtype, 0)``; the parameters
    follow :data:`KERNELS`. CuPy loads the module on each device it is launched on.
    """
    expression = name_expression(kernel, *params)
    return _module(expression, tuple(COMPILE_OPTIONS)).get_function(expression)


def precompile(expressions=None, workers=None):
    """Compile and load instantiations on the current device ahead of use.

    ``expressions``: name expressions (default: every instantiation of the table, see
    :func:`instantiations`). NVRTC releases the GIL, so ``workers`` threads (default:
    the CPU count) compile in parallel: 190 instantiations take ~2-4 s each alone.
    Returns the number compiled. Test and benchmark runs call this once up front.
    """
    import concurrent.futures

    import cupy

    names = [e for _, e in instantiations()] if expressions is None else list(expressions)
    device_id = cupy.cuda.Device().id

    def build(expression):
        with cupy.cuda.Device(device_id):
            _module(expression, tuple(COMPILE_OPTIONS)).get_function(expression)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for future in [pool.submit(build, name) for name in names]:
            future.result()
    return len(names)


# ----------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------

class DeviceInfo(NamedTuple):
    sms: int
    l2_bytes: int
    max_threads_per_sm: int
    smem_per_sm: int
    smem_per_block_optin: int
    smem_reserved_per_block: int


@functools.lru_cache(maxsize=None)
def device_info(device_id):
    """The attributes the launch plans use, read once per device."""
    from cupy.cuda import runtime

    def get(attr):
        return int(runtime.deviceGetAttribute(attr, device_id))

    return DeviceInfo(
        sms=get(runtime.cudaDevAttrMultiProcessorCount),
        l2_bytes=get(runtime.cudaDevAttrL2CacheSize),
        max_threads_per_sm=get(runtime.cudaDevAttrMaxThreadsPerMultiProcessor),
        smem_per_sm=get(runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor),
        smem_per_block_optin=get(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin),
        smem_reserved_per_block=get(runtime.cudaDevAttrReservedSharedMemoryPerBlock),
    )


class RowPlan(NamedTuple):
    group: int      # threads per row: 8, 32, or 0 for a block per row
    grid: int
    threads: int
    smem: int       # dynamic shared memory requested only to cap residency (fused kernels)


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def row_plan(n_rows, n_classes, row_bytes, info, fused):
    """Threads per row, block and grid for a row kernel.

    ``row_bytes``: bytes of one row re-read by the gradient pass (scores, plus soft
    labels); used only when ``fused``, to cap the blocks per SM so the rows in flight
    fit ``FUSED_L2_FRACTION`` of the L2.
    """
    if n_classes <= WARP_MAX_CLASSES:
        group = 8 if n_classes <= GROUP8_MAX_CLASSES else 32
        rows_per_block = GROUP_BLOCK_THREADS // group
        grid = min(-(-n_rows // rows_per_block), MAX_GRID)
        return RowPlan(group, max(grid, 1), GROUP_BLOCK_THREADS, 0)
    threads = _pow2_at_least(-(-n_classes // ROW_ELEMENTS_PER_THREAD))
    threads = min(max(threads, ROW_BLOCK_MIN_THREADS), ROW_BLOCK_MAX_THREADS)
    smem = _residency_smem(threads, row_bytes, info) if fused else 0
    return RowPlan(0, max(min(n_rows, MAX_GRID), 1), threads, smem)


def _residency_smem(threads, row_bytes, info):
    """Dynamic shared memory per block that allows k blocks per SM but not k + 1, with k
    the most blocks whose rows fit the L2 budget; 0 when no cap is needed or none helps."""
    budget = FUSED_L2_FRACTION * info.l2_bytes
    by_threads = info.max_threads_per_sm // threads
    k = int(budget // (info.sms * max(row_bytes, 1)))
    if k < 1 or k >= by_threads:
        return 0
    smem = info.smem_per_sm // (k + 1) - info.smem_reserved_per_block + 1
    if k * (smem + info.smem_reserved_per_block) > info.smem_per_sm:
        return 0
    return min(smem, info.smem_per_block_optin)


class SplitPlan(NamedTuple):
    splits: int
    chunk: int


def split_plan(n_rows, n_classes, info):
    """Chunks per row for the split-row path, or None when one block per row fills the GPU."""
    if n_classes < SPLIT_MIN_CLASSES or n_rows >= info.sms or n_rows > 65535:
        return None
    splits = min(-(-SPLIT_BLOCKS_PER_SM * info.sms // n_rows), -(-n_classes // SPLIT_MIN_CHUNK))
    if splits < 2:
        return None
    chunk = -(-n_classes // splits)
    chunk = -(-chunk // SPLIT_CHUNK_ALIGN) * SPLIT_CHUNK_ALIGN
    return SplitPlan(-(-n_classes // chunk), chunk)


def _elementwise_grid(n, vec, info):
    blocks = -(-n // (ELEMENTWISE_BLOCK_THREADS * vec))
    return max(1, min(blocks, info.sms * ELEMENTWISE_BLOCKS_PER_SM))


def _vector_width(dtype):
    return 16 // np.dtype(dtype).itemsize


def vec_ok(vec, *arrays):
    """1 when the arrays' first elements share their element offset modulo ``vec``.

    The kernels align their 128-bit packs on the scores' address; the other streams
    (labels, outputs) of the same row then line up too. Fresh CuPy allocations are
    256-byte aligned; an odd view of the input may not be, and gets scalar loads.
    """
    offsets = set()
    for array in arrays:
        if array is None:
            continue
        ptr, size = array.data.ptr, array.dtype.itemsize
        if ptr % size:
            return 0
        offsets.add((ptr // size) % vec)
    return int(len(offsets) <= 1)


def _launch(kernel, grid, threads, args, smem=0):
    if smem:
        kernel.max_dynamic_shared_size_bytes = smem
    kernel((int(grid),), (int(threads),), args, shared_mem=int(smem))


# ----------------------------------------------------------------------------
# Argument plumbing
# ----------------------------------------------------------------------------

def _device(array):
    import cupy

    return cupy.cuda.Device(array.device.id)


def _empty(shape, dtype):
    import cupy

    return cupy.empty(shape, dtype=dtype)


def _i64(value):
    return np.int64(value)


def _f64(value):
    return np.float64(value)


def _i32(value):
    return np.int32(value)


def _scale_args(grad_scale, count):
    """(array or NULL, value) for the kernels' ``scale``/``scale_value`` pair; an array
    must hold ``count`` values (one per loss element: the kernels index it unchecked)."""
    import cupy

    if grad_scale is None:
        return _NULL, _f64(0.0)
    if isinstance(grad_scale, (int, float, np.floating, np.integer)):
        return _NULL, _f64(float(grad_scale))
    scale = cupy.ascontiguousarray(grad_scale, dtype=np.float64).reshape(-1)
    _expect_size("grad_scale", scale, count)
    return scale, _f64(0.0)


def _expect_size(name, array, count):
    """Guards the kernels' unchecked indexing against an operand of the wrong size."""
    if array.size != count:
        raise ValueError(f"{name} has {array.size} elements where the CUDA kernels index {count}")


def _expect_shape(name, array, shape):
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, the CUDA kernels expect {tuple(shape)}")


def _ignore_args(ignore_index):
    """(ignore_index, has_ignore); an ignore_index outside int64 matches no label."""
    if ignore_index is None or not -(2**63) <= int(ignore_index) < 2**63:
        return _i64(0), _i32(0)
    return _i64(int(ignore_index)), _i32(1)


def _contiguous(array):
    """``array`` C-contiguous; a 16-bit float array is copied as raw uint16 words, so
    CuPy's copy kernel does not need cuda_fp16.h / cuda_bf16.h at run time."""
    import cupy

    if array.flags.c_contiguous:
        return array
    if array.dtype.itemsize == 2 and array.dtype.kind not in "iub":
        return cupy.ascontiguousarray(array.view(np.uint16)).view(array.dtype)
    return cupy.ascontiguousarray(array)


def _labels_for_kernel(labels, n_rows):
    """Class ids as int32/int64 (the kernels' label types), C-contiguous, one per row."""
    import cupy

    _expect_shape("labels", labels, (n_rows,))
    if _dtype_name(labels.dtype) in LABEL_TYPES:
        return cupy.ascontiguousarray(labels)
    return cupy.ascontiguousarray(labels).astype(np.int64)


def _dense_operand(array, score_dtype, info, shape, what="labels"):
    """A dense second operand in the scores' dtype or the accumulation dtype, as is
    when it already is one (no copy), else cast by ``cast_elems`` (not CuPy's astype,
    which for 16-bit types needs CUDA headers at run time). It must have the scores'
    ``shape``: the kernels read it at the scores' indices."""
    _expect_shape(what, array, shape)
    score = _dtype_name(score_dtype)
    name = _dtype_name(array.dtype)
    array = _contiguous(array)
    if name in _choices("dense", score):
        return array
    if name not in CAST_SOURCE_TYPES:
        raise TypeError(f"the CUDA kernels cannot read an operand of dtype {array.dtype}")
    acc = SCORE_TYPES[score][1]
    out = _empty(array.shape, acc)
    n = array.size
    if n:
        kernel = get_kernel("cast_elems", name, acc)
        grid = max(1, min(-(-n // ELEMENTWISE_BLOCK_THREADS), info.sms * ELEMENTWISE_BLOCKS_PER_SM))
        _launch(kernel, grid, ELEMENTWISE_BLOCK_THREADS, (array, out, _i64(n)))
    return out


def check_labels_enabled():
    """True unless ``CHECK_LABELS`` is False or ``FASTXENT_CUDA_SKIP_LABEL_CHECK`` is set."""
    skip = os.environ.get(SKIP_LABEL_CHECK_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return CHECK_LABELS and not skip


def _raise_on_bad_label(flag, labels, num_classes, ignore_index, label_shape):
    """Read the device flag (a synchronisation) and raise the CPU path's ValueError."""
    if not check_labels_enabled() or int(flag.get()[0]) == 0:
        return
    host = labels.get()
    if label_shape is not None:
        host = host.reshape(label_shape)
    message = bad_label_message(host, num_classes, ignore_index)
    raise ValueError(message or f"labels hold a class id outside [0, {num_classes})")


def _pos_weight_args(pos_weight, shape):
    """(mode, array or NULL, value) for the elementwise kernels' pos_weight over (R, K) ``shape``."""
    import cupy

    if pos_weight is None:
        return _i32(_PW_NONE), _NULL, _f64(1.0)
    if isinstance(pos_weight, (int, float, np.floating, np.integer)):
        return _i32(_PW_SCALAR), _NULL, _f64(float(pos_weight))
    weights = cupy.ascontiguousarray(cupy.asarray(pos_weight), dtype=np.float64)
    mode = _PW_PER_COLUMN if weights.ndim == 1 else _PW_FULL
    _expect_size("pos_weight", weights, shape[-1] if mode == _PW_PER_COLUMN else int(np.prod(shape)))
    return _i32(mode), weights.reshape(-1), _f64(1.0)


def _clip_bounds(epsilon, dtype):
    """Keras's [epsilon, 1 - epsilon], each rounded to the probs' dtype."""
    return _f64(_dtypes.round_to(epsilon, dtype)), _f64(_dtypes.round_to(1.0 - epsilon, dtype))


# ----------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, ignore_index, class_weight, label_smoothing,
                                 z_loss, softcap, grad_scale, *, inplace=False, label_shape=None):
    """Sparse softmax cross-entropy of (N, C) rows; see ``fastxent.backends``.

    Returns ``(loss (N,), grad (N, C) or None)``. Few rows of many classes
    (N < SMs, C >= SPLIT_MIN_CLASSES) take the split-row path. ``inplace=True`` writes
    the gradient into ``logits`` (returned as ``grad``): the logits are lost. Reads the
    bad-label flag (a synchronisation) unless label checks are skipped; ``label_shape``
    (the labels' shape before flattening) only shapes the error message.
    """
    n_rows, n_classes = logits.shape
    with _device(logits):
        info = device_info(logits.device.id)
        loss = _empty(n_rows, acc_dtype_name(logits.dtype))
        grad = None
        if grad_scale is not None:
            grad = logits if inplace else _empty(logits.shape, logits.dtype)
        if n_rows == 0:
            return loss, grad
        ids = _labels_for_kernel(labels, n_rows)
        weights = _NULL
        weight_sum = float(n_classes)
        if class_weight is not None:
            host_weights = np.ascontiguousarray(class_weight, dtype=np.float64)
            _expect_shape("class_weight", host_weights, (n_classes,))
            weight_sum = float(host_weights.sum())
            weights = _to_device(host_weights)
        scale, scale_value = _scale_args(grad_scale, n_rows)
        ignore, has_ignore = _ignore_args(ignore_index)
        eps, zl = _f64(label_smoothing), _f64(z_loss)
        cap = _f64(softcap if softcap is not None else 0.0)
        flag = _zeros_flag()
        vec = vec_ok(_vector_width(logits.dtype), logits, grad)
        split = split_plan(n_rows, n_classes, info)
        if split is not None:
            _sparse_split(logits, ids, split, weights, weight_sum, eps, zl, cap, ignore, has_ignore,
                          scale, scale_value, loss, grad, vec, flag, info)
        else:
            plan = row_plan(n_rows, n_classes, n_classes * logits.dtype.itemsize, info, grad is not None)
            kernel = get_kernel("sparse_xent_rows", logits.dtype, ids.dtype, plan.group)
            _launch(kernel, plan.grid, plan.threads,
                    (logits, ids, _i64(n_rows), _i64(n_classes), weights, _f64(weight_sum), eps, zl, cap,
                     ignore, has_ignore, scale, scale_value, loss, grad if grad is not None else _NULL,
                     _i32(vec), flag), plan.smem)
        _raise_on_bad_label(flag, labels, n_classes, ignore_index, label_shape)
    return loss, grad


def _sparse_split(logits, ids, split, weights, weight_sum, eps, zl, cap, ignore, has_ignore,
                  scale, scale_value, loss, grad, vec, flag, info):
    n_rows, n_classes = logits.shape
    acc = acc_dtype_name(logits.dtype)
    # SparseStats<A> is three A's: m, s, wz.
    partial = _empty((n_rows * split.splits, 3), acc)
    row_norm = _empty((n_rows, 2), acc)  # LogNorm<A>: m, log_s
    grid2d = (split.splits, n_rows)
    kernel = get_kernel("sparse_xent_partial", logits.dtype, ids.dtype)
    kernel(grid2d, (SPLIT_BLOCK_THREADS,),
           (logits, ids, _i64(n_classes), _i64(split.chunk), weights, eps, cap, ignore, has_ignore, partial,
            _i32(vec)))
    merge = get_kernel("sparse_xent_merge", logits.dtype, ids.dtype)
    rows_per_block = GROUP_BLOCK_THREADS // 32
    _launch(merge, -(-n_rows // rows_per_block), GROUP_BLOCK_THREADS,
            (logits, ids, _i64(n_rows), _i64(n_classes), _i64(split.splits), weights, _f64(weight_sum), eps, zl,
             cap, ignore, has_ignore, partial, row_norm, loss, flag))
    if grad is not None:
        kernel = get_kernel("sparse_xent_split_grad", logits.dtype, ids.dtype)
        kernel(grid2d, (SPLIT_BLOCK_THREADS,),
               (logits, ids, _i64(n_classes), _i64(split.chunk), weights, _f64(weight_sum), eps, zl, cap,
                ignore, has_ignore, row_norm, scale, scale_value, grad, _i32(vec)))


def _to_device(host_array):
    import cupy

    return cupy.asarray(host_array)


def _zeros_flag():
    import cupy

    return cupy.zeros(1, dtype=np.int32)


def softmax_cross_entropy(logits, labels, label_smoothing, softcap, grad_scale, *, inplace=False):
    """Soft-label softmax cross-entropy of (N, C) rows; ``inplace`` as the sparse one."""
    n_rows, n_classes = logits.shape
    with _device(logits):
        info = device_info(logits.device.id)
        loss = _empty(n_rows, acc_dtype_name(logits.dtype))
        grad = None
        if grad_scale is not None:
            grad = logits if inplace else _empty(logits.shape, logits.dtype)
        if n_rows == 0:
            return loss, grad
        targets = _dense_operand(labels, logits.dtype, info, logits.shape)
        scale, scale_value = _scale_args(grad_scale, n_rows)
        vec = vec_ok(_vector_width(logits.dtype), logits, targets, grad)
        row_bytes = n_classes * (logits.dtype.itemsize + targets.dtype.itemsize)
        plan = row_plan(n_rows, n_classes, row_bytes, info, grad is not None)
        kernel = get_kernel("soft_xent_rows", logits.dtype, targets.dtype, plan.group)
        _launch(kernel, plan.grid, plan.threads,
                (logits, targets, _i64(n_rows), _i64(n_classes), _f64(label_smoothing),
                 _f64(softcap if softcap is not None else 0.0), scale, scale_value, loss,
                 grad if grad is not None else _NULL, _i32(vec)), plan.smem)
    return loss, grad


def _softmax_rows(x, mode):
    n_rows, n_classes = x.shape
    with _device(x):
        info = device_info(x.device.id)
        if mode == _MODE_LOGSUMEXP:
            lse, out = _empty(n_rows, acc_dtype_name(x.dtype)), None
        else:
            lse, out = None, _empty(x.shape, x.dtype)
        if n_rows:
            plan = row_plan(n_rows, n_classes, n_classes * x.dtype.itemsize, info, mode != _MODE_LOGSUMEXP)
            kernel = get_kernel("softmax_rows", x.dtype, plan.group)
            _launch(kernel, plan.grid, plan.threads,
                    (x, _i64(n_rows), _i64(n_classes), _i32(mode), lse if lse is not None else _NULL,
                     out if out is not None else _NULL, _i32(vec_ok(_vector_width(x.dtype), x, out))),
                    plan.smem)
    return lse if mode == _MODE_LOGSUMEXP else out


def log_softmax(x):
    """``x - logsumexp(x)`` per row, in x's dtype (torch's rules for non-finite rows)."""
    return _softmax_rows(x, _MODE_LOG_SOFTMAX)


def softmax(x):
    """``exp(x - logsumexp(x))`` per row, in x's dtype."""
    return _softmax_rows(x, _MODE_SOFTMAX)


def logsumexp(x):
    """Row logsumexp (N,) in the loss dtype: -inf for an all -inf row, +inf with +inf."""
    return _softmax_rows(x, _MODE_LOGSUMEXP)


def softmax_cross_entropy_hvp(logits, v):
    """``p * v - p * (p . v)`` per row, in the logits' dtype."""
    n_rows, n_classes = logits.shape
    with _device(logits):
        info = device_info(logits.device.id)
        out = _empty(logits.shape, logits.dtype)
        if n_rows == 0:
            return out
        vector = _dense_operand(v, logits.dtype, info, logits.shape, "v")
        row_bytes = n_classes * (logits.dtype.itemsize + vector.dtype.itemsize)
        plan = row_plan(n_rows, n_classes, row_bytes, info, True)
        kernel = get_kernel("hvp_rows", logits.dtype, vector.dtype, plan.group)
        _launch(kernel, plan.grid, plan.threads,
                (logits, vector, _i64(n_rows), _i64(n_classes), out,
                 _i32(vec_ok(_vector_width(logits.dtype), logits, vector, out))), plan.smem)
    return out


def score(logits, labels, ignore_index, *, label_shape=None):
    """The scoring bundle of (N, C) rows in one read; a :class:`fastxent.Score` of (N,) arrays.

    Reads the bad-label flag (a synchronisation) unless label checks are skipped.
    """
    n_rows, n_classes = logits.shape
    with _device(logits):
        info = device_info(logits.device.id)
        acc = acc_dtype_name(logits.dtype)
        fields = Score(loss=_empty(n_rows, acc), lse=_empty(n_rows, acc), target_logprob=_empty(n_rows, acc),
                       entropy=_empty(n_rows, acc), argmax=_empty(n_rows, np.int64),
                       correct=_empty(n_rows, np.bool_))
        if n_rows == 0:
            return fields
        ids = _labels_for_kernel(labels, n_rows)
        ignore, has_ignore = _ignore_args(ignore_index)
        flag = _zeros_flag()
        plan = row_plan(n_rows, n_classes, n_classes * logits.dtype.itemsize, info, False)
        kernel = get_kernel("score_rows", logits.dtype, ids.dtype, plan.group)
        _launch(kernel, plan.grid, plan.threads,
                (logits, ids, _i64(n_rows), _i64(n_classes), ignore, has_ignore, *fields,
                 _i32(vec_ok(_vector_width(logits.dtype), logits)), flag))
        _raise_on_bad_label(flag, labels, n_classes, ignore_index, label_shape)
    return fields


# ----------------------------------------------------------------------------
# Probability inputs
# ----------------------------------------------------------------------------

def categorical_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale):
    """Keras categorical cross-entropy of (N, C) probability rows."""
    n_rows, n_classes = probs.shape
    with _device(probs):
        info = device_info(probs.device.id)
        loss = _empty(n_rows, acc_dtype_name(probs.dtype))
        grad = _empty(probs.shape, probs.dtype) if grad_scale is not None else None
        if n_rows == 0:
            return loss, grad
        targets = _dense_operand(labels, probs.dtype, info, probs.shape)
        lo, hi = _clip_bounds(epsilon, probs.dtype)
        scale, scale_value = _scale_args(grad_scale, n_rows)
        row_bytes = n_classes * (probs.dtype.itemsize + targets.dtype.itemsize)
        plan = row_plan(n_rows, n_classes, row_bytes, info, True)
        kernel = get_kernel("categorical_rows", probs.dtype, targets.dtype, plan.group)
        _launch(kernel, plan.grid, plan.threads,
                (probs, targets, _i64(n_rows), _i64(n_classes), lo, hi, _f64(label_smoothing), scale,
                 scale_value, loss, grad if grad is not None else _NULL,
                 _i32(vec_ok(_vector_width(probs.dtype), probs, targets, grad))), plan.smem)
    return loss, grad


def sparse_categorical_cross_entropy(probs, labels, epsilon, ignore_index, grad_scale, *, label_shape=None):
    """Keras sparse categorical cross-entropy of (N, C) probability rows.

    Reads the bad-label flag (a synchronisation) unless label checks are skipped.
    """
    n_rows, n_classes = probs.shape
    with _device(probs):
        info = device_info(probs.device.id)
        loss = _empty(n_rows, acc_dtype_name(probs.dtype))
        grad = _empty(probs.shape, probs.dtype) if grad_scale is not None else None
        if n_rows == 0:
            return loss, grad
        ids = _labels_for_kernel(labels, n_rows)
        lo, hi = _clip_bounds(epsilon, probs.dtype)
        ignore, has_ignore = _ignore_args(ignore_index)
        scale, scale_value = _scale_args(grad_scale, n_rows)
        flag = _zeros_flag()
        plan = row_plan(n_rows, n_classes, n_classes * probs.dtype.itemsize, info, grad is not None)
        kernel = get_kernel("sparse_categorical_rows", probs.dtype, ids.dtype, plan.group)
        _launch(kernel, plan.grid, plan.threads,
                (probs, ids, _i64(n_rows), _i64(n_classes), lo, hi, ignore, has_ignore, scale, scale_value,
                 loss, grad if grad is not None else _NULL, _i32(vec_ok(_vector_width(probs.dtype), probs)),
                 flag), plan.smem)
        _raise_on_bad_label(flag, labels, n_classes, ignore_index, label_shape)
    return loss, grad


# ----------------------------------------------------------------------------
# Elementwise families
# ----------------------------------------------------------------------------

def sigmoid_cross_entropy(logits, labels, pos_weight, label_smoothing, grad_scale):
    """Elementwise sigmoid cross-entropy of (R, K) scores; ``(loss (R, K), grad or None)``."""
    with _device(logits):
        info = device_info(logits.device.id)
        loss = _empty(logits.shape, acc_dtype_name(logits.dtype))
        grad = _empty(logits.shape, logits.dtype) if grad_scale is not None else None
        n = logits.size
        if n == 0:
            return loss, grad
        targets = _dense_operand(labels, logits.dtype, info, logits.shape)
        mode, weights, weight_value = _pos_weight_args(pos_weight, logits.shape)
        scale, scale_value = _scale_args(grad_scale, n)
        vec = _vector_width(logits.dtype)
        kernel = get_kernel("sigmoid_xent_elems", logits.dtype, targets.dtype)
        _launch(kernel, _elementwise_grid(n, vec, info), ELEMENTWISE_BLOCK_THREADS,
                (logits, targets, _i64(n), _i64(logits.shape[-1]), mode, weights, weight_value,
                 _f64(label_smoothing), scale, scale_value, loss, grad if grad is not None else _NULL,
                 _i32(vec_ok(vec, logits, targets, loss, grad))))
    return loss, grad


def sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight):
    """``(1 + (q-1) z) s (1-s)`` elementwise, in the logits' dtype and (R, K) shape."""
    with _device(logits):
        info = device_info(logits.device.id)
        out = _empty(logits.shape, logits.dtype)
        n = logits.size
        if n == 0:
            return out
        targets = _dense_operand(labels, logits.dtype, info, logits.shape)
        mode, weights, weight_value = _pos_weight_args(pos_weight, logits.shape)
        vec = _vector_width(logits.dtype)
        kernel = get_kernel("sigmoid_hess_elems", logits.dtype, targets.dtype)
        _launch(kernel, _elementwise_grid(n, vec, info), ELEMENTWISE_BLOCK_THREADS,
                (logits, targets, _i64(n), _i64(logits.shape[-1]), mode, weights, weight_value, out,
                 _i32(vec_ok(vec, logits, targets, out))))
    return out


def binary_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale):
    """Keras binary cross-entropy of (R, K) probabilities; ``(loss, grad or None)``."""
    with _device(probs):
        info = device_info(probs.device.id)
        loss = _empty(probs.shape, acc_dtype_name(probs.dtype))
        grad = _empty(probs.shape, probs.dtype) if grad_scale is not None else None
        n = probs.size
        if n == 0:
            return loss, grad
        targets = _dense_operand(labels, probs.dtype, info, probs.shape)
        lo, hi = _clip_bounds(epsilon, probs.dtype)
        scale, scale_value = _scale_args(grad_scale, n)
        vec = _vector_width(probs.dtype)
        kernel = get_kernel("binary_xent_elems", probs.dtype, targets.dtype)
        _launch(kernel, _elementwise_grid(n, vec, info), ELEMENTWISE_BLOCK_THREADS,
                (probs, targets, _i64(n), lo, hi, _f64(label_smoothing), scale, scale_value, loss,
                 grad if grad is not None else _NULL, _i32(vec_ok(vec, probs, targets, loss, grad))))
    return loss, grad
