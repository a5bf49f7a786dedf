"""A sum of matrix products into an array the caller owns: the weight gradient of ``fastxent.linear``.

numpy's ``matmul(a, b, out=...)`` writes a product into a buffer without allocating,
but cannot add it to what the buffer holds (BLAS gemm's ``beta``). The weight
gradient is a sum over blocks of rows, ``grad_weight += G.T @ hidden_block``, and a
temporary of ``grad_weight``'s size per block would cost a (V, H) allocation and an
extra pass over it. :class:`ProductSum` adds each product in place, by the first route
that is available (host arrays):

* ``"numpy"``: the OpenBLAS numpy's wheels bundle (``scipy_cblas_sgemm64_`` of
  ``numpy.libs/libscipy_openblas64_*``), called through ctypes with ``beta = 1``: the
  library (and the thread pool) numpy's matmul already uses, so no second BLAS pool
  spins beside it and beside Numba's threads on a small machine;
* ``"scipy"``: SciPy's BLAS ``sgemm``/``dgemm`` with ``beta = 1`` on the column-major
  views of the operands (no copy of either);
* ``"scratch"`` (and always for CUDA arrays): ``LINEAR_ACCUMULATE_ROWS`` rows of the
  result at a time through a scratch of that many rows, added to the output.
"""

import ctypes
import functools
import glob
import os

import numpy as np

from . import _config

ROUTES = ("numpy", "scipy", "scratch")

# CBLAS enumerations (cblas.h).
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.lru_cache(maxsize=None)
def _numpy_cblas():
    """``{dtype: cblas gemm}`` of the OpenBLAS bundled with numpy (64-bit integers), or None."""
    package = os.path.dirname(np.__file__)
    paths = (glob.glob(os.path.join(package, os.pardir, "numpy.libs", "libscipy_openblas64_*"))
             + glob.glob(os.path.join(package, ".dylibs", "libscipy_openblas64_*")))
    for path in paths:
        try:
            library = ctypes.CDLL(path)
            functions = {np.dtype(np.float32): (library.scipy_cblas_sgemm64_, ctypes.c_float),
                         np.dtype(np.float64): (library.scipy_cblas_dgemm64_, ctypes.c_double)}
        except (OSError, AttributeError):
            continue
        gemms = {}
        for dtype, (function, scalar) in functions.items():
            size, pointer = ctypes.c_int64, ctypes.c_void_p
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, size, size, size, scalar, pointer, size,
                                 pointer, size, scalar, pointer, size]
            function.restype = None
            gemms[dtype] = function
        if _agrees(gemms):
            return gemms
    return None


def _cblas_add(gemm, out, a, b):
    """``out += a.T @ b`` row-major through ``gemm``: out (V, H), a (B, V), b (B, H), rows of unit stride."""
    item = out.itemsize
    gemm(_ROW_MAJOR, _TRANS, _NO_TRANS, out.shape[0], out.shape[1], a.shape[0], 1.0, a.ctypes.data,
         a.strides[0] // item, b.ctypes.data, b.strides[0] // item, 1.0, out.ctypes.data, out.shape[1])


def _agrees(gemms):
    """A probe of the ctypes route: a small sum against numpy's matmul (a library that is not
    the expected one, or an ABI mismatch, is not used)."""
    rng = np.random.default_rng(0)
    for dtype, gemm in gemms.items():
        a, b = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal((5, 3)).astype(dtype)
        out = np.ones((7, 3), dtype)
        _cblas_add(gemm, out, a, b)
        if not np.allclose(out, 1 + a.T @ b, rtol=1e-5, atol=1e-5):
            return False
    return True


def _scipy_gemm(dtype):
    """SciPy's BLAS gemm for float32/float64 ``dtype``, or None without SciPy."""
    try:
        from scipy.linalg import blas
    except ImportError:
        return None
    return blas.sgemm if np.dtype(dtype) == np.float32 else blas.dgemm


def route(xp, preferred=None):
    """The route :class:`ProductSum` takes for arrays of ``xp``: ``preferred`` when it is
    available (tests name each), else the first of :data:`ROUTES` that is."""
    if xp is not np:
        return "scratch"
    available = [name for name, ok in (("numpy", _numpy_cblas() is not None),
                                       ("scipy", _scipy_gemm(np.float32) is not None), ("scratch", True)) if ok]
    return preferred if preferred in available else available[0]


def scratch_rows(out_rows, xp, preferred=None):
    """Rows of the scratch :class:`ProductSum` allocates for an output of ``out_rows`` rows (0 without one)."""
    if route(xp, preferred) != "scratch":
        return 0
    return min(_config.LINEAR_ACCUMULATE_ROWS, out_rows)


class ProductSum:
    """``out += a.T @ b`` for ``a`` (B, V) and ``b`` (B, H) into ``out`` (V, H), C-contiguous,
    of one float32/float64 dtype, allocating nothing per call (``preferred``: see :func:`route`)."""

    def __init__(self, out, xp, preferred=None):
        self.out = out
        self.xp = xp
        self.route = route(xp, preferred)
        rows = scratch_rows(out.shape[0], xp, self.route)
        self.scratch = xp.empty((rows, out.shape[1]), dtype=out.dtype) if rows else None

    def add(self, a, b):
        """Add ``a.T @ b`` to the output."""
        if a.shape[0] == 0 or self.out.size == 0:
            return
        unit_rows = a.strides[-1] == a.itemsize and b.strides[-1] == b.itemsize
        if self.route == "numpy" and unit_rows:
            _cblas_add(_numpy_cblas()[self.out.dtype], self.out, a, b)
        elif self.route in ("numpy", "scipy") and _scipy_gemm(self.out.dtype) is not None:
            # Column-major, out.T (H, V) += b.T (H, B) @ a (B, V): the Fortran-order views of
            # C-contiguous arrays, passed to BLAS as they are.
            result = _scipy_gemm(self.out.dtype)(1.0, b.T, a.T, beta=1.0, c=self.out.T, overwrite_c=True,
                                                 trans_b=True)
            if not np.shares_memory(result, self.out):  # an operand SciPy had to copy
                self.out[...] = result.T
        else:
            self._add_through_scratch(a, b)

    def _add_through_scratch(self, a, b):
        if self.scratch is None:
            self.scratch = self.xp.empty((min(_config.LINEAR_ACCUMULATE_ROWS, self.out.shape[0]),
                                          self.out.shape[1]), dtype=self.out.dtype)
        step = self.scratch.shape[0]
        for start in range(0, self.out.shape[0], step):
            stop = min(start + step, self.out.shape[0])
            part = self.scratch[:stop - start]
            self.xp.matmul(a[:, start:stop].T, b, out=part)
            self.out[start:stop] += part
