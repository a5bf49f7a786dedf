"""Build side of the CUDA backend: the dtype table, the kernel sources, the compiled-kernel cache.

The CUDA C++ in ``kernels/`` (shipped in the wheel as ``fastxent.kernels``) is the one
source of the GPU kernels: templates over the score type, the label type and the
threads per row, instantiated through ``cupy.RawModule(name_expressions=...)`` from the
dtype table below (:data:`SCORE_TYPES`, :data:`LABEL_TYPES`, :data:`KERNELS`). Each
instantiation is compiled by NVRTC on first use, once per process and set of options
(and cached on disk by CuPy); :func:`get_kernel` is the one lookup. The 16-bit score
types are raw 16-bit words in the kernels, so no CUDA header is needed at run time.
``ci/check_kernels.py`` compiles every instantiation of the table with nvcc.
"""

import functools
import importlib.resources
import os
import pathlib
import re

import numpy as np

from ... import _config, _dtypes

#: NVRTC options of every kernel module besides the launch bounds (:func:`compile_options`).
BASE_OPTIONS = ("-std=c++17",)


def compile_options():
    """The options of every kernel module: :data:`BASE_OPTIONS` and the launch bounds of
    ``fastxent/_config.py`` as the ``-D`` macros ``kernels/fx_common.cuh`` requires."""
    return BASE_OPTIONS + (
        f"-DFX_GROUP_BLOCK_THREADS={int(_config.CUDA_GROUP_BLOCK_THREADS)}",
        f"-DFX_ROW_BLOCK_MAX_THREADS={int(_config.CUDA_ROW_BLOCK_MAX_THREADS)}",
        f"-DFX_ELEMENTWISE_BLOCK_THREADS={int(_config.CUDA_ELEMENTWISE_BLOCK_THREADS)}",
    )


# ----------------------------------------------------------------------------
# The dtype table: the one place that says which instantiations exist
# ----------------------------------------------------------------------------

#: numpy dtype name of the scores -> C++ storage type (also the types of the dense second
#: operands: soft labels, v and elementwise labels are read in the scores' own dtype or
#: their accumulation dtype; any other, bool or another width, is first cast to the
#: accumulation dtype by ``cast_elems``).
SCORE_TYPES = {"float16": "fx::f16", "bfloat16": "fx::bf16", "float32": "float", "float64": "double"}

#: Sparse label dtypes the kernels read; other integer dtypes are cast to int64 first.
LABEL_TYPES = {"int32": "int", "int64": "long long"}

#: Source dtypes of ``cast_elems``.
CAST_SOURCE_TYPES = {"bool": "bool", **SCORE_TYPES}

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
    "sparse_partials_rows": ("partials_rows.cu", ("score", "group")),
    "score_partials_rows": ("partials_rows.cu", ("score", "group")),
    "softmax_block_grad_rows": ("partials_rows.cu", ("score", "group")),
}


def dtype_name(dtype):
    """A dtype's numpy name ("bfloat16" for ml_dtypes.bfloat16); names pass through."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def acc_dtype_name(score_dtype):
    """Accumulation (= loss) dtype name of a score dtype (``fastxent._dtypes``)."""
    return _dtypes.accumulation_dtype(dtype_name(score_dtype)).name


def dense_choices(score_dtype):
    """Dtype names a dense second operand is read in as is: the scores' own or their accumulation dtype."""
    score = dtype_name(score_dtype)
    return tuple(dict.fromkeys((score, acc_dtype_name(score))))


def _choices(kind, score):
    """The values a template parameter of ``kind`` takes (given the score dtype name)."""
    if kind == "score":
        return tuple(SCORE_TYPES)
    if kind == "label":
        return tuple(LABEL_TYPES)
    if kind == "dense":
        return dense_choices(score)
    if kind == "group":
        return GROUPS
    if kind == "source":
        return tuple(CAST_SOURCE_TYPES)
    if kind == "acc":
        return ("float32", "float64")
    raise KeyError(kind)


def _cpp(kind, value):
    if kind in ("score", "dense", "acc"):
        return SCORE_TYPES[value]
    if kind == "label":
        return LABEL_TYPES[value]
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
    values = [p if isinstance(p, int) and not isinstance(p, bool) else dtype_name(p) for p in params]
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
        return pathlib.Path(__file__).resolve().parents[3] / "kernels"


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
    return _module(expression, compile_options()).get_function(expression)


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
            _module(expression, compile_options()).get_function(expression)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for future in [pool.submit(build, name) for name in names]:
            future.result()
    return len(names)
