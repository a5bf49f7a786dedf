"""A sum of matrix products into an array the caller owns: the weight gradient of ``fastxent.linear``.

numpy's ``matmul(a, b, out=...)`` writes a product into a buffer without allocating,
but cannot add it to what the buffer holds (BLAS gemm's ``beta``). The weight
gradient is a sum over blocks of rows, ``grad_weight += G.T @ hidden_block``, and a
temporary of ``grad_weight``'s size per block would cost a (V, H) allocation and an
extra pass over it. :class:`ProductSum` adds each product in place:

* host arrays with SciPy installed: SciPy's BLAS ``sgemm``/``dgemm`` with ``beta = 1``
  on the column-major views of the operands (no copy of either);
* otherwise (no SciPy, CUDA arrays): ``LINEAR_ACCUMULATE_ROWS`` rows of the result at
  a time through a scratch of that many rows, added to the output while it is in cache.
"""

import numpy as np

from . import _config


def _scipy_gemm(dtype):
    """SciPy's BLAS gemm for float32/float64 ``dtype``, or None without SciPy."""
    try:
        from scipy.linalg import blas
    except ImportError:
        return None
    return blas.sgemm if np.dtype(dtype) == np.float32 else blas.dgemm


def scratch_rows(out_rows, xp, use_blas=True):
    """Rows of the scratch :class:`ProductSum` allocates for an output of ``out_rows`` rows (0 with BLAS)."""
    if use_blas and xp is np and _scipy_gemm(np.float32) is not None:
        return 0
    return min(_config.LINEAR_ACCUMULATE_ROWS, out_rows)


class ProductSum:
    """``out += a.T @ b`` for ``a`` (B, V) and ``b`` (B, H) into ``out`` (V, H), C-contiguous,
    of one float32/float64 dtype, allocating nothing per call.

    ``use_blas=False`` takes the scratch route on the host too (tests compare the two).
    """

    def __init__(self, out, xp, use_blas=True):
        self.out = out
        self.xp = xp
        rows = scratch_rows(out.shape[0], xp, use_blas)
        self.gemm = None if rows else _scipy_gemm(out.dtype)
        self.scratch = xp.empty((rows, out.shape[1]), dtype=out.dtype) if rows else None

    def add(self, a, b):
        """Add ``a.T @ b`` to the output."""
        if a.shape[0] == 0 or self.out.size == 0:
            return
        if self.gemm is not None:
            # Column-major, out.T (H, V) += b.T (H, B) @ a (B, V): every operand is the
            # Fortran-order view of a C-contiguous array, so SciPy passes it to BLAS as is.
            result = self.gemm(1.0, b.T, a.T, beta=1.0, c=self.out.T, overwrite_c=True, trans_b=True)
            if not np.shares_memory(result, self.out):  # an operand SciPy had to copy
                self.out[...] = result.T
            return
        step = self.scratch.shape[0]
        for start in range(0, self.out.shape[0], step):
            stop = min(start + step, self.out.shape[0])
            part = self.scratch[:stop - start]
            self.xp.matmul(a[:, start:stop].T, b, out=part)
            self.out[start:stop] += part
