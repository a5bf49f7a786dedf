"""Tunables in one place: block sizes and thresholds that tests may patch."""

import os

#: Environment variable naming the default backend ("numba", "numpy", "cupy").
BACKEND_ENV = "FASTXENT_BACKEND"

#: Classes per chunk in the Numba softmax kernels. A chunk of 2048 float32
#: scores (8 KiB) stays in L1 between its max pass and its exp pass, so a row
#: is read from memory once; the running (max, sum) is merged per chunk.
NUMBA_CHUNK = 2048

#: Rows per block in the Numba kernels for short rows (C below this): one
#: prange iteration handles a block of rows so per-iteration overhead and the
#: scalar remainder of a 10-wide row are amortised.
NUMBA_SHORT_ROW = 64
NUMBA_ROW_BLOCK = 256


def env_backend():
    """The backend named by ``FASTXENT_BACKEND`` right now (read at each call)."""
    value = os.environ.get(BACKEND_ENV, "").strip()
    return value or None
